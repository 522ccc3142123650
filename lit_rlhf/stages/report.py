"""Stage runners for ``eval`` (gold-judge evaluation + report) and ``pipeline`` (everything)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from lit_rlhf.callbacks.metrics_json import update_metrics_json
from lit_rlhf.data.comparisons import read_comparisons_with_gold
from lit_rlhf.data.records import read_records
from lit_rlhf.eval.gold import GoldJudge
from lit_rlhf.eval.policy_eval import lm_loss_on_texts, sample_with_kl
from lit_rlhf.eval.report import print_table, training_warnings, write_report
from lit_rlhf.eval.splits import heldout_labeler_agreement, policy_split_metrics, read_split_flags
from lit_rlhf.eval.stats import mean_ci, win_rate
from lit_rlhf.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
from lit_rlhf.modules.reward import score_pairs
from lit_rlhf.ops.ranking import pairwise_accuracy
from lit_rlhf.stages.checks import check_stage_config
from lit_rlhf.stages.context import ConfigError, StageContext
from lit_rlhf.stages.registry import pipeline_stages

log = logging.getLogger("lit_rlhf")

POLICIES = ("base", "sft", "ppo", "ppo_ptx")
_STAGE_OF = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}


def _policy_path(ctx: StageContext, name: str) -> str:
    ecfg = ctx.cfg["eval"]
    given = ecfg.get(f"{name}_path")
    if name == "base" and not given and not ctx.uses_embedded_tokenizer():
        return ctx.cfg["model"]["name_or_path"]
    return ctx.require(_STAGE_OF[name], given, f"eval.{name}_path")


def _rm_accuracy(ctx: StageContext, rm_path: str, tokenizer, metrics: dict) -> None:
    """Held-out pairwise accuracy of the RM against the labels and against gold."""
    ecfg = ctx.cfg["eval"]
    source = ctx.cfg["data"].get("comparisons_val")
    fields = ctx.fields if source else {}
    label_dir = None
    if not source:
        if ctx.cfg["data"].get("comparisons"):
            return
        label_dir = ctx.require("label")
        source = os.path.join(label_dir, "comparisons_val.jsonl")
    raw = read_comparisons_with_gold(source, fields)
    rm = load_sequence_classifier(rm_path, "float32", 0.0, tokenizer)
    prompts = [r["prompt"] for r in raw for _ in r["completions"]]
    comps = [c for r in raw for c in r["completions"]]
    scores = score_pairs(rm, tokenizer, prompts, comps, batch_size=ecfg["batch_size"]).tolist()
    # One (P, K_max) batch: labels give the ranks, gold scores (negated: 0 = best) the gold
    # order; float64 keeps distinct gold scores distinct.
    p, k_max = len(raw), max(len(r["completions"]) for r in raw)
    rewards, ranks, gold = (torch.zeros(p, k_max, dtype=torch.float64) for _ in range(3))
    valid = torch.zeros(p, k_max, dtype=torch.bool)
    has_gold = torch.tensor(["gold" in r for r in raw]).unsqueeze(-1)
    pos = 0
    for row, r in enumerate(raw):
        k = len(r["completions"])
        rewards[row, :k] = torch.tensor(scores[pos : pos + k], dtype=torch.float64)
        ranks[row, :k] = torch.tensor(r["ranks"], dtype=torch.float64)
        if "gold" in r:
            gold[row, :k] = -torch.tensor(r["gold"], dtype=torch.float64)
        valid[row, :k] = True
        pos += k
    ok_l, n_l = (int(x) for x in pairwise_accuracy(rewards, ranks, valid))
    ok_g, n_g = (int(x) for x in pairwise_accuracy(rewards, gold, valid & has_gold))
    metrics["eval/rm/acc_labels"] = ok_l / max(1, n_l)
    metrics["eval/rm/pairs"] = n_l
    if n_g:
        metrics["eval/rm/acc_gold"] = ok_g / n_g
    label_metrics = os.path.join(label_dir or "", "metrics.json")
    if label_dir and os.path.isfile(label_metrics) and all("gold" in r for r in raw):
        with open(label_metrics, encoding="utf-8") as fh:
            tau = json.load(fh)["label/tau"]
        # A labeler who ranked none of the training data: its own seed, the same noise.
        seed = int(ctx.cfg.get("seed", 0)) + 7919
        metrics.update(heldout_labeler_agreement(raw, scores, tau, seed))


def run_eval(ctx: StageContext, stage: str = "eval") -> str:
    """Evaluate base/SFT/PPO/PPO-ptx with the gold judge; write report.md, metrics.json, plots."""
    ecfg = ctx.cfg["eval"]
    unknown = set(ecfg["policies"]) - set(POLICIES)
    if unknown or "sft" not in ecfg["policies"]:
        raise ConfigError(
            f"eval.policies must include 'sft' and only {POLICIES}; got {ecfg['policies']}"
        )
    start = time.perf_counter()
    out_dir = ctx.stage_dir(stage) if ctx.cfg["stage"]["name"] != "pipeline" else ctx.run_dir
    paths = {name: _policy_path(ctx, name) for name in ecfg["policies"]}
    tokenizer = load_tokenizer(paths["sft"])
    prompts_source = ctx.data_source("eval_prompts")
    prompts = [
        r["prompt"]
        for r in read_records(prompts_source, "prompts", ctx.fields, ecfg.get("n_prompts"))
    ]
    splits = read_split_flags(prompts_source, prompts)
    texts = [
        r["text"]
        for r in read_records(
            ctx.data_source("pretrain_val"), "pretrain", ctx.fields, ecfg.get("n_texts")
        )
    ]
    judge = GoldJudge()
    reference = load_causal_lm(paths["sft"], "float32", 0.0, tokenizer)
    rm_path = ecfg.get("rm_path") or ctx.require("rm", None)
    rm = load_sequence_classifier(rm_path, "float32", 0.0, tokenizer)
    metrics: dict[str, float] = {}
    gold: dict[str, list[float]] = {}
    responses: dict[str, list[str]] = {}
    for name, path in paths.items():
        torch.manual_seed(ctx.cfg.get("seed", 0))  # same sampling noise for every policy
        policy = reference if name == "sft" else load_causal_lm(path, "float32", 0.0, tokenizer)
        samples = sample_with_kl(
            policy,
            tokenizer,
            prompts,
            reference,
            ecfg["max_new_tokens"],
            ecfg["temperature"],
            ecfg["batch_size"],
            desc=f"eval: sampling {name}",
        )
        gold[name] = judge.score_batch(prompts, samples.responses)
        responses[name] = samples.responses
        mean, lo, hi = mean_ci(gold[name])
        rm_scores = score_pairs(
            rm, tokenizer, prompts, samples.responses, batch_size=ecfg["batch_size"]
        )
        metrics.update(
            {
                f"eval/{name}/gold": mean,
                f"eval/{name}/gold_lo": lo,
                f"eval/{name}/gold_hi": hi,
                f"eval/{name}/rm_score": float(rm_scores.mean()),
                f"eval/{name}/kl_to_sft": sum(samples.kl) / len(samples.kl),
                f"eval/{name}/response_length": sum(samples.lengths) / len(samples.lengths),
                f"eval/{name}/lm_loss": lm_loss_on_texts(
                    policy, tokenizer, texts, batch_size=ecfg["batch_size"]
                ),
            }
        )
        if ecfg.get("n_examples"):
            metrics_examples = [
                {"prompt": p, "response": r, "gold": g}
                for p, r, g in zip(prompts[: ecfg["n_examples"]], samples.responses, gold[name])
            ]
            with open(os.path.join(out_dir, f"samples_{name}.json"), "w") as fh:
                json.dump(metrics_examples, fh, indent=1)
    for name in gold:
        sft_gold = gold["sft"] if name in ("ppo", "ppo_ptx") else None
        metrics.update(
            policy_split_metrics(name, prompts, responses[name], gold[name], sft_gold, splits)
        )
        if name in ("ppo", "ppo_ptx"):
            rate, lo, hi = win_rate(gold[name], gold["sft"])
            metrics.update(
                {
                    f"eval/{name}/win_rate_vs_sft": rate,
                    f"eval/{name}/win_rate_lo": lo,
                    f"eval/{name}/win_rate_hi": hi,
                }
            )
    if "ppo" in gold and "ppo_ptx" in gold:
        regression = metrics["eval/ppo/lm_loss"] - metrics["eval/sft/lm_loss"]
        gain = metrics["eval/ppo/gold"] - metrics["eval/sft/gold"]
        if regression > 0:
            metrics["eval/ptx/regression_recovered"] = (
                metrics["eval/ppo/lm_loss"] - metrics["eval/ppo_ptx/lm_loss"]
            ) / regression
        if gain > 0:
            metrics["eval/ptx/gain_kept"] = (
                metrics["eval/ppo_ptx/gold"] - metrics["eval/sft/gold"]
            ) / gain
    _rm_accuracy(ctx, rm_path, tokenizer, metrics)
    metrics["eval/seconds"] = time.perf_counter() - start
    update_metrics_json(os.path.join(out_dir, "metrics.json"), metrics)
    histories = {}
    for name in ("ppo", "ppo_ptx"):
        hist = os.path.join(paths.get(name, ""), "history.json")
        if name in paths and os.path.isfile(hist):
            histories[name] = json.load(open(hist))
    warnings = training_warnings({**paths, "rm": rm_path})
    for line in warnings:
        log.warning("[eval] %s", line)
    write_report(out_dir, metrics, histories, paths, rm_path, warnings)
    print_table(metrics)
    log.info("[eval] report: %s", os.path.join(out_dir, "report.md"))
    return out_dir


def run_pipeline(ctx: StageContext, stage: str = "pipeline") -> str:
    """The whole recipe: each stage is built unless its output exists for this config."""
    start = time.perf_counter()
    steps = list(ctx.cfg["stage"].get("stages") or pipeline_stages())
    unknown = [s for s in steps if s not in pipeline_stages()]
    if unknown:
        raise ConfigError(
            f"stage.stages has {unknown}: choose from {pipeline_stages()} "
            "(lit_rlhf/stages/registry.py)"
        )
    # Settings that no stage could run with stop the pipeline before pretrain trains.
    for step in steps:
        check_stage_config(ctx.cfg, step)
    timings = {}
    for step in steps:
        if step == "pretrain" and not ctx.uses_embedded_tokenizer():
            continue
        if step == "label" and ctx.cfg["data"].get("comparisons"):
            continue
        t = time.perf_counter()
        if step == "eval":
            run_eval(ctx, "eval")
        else:
            ctx.require(step)
        timings[f"pipeline/seconds_{step}"] = time.perf_counter() - t
    timings["pipeline/seconds_total"] = time.perf_counter() - start
    update_metrics_json(os.path.join(ctx.run_dir, "metrics.json"), timings)
    log.info(
        "[pipeline] finished in %.1f s; run dir: %s", timings["pipeline/seconds_total"], ctx.run_dir
    )
    return ctx.run_dir
