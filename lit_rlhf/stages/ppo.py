"""Stage runner for ``ppo`` and ``ppo_ptx`` (PPO with the pretraining mix)."""

from __future__ import annotations

import logging
import os
import time

from lit_rlhf.callbacks.finite_guard import TrainingGuardError
from lit_rlhf.callbacks.gold_tracking import GoldTrackingCallback
from lit_rlhf.callbacks.hf_export import HFExportCallback
from lit_rlhf.callbacks.metrics_json import MetricsJSONCallback, update_metrics_json
from lit_rlhf.callbacks.rollout_checkpoint import RolloutCheckpoint
from lit_rlhf.data.ppo_datamodule import PPODataModule
from lit_rlhf.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.rollout import NonFiniteSamplingError
from lit_rlhf.stages.checks import check_stage_config
from lit_rlhf.stages.context import ConfigError, StageContext

log = logging.getLogger("lit_rlhf")

#: ppo.* keys passed straight to PPOModule.
MODULE_KEYS = (
    "n_rollouts",
    "ppo_epochs",
    "num_minibatches",
    "micro_batch_size",
    "temperature",
    "max_new_tokens",
    "kl_coef",
    "kl_estimator",
    "kl_target",
    "kl_horizon",
    "missing_eos_score",
    "missing_eos_penalty",
    "reward_scaling",
    "score_clip",
    "gamma",
    "lam",
    "whiten_advantages",
    "advantage_estimator",
    "group_size",
    "clip_range",
    "value_clip_range",
    "vf_coef",
    "policy_lr",
    "value_lr",
    "weight_decay",
    "adam_eps",
    "schedule",
    "warmup_steps",
    "warmup_start_ratio",
    "max_grad_norm",
    "ema_decay",
    "synced_gpus",
    "padding_free",
)


def check_same_vocabulary(policy_tok, policy_path: str, others: dict[str, str]) -> None:
    """Every model of PPO reads the policy's token ids, so all must share its vocabulary.

    Args:
        policy_tok: The policy's tokenizer.
        policy_path: Where the policy comes from (for the message).
        others: ``{role: folder}`` of the reference, value and reward models.
    """
    vocab = policy_tok.get_vocab()
    for role, path in others.items():
        if path == policy_path:
            continue
        other = load_tokenizer(path)
        if other.get_vocab() != vocab:
            raise ConfigError(
                f"tokenizer mismatch: the policy ('{policy_path}', {len(policy_tok)} tokens) and "
                f"the {role} ('{path}', {len(other)} tokens) use different vocabularies; train "
                f"every model of the run from the same SFT model, or pass a matching {role}"
            )


