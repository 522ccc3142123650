"""Stage runners for the language-model stages: ``pretrain`` and ``sft``."""

from __future__ import annotations

import logging
import os
import time

from lit_rlhf.callbacks.hf_export import HFExportCallback
from lit_rlhf.callbacks.metrics_json import MetricsJSONCallback, update_metrics_json
from lit_rlhf.data.lm_datamodule import DemonstrationsDataModule, PretrainDataModule
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
from lit_rlhf.models.tiny import build_tiny_causal_lm
from lit_rlhf.modules.sft import SFTModule
from lit_rlhf.stages.checks import check_stage_config
from lit_rlhf.stages.context import ConfigError, StageContext

log = logging.getLogger("lit_rlhf")


def _module_kwargs(scfg: dict, stage: str) -> dict:
    keys = ("lr", "weight_decay", "schedule", "warmup_steps", "min_lr_ratio", "loss_reduction")
    packed = [k for k in ("packing", "padding_free") if scfg.get(k)]
    if packed and scfg.get("loss_reduction") == "sequence_mean":
        # A packed row holds several sequences; its per-row mean is not a per-sequence mean.
        raise ConfigError(
            f"{stage}.loss_reduction=sequence_mean needs one sequence per row, but "
            f"{stage}.{packed[0]}=true packs several: use token_mean or set "
            + " and ".join(f"{stage}.{k}=false" for k in packed)
        )
    return {k: scfg[k] for k in keys if k in scfg}


def _fit(ctx: StageContext, stage: str, module, datamodule, tokenizer, export_dir: str) -> str:
    scfg = ctx.cfg[stage]
    stage_dir = ctx.stage_dir(stage)
    start = time.perf_counter()

    def extras() -> dict:
        # Called by the export on rank 0 before its marker, so metrics.json is part of the
        # finished folder (MetricsJSONCallback, earlier in the list, has written the rest).
        extra = {f"{stage}/seconds": time.perf_counter() - start}
        extra.update(datamodule.truncation.as_metrics())
        return {"metrics.json": update_metrics_json(os.path.join(stage_dir, "metrics.json"), extra)}

    callbacks = [
        ctx.guard(stage),
        MetricsJSONCallback(stage_dir),
        HFExportCallback(
            export_dir, tokenizer, info={"stage": stage, "run_dir": stage_dir}, extras=extras
        ),
    ]
    trainer = ctx.make_trainer(stage_dir, scfg, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.resume_path(stage, stage))
    log.info("[%s] done in %.1f s; export: %s", stage, time.perf_counter() - start, export_dir)
    return export_dir


def tokenizer_for(ctx: StageContext):
    """The recipe's tokenizer: the model's own, or the one trained on the embedded corpus."""
    mcfg = ctx.cfg["model"]
    path = mcfg.get("tokenizer") or mcfg.get("name_or_path") or str(ctx.world().tokenizer_dir)
    return load_tokenizer(path)


def run_pretrain(ctx: StageContext, stage: str = "pretrain") -> str:
    """Train the base model on ``{"text"}`` records (from scratch for the tiny model)."""
    mcfg, scfg = ctx.cfg["model"], ctx.cfg["pretrain"]
    check_stage_config(ctx.cfg, stage)
    tokenizer = tokenizer_for(ctx)
    if mcfg.get("name_or_path"):
        model = load_causal_lm(mcfg["name_or_path"], mcfg["dtype"], mcfg.get("dropout"), tokenizer)
    else:
        model = build_tiny_causal_lm(
            mcfg["arch"],
            tokenizer=tokenizer,
            hidden_size=mcfg["hidden_size"],
            num_layers=mcfg["num_layers"],
            num_heads=mcfg["num_heads"],
            max_positions=mcfg["max_positions"],
            dropout=mcfg.get("dropout") or 0.0,
            seed=ctx.cfg.get("seed"),
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("[pretrain] %s with %.2f M parameters", type(model).__name__, n_params / 1e6)
    dm = PretrainDataModule(
        ctx.data_source("pretrain"),
        val_source=ctx.data_source("pretrain_val"),
        fields=ctx.fields,
        max_length=scfg["max_length"],
        batch_size=scfg["batch_size"],
        packing=scfg.get("packing", True),
        seed=ctx.cfg.get("seed", 0),
        limit=scfg.get("limit"),
    ).connect(tokenizer)
    module = SFTModule(model, **_module_kwargs(scfg, "pretrain"))
    return _fit(ctx, "pretrain", module, dm, tokenizer, ctx.export_dir("pretrain"))


def run_sft(ctx: StageContext, stage: str = "sft") -> str:
    """Supervised fine-tuning on demonstrations, starting from the base model."""
    mcfg, scfg = ctx.cfg["model"], ctx.cfg["sft"]
    check_stage_config(ctx.cfg, stage)
    if scfg.get("init_from"):
        base = ctx.require("pretrain", scfg["init_from"], "sft.init_from")
    elif mcfg.get("name_or_path"):
        base = mcfg["name_or_path"]
    else:
        base = ctx.require("pretrain")
    tokenizer = load_tokenizer(base) if not mcfg.get("tokenizer") else tokenizer_for(ctx)
    model = load_causal_lm(base, mcfg["dtype"], scfg.get("dropout", 0.0), tokenizer)
    dm = DemonstrationsDataModule(
        ctx.data_source("demonstrations"),
        val_source=ctx.cfg["data"].get("demonstrations_val")
        or (
            None if ctx.cfg["data"].get("demonstrations") else ctx.data_source("demonstrations_val")
        ),
        fields=ctx.fields,
        max_length=scfg["max_length"],
        batch_size=scfg["batch_size"],
        val_fraction=scfg.get("val_fraction", 0.05),
        packing=scfg.get("packing", False),
        padding_free=scfg.get("padding_free", True),
        seed=ctx.cfg.get("seed", 0),
        limit=scfg.get("limit"),
    ).connect(tokenizer)
    module = SFTModule(model, **_module_kwargs(scfg, "sft"))
    return _fit(ctx, "sft", module, dm, tokenizer, ctx.export_dir("sft"))
