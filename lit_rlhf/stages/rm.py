"""Stage runner for ``rm``: the reward model on K-wise (or pairwise) comparisons.

Starts from the SFT export (InstructGPT: the RM shares the SFT model's backbone, with the
unembedding replaced by a scalar head: ``rm.head``, linear or a small MLP), trains on the
``label`` stage's comparisons or the user's ``data.comparisons``, then shifts the head so that
demonstrations score mean 0 and exports a folder (PPO's reward and value model). With
``rm.head: linear`` plain ``AutoModelForSequenceClassification`` loads it; an MLP head is
rebuilt by :func:`~lit_rlhf.models.loading.load_sequence_classifier`.
"""

from __future__ import annotations

import logging
import os
import time

from lit_rlhf.callbacks.hf_export import atomic_output_dir, raise_if_nonfinite
from lit_rlhf.callbacks.metrics_json import MetricsJSONCallback, update_metrics_json
from lit_rlhf.data.comparisons import ComparisonsDataModule
from lit_rlhf.data.records import read_records
from lit_rlhf.models.heads import check_head_spec, fold_reward_bias, install_score_head
from lit_rlhf.models.loading import load_sequence_classifier, load_tokenizer
from lit_rlhf.modules.reward import RewardModule, demonstration_bias
from lit_rlhf.stages.checks import check_stage_config
from lit_rlhf.stages.context import ConfigError, StageContext

log = logging.getLogger("lit_rlhf")

#: Held-out pairwise accuracy below which the RM is reported as not having learned (0.5 = chance).
NEAR_CHANCE = 0.55

_MODULE_KEYS = ("lr", "weight_decay", "schedule", "warmup_steps", "min_lr_ratio", "margin")


def comparison_sources(ctx: StageContext) -> tuple[str, str | None]:
    """``(train, val)`` comparison sources: ``data.comparisons[_val]`` or the label stage's files.

    With user comparisons and no ``data.comparisons_val``, val is None (the DataModule then
    holds out ``rm.val_fraction``).
    """
    data = ctx.cfg["data"]
    if data.get("comparisons"):
        return str(data["comparisons"]), data.get("comparisons_val") or None
    label_dir = ctx.require("label")
    val = data.get("comparisons_val") or os.path.join(label_dir, "comparisons_val.jsonl")
    return os.path.join(label_dir, "comparisons_train.jsonl"), str(val)


def _bias(ctx: StageContext, model, tokenizer, rcfg: dict) -> float:
    n = rcfg.get("bias_samples")
    if n is not None and int(n) <= 0:
        log.info("[rm] rm.bias_samples=%s: no demonstration bias applied", n)
        return 0.0
    demos = read_records(
        ctx.data_source("demonstrations"), "demonstrations", ctx.fields, int(n) if n else None
    )
    return demonstration_bias(
        model,
        tokenizer,
        [d["prompt"] for d in demos],
        [d["completion"] for d in demos],
        max_length=rcfg["max_length"],
    )