def run_ppo(ctx: StageContext, stage: str = "ppo") -> str:
    """Fine-tune the SFT policy with PPO against the RM; ``stage="ppo_ptx"`` adds the ptx term."""
    pcfg = ctx.cfg["ppo"]
    ptx_on = stage == "ppo_ptx"
    # 0. Validate the config before loading anything.
    check_stage_config(ctx.cfg, stage)
    resume = ctx.resume_path(stage, "ppo")
    ptx = pcfg["ptx"]
    if ptx_on and (ptx["ratio"] <= 0 or ptx["coef"] <= 0):
        raise ConfigError("PPO-ptx needs ppo.ptx.ratio > 0 and ppo.ptx.coef > 0")

    # 1. Inputs: upstream exports (built first when missing on the embedded default).
    policy_path = ctx.require("sft", pcfg.get("policy_path"), "ppo.policy_path")
    ref_path = (
        ctx.require("sft", pcfg.get("ref_path"), "ppo.ref_path")
        if pcfg.get("ref_path")
        else policy_path
    )
    reward_path = ctx.require("rm", pcfg.get("reward_path"), "ppo.reward_path")
    value_path = (
        ctx.require("rm", pcfg.get("value_path"), "ppo.value_path")
        if pcfg.get("value_path")
        else reward_path
    )
    pretrain_source = ctx.data_source("pretrain") if ptx_on else None

    # 2. Models: dropout off everywhere; policy/value trainable, reference/RM frozen.
    tokenizer = load_tokenizer(policy_path)
    check_same_vocabulary(
        tokenizer,
        policy_path,
        {"reference model": ref_path, "value model": value_path, "reward model": reward_path},
    )
    dtype = ctx.cfg["model"]["dtype"]
    module = PPOModule(
        policy=load_causal_lm(policy_path, dtype, 0.0, tokenizer),
        value_model=load_sequence_classifier(value_path, dtype, 0.0, tokenizer),
        ref_model=load_causal_lm(ref_path, dtype, 0.0, tokenizer),
        reward_model=load_sequence_classifier(reward_path, dtype, 0.0, tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        ptx_coef=ptx["coef"] if ptx_on else 0.0,
        ptx_reduction=ptx["reduction"],
        **{k: pcfg[k] for k in MODULE_KEYS if k in pcfg},
    )
    dm = PPODataModule(
        ctx.data_source("prompts"),
        pretrain_source=pretrain_source,
        fields=ctx.fields,
        batch_size=pcfg["batch_size"],
        max_prompt_length=pcfg["max_prompt_length"],
        ptx_ratio=ptx["ratio"] if ptx_on else 0.0,
        ptx_max_length=ptx["max_length"],
        seed=ctx.cfg.get("seed", 0),
        limit=pcfg.get("limit"),
        group_size=pcfg.get("group_size", 1),
    ).connect(tokenizer)

    # 3. Train: one Lightning "batch" per rollout; the module stops after n_rollouts.
    stage_dir = ctx.stage_dir(stage)
    export_dir = ctx.export_dir(stage)
    start = time.perf_counter()

    def extras() -> dict:
        # Written into the export before its marker: a folder with a marker has all of them.
        extra = {
            f"{stage}/seconds": time.perf_counter() - start,
            f"{stage}/seconds_per_rollout": (time.perf_counter() - start)
            / max(1, module.rollouts_done),
            "data/prompts_cut": dm.prompts_cut,
            "data/prompts_chars_cut": dm.prompts_chars_cut,
        }
        metrics = update_metrics_json(os.path.join(stage_dir, "metrics.json"), extra)
        return {"metrics.json": metrics, "history.json": module.history}

    checkpoints = RolloutCheckpoint(ctx.checkpoint_dir(stage), pcfg.get("checkpoint_every", 0))
    callbacks = [
        checkpoints,
        ctx.guard(stage),
        MetricsJSONCallback(stage_dir),
        HFExportCallback(
            export_dir, tokenizer, info={"stage": stage, "run_dir": stage_dir}, extras=extras
        ),
    ]
    if ctx.uses_embedded_world_data("prompts") and pcfg.get("track_gold", True):
        from lit_rlhf.eval.gold import GoldJudge

        callbacks.append(GoldTrackingCallback(GoldJudge().score_batch, tokenizer))
    # The rollout "dataloader" is endless; limiting it to n_rollouts gives the progress bar
    # its total (the module stops itself at n_rollouts either way).
    run_length = {"max_epochs": -1, "max_steps": -1, "limit_train_batches": pcfg["n_rollouts"]}
    trainer = ctx.make_trainer(stage_dir, {**pcfg, **run_length}, callbacks)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    except NonFiniteSamplingError as err:  # the policy overflowed: say where, in one line
        raise TrainingGuardError(
            f"[{stage}] rollout {module.rollouts_done + 1}: {err} (ppo.policy_lr="
            f"{pcfg['policy_lr']:g}); nothing was exported"
        ) from None
    seconds = time.perf_counter() - start
    log.info(
        "[%s] %d rollouts in %.1f s; export: %s", stage, module.rollouts_done, seconds, export_dir
    )
    return export_dir
