"""Stage runner for ``label``: K-wise comparisons from the SFT policy and a simulated labeler.

For each comparison prompt, K responses (K drawn from ``[k_min, k_max]``) are sampled from the
SFT policy, scored by the gold judge, and ranked by :class:`SimulatedLabeler` (gold + noise,
calibrated to agree with the gold ordering on ``target_agreement`` of the pairs). The output
folder holds ``comparisons_train.jsonl`` and ``comparisons_val.jsonl`` in the K-wise format.
"""

from __future__ import annotations

import json
import logging
import os
import time

from lit_rlhf.callbacks.hf_export import atomic_output_dir
from lit_rlhf.callbacks.metrics_json import update_metrics_json
from lit_rlhf.data.lm_datamodule import split_train_val
from lit_rlhf.data.records import read_records
from lit_rlhf.eval.gold import GoldJudge
from lit_rlhf.eval.labeler import SimulatedLabeler, build_comparisons, pairwise_agreement
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
from lit_rlhf.rollout.sampling import sample_responses
from lit_rlhf.stages.checks import check_stage_config
from lit_rlhf.stages.context import StageContext

log = logging.getLogger("lit_rlhf")


def run_label(ctx: StageContext, stage: str = "label") -> str:
    """Sample, judge and rank; returns the folder holding the comparison files."""
    lcfg = ctx.cfg["label"]
    check_stage_config(ctx.cfg, stage)
    start = time.perf_counter()
    policy_path = ctx.require("sft", lcfg.get("policy_path"), "label.policy_path")
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, ctx.cfg["model"]["dtype"], 0.0, tokenizer)
    prompts = [
        r["prompt"]
        for r in read_records(
            ctx.data_source("comparison_prompts"), "prompts", ctx.fields, lcfg.get("limit")
        )
    ]
    judge = GoldJudge()
    labeler = SimulatedLabeler(
        target_agreement=lcfg["target_agreement"],
        tie_margin=lcfg["tie_margin"],
        seed=ctx.cfg.get("seed", 0),
    )

    def sample_fn(ps: list[str], ks: list[int]) -> list[list[str]]:
        return sample_responses(
            model,
            tokenizer,
            ps,
            ks,
            lcfg["max_new_tokens"],
            lcfg["temperature"],
            lcfg["batch_size"],
            progress="label: sampling K responses per prompt",
        )

    records = build_comparisons(
        prompts,
        sample_fn,
        judge.score_batch,
        labeler,
        k_min=lcfg["k_min"],
        k_max=lcfg["k_max"],
        seed=ctx.cfg.get("seed", 0),
    )
    train, val = split_train_val(records, lcfg["val_fraction"], ctx.cfg.get("seed", 0))
    agreement = [pairwise_agreement(r["ranks"], r["gold"]) for r in records]
    agree_n = sum(a[1] for a in agreement)
    # InstructGPT reports agreement *between* labelers (~73 %): rank the same responses again
    # with a second, independent labeler of the same noise and compare the two rankings.
    second = SimulatedLabeler(
        target_agreement=lcfg["target_agreement"],
        tie_margin=lcfg["tie_margin"],
        seed=ctx.cfg.get("seed", 0) + 1,
        tau=labeler.tau,
    )
    between = [
        pairwise_agreement(second.rank(r["gold"], r["completions"]), r["ranks"], True)
        for r in records
    ]
    metrics = {
        "label/inter_labeler_agreement": sum(a[0] for a in between)
        / max(1, sum(a[1] for a in between)),
        "label/prompts": len(records),
        "label/responses": sum(len(r["completions"]) for r in records),
        "label/agreement_with_gold": sum(a[0] for a in agreement) / max(1, agree_n),
        "label/gold_pairs": agree_n,
        "label/tau": labeler.tau,
        "label/seconds": time.perf_counter() - start,
    }
    export_dir = ctx.export_dir("label")
    with atomic_output_dir(export_dir, {"stage": "label", "policy": policy_path}) as tmp:
        for name, rows in (("comparisons_train.jsonl", train), ("comparisons_val.jsonl", val)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                for rec in rows:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        update_metrics_json(os.path.join(tmp, "metrics.json"), metrics)
    update_metrics_json(os.path.join(ctx.stage_dir("label"), "metrics.json"), metrics)
    log.info(
        "[label] %d prompts, %d responses, labeler/gold agreement %.3f, inter-labeler %.3f "
        "(tau %.3f) in %.1f s",
        metrics["label/prompts"],
        metrics["label/responses"],
        metrics["label/agreement_with_gold"],
        metrics["label/inter_labeler_agreement"],
        labeler.tau,
        metrics["label/seconds"],
    )
    return export_dir