def run_rm(ctx: StageContext, stage: str = "rm") -> str:
    """Train the reward model; returns its export folder."""
    rcfg = ctx.cfg["rm"]
    # 0. Validate the config before loading anything.
    check_stage_config(ctx.cfg, stage)
    head, head_hidden = rcfg.get("head", "mlp"), rcfg.get("head_hidden", 256)
    try:
        check_head_spec(head, head_hidden)
    except ValueError as err:
        raise ConfigError(f"rm.head={head!r}, rm.head_hidden={head_hidden!r}: {err}") from None
    init = ctx.require("sft", rcfg.get("init_from"), "rm.init_from")
    train_src, val_src = comparison_sources(ctx)  # may build the label stage first
    # The label stage writes canonical field names; data.fields renames only user files.
    fields = ctx.fields if ctx.cfg["data"].get("comparisons") else {}
    start = time.perf_counter()
    tokenizer = load_tokenizer(init)
    model = load_sequence_classifier(
        init,
        ctx.cfg["model"]["dtype"],
        dropout=rcfg.get("dropout", 0.0),
        tokenizer=tokenizer,
        from_causal_lm=True,
    )
    try:
        install_score_head(model, head, head_hidden)
    except ValueError as err:  # an MLP head of another width already in rm.init_from
        raise ConfigError(f"rm.head/rm.head_hidden vs rm.init_from '{init}': {err}") from None
    dm = ComparisonsDataModule(
        train_src,
        val_source=val_src,
        fields=fields,
        max_length=rcfg["max_length"],
        batch_size=rcfg["batch_size"],
        eval_batch_size=rcfg.get("eval_batch_size"),
        val_fraction=rcfg.get("val_fraction", 0.05),
        padding_free=rcfg.get("padding_free", True),
        seed=ctx.cfg.get("seed", 0),
        limit=rcfg.get("limit"),
    ).connect(tokenizer)
    module = RewardModule(model, **{k: rcfg[k] for k in _MODULE_KEYS if k in rcfg})

    stage_dir = ctx.stage_dir(stage)
    trainer = ctx.make_trainer(stage_dir, rcfg, [ctx.guard(stage), MetricsJSONCallback(stage_dir)])
    trainer.fit(module, datamodule=dm, ckpt_path=ctx.resume_path("rm", "rm"))
    raise_if_nonfinite(trainer, module, stage, ctx.export_dir("rm"))

    # InstructGPT: shift the RM so labeler demonstrations score mean 0. Every rank takes part
    # in gathering the weights (FSDP2); ranks holding a full model compute the same bias, and
    # only rank 0 writes.
    model = module.gathered_export_model()
    export_dir = ctx.export_dir("rm")
    if model is not None:
        _bias_and_export(ctx, trainer, model, tokenizer, dm, init, stage_dir, export_dir, start)
    trainer.strategy.barrier("rm_export")  # the export exists for every rank after this
    return export_dir


def _bias_and_export(ctx, trainer, model, tokenizer, dm, init, stage_dir, export_dir, start):
    rcfg = ctx.cfg["rm"]
    bias = _bias(ctx, model, tokenizer, rcfg)
    where = fold_reward_bias(model, bias)
    seconds = time.perf_counter() - start
    metrics = {
        "rm/bias": bias,
        "rm/seconds": seconds,
        **dm.stats(),
    }
    if "val/acc" in trainer.callback_metrics:
        # The same number under the name the eval report uses beside val/acc_gold.
        metrics["val/acc_labels"] = trainer.callback_metrics["val/acc"]
    if trainer.is_global_zero:
        metrics = update_metrics_json(os.path.join(stage_dir, "metrics.json"), metrics)
        info = {"stage": "rm", "run_dir": stage_dir, "init_from": init, "bias": bias}
        info["bias_folded_into"] = where
        with atomic_output_dir(export_dir, info) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            update_metrics_json(os.path.join(tmp, "metrics.json"), metrics)
    log.info(
        "[rm] val/acc %s, bias %.4f (folded into %s), %d train pairs, %.1f s; export: %s",
        _fmt(metrics.get("val/acc")),
        bias,
        where,
        dm.train_pairs,
        seconds,
        export_dir,
    )
    warn_if_near_chance(metrics.get("val/acc"))


def warn_if_near_chance(val_acc) -> bool:
    """Log a warning when the RM's held-out accuracy is near chance; True when it did.

    Such an RM still exports (a user's data may be that hard), but PPO against it optimises
    noise, so the run says so instead of carrying on silently.
    """
    if val_acc is None or float(val_acc) >= NEAR_CHANCE:
        return False
    log.warning(
        "[rm] held-out accuracy %.3f is near chance (0.5): the reward model has not learned "
        "the ranking and PPO against it would optimise noise. A train loss that stays at "
        "ln 2 = 0.693 means its scores barely differ: try a lower rm.lr or more "
        "rm.max_epochs (benchmarks/rm_features.py shows whether its features collapsed)",
        float(val_acc),
    )
    return True


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
