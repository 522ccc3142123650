"""Time PPO iterations of TRL 1.0.0's PPOTrainer (trl.experimental.ppo), run with the TRL venv.

Same models (loaded from the shared artifact folder), prompts, batch, response length, epochs
and minibatches as benchmarks/bench_ppo.py. The per-phase split is read by wrapping the
trainer module's own ``batch_generation`` and ``forward`` functions and the optimizer's
``step`` (timestamps only; the wrapped calls are unchanged):

- generation: the ``batch_generation`` call;
- scoring: from its end to the first training forward (log-probs from the sampling logits,
  reference/value/reward forwards, rewards, GAE, whitening);
- optimization: from the first training forward to the last optimizer step;
- other: the rest of the iteration (metrics, logging, ``gc.collect()``, scheduler).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main() -> None:
    args = common.child_args(__doc__)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.precision == "bf16":
        # PPOTrainer builds its own Accelerator without a mixed_precision argument, and
        # transformers 5's TrainingArguments no longer exports bf16=True to the environment,
        # so bf16=True alone runs fp32 (checked: autocast off, fp32 logits). This is what
        # `accelerate launch --mixed_precision bf16` sets.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    common.setup_threads()
    rss_start = common.rss_now_mib()
    import datasets
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rss_import = common.rss_now_mib()
    art = Path(args.artifacts)
    s = common.PPO
    tok = AutoTokenizer.from_pretrained(art / "tokenizer")
    tok.padding_side = "left"  # never used: every prompt has the same length

    policy_dir = art / args.size / ("policy_ragged" if args.ragged else "policy")

    def lm():
        return AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)

    def rm():
        return AutoModelForSequenceClassification.from_pretrained(
            art / args.size / "rm", dtype=torch.float32
        )

    import json

    prompts = [json.loads(line)["prompt"] for line in open(art / "prompts.jsonl")]
    ids = [tok(p, add_special_tokens=False)["input_ids"][-s["prompt_len"] :] for p in prompts]
    train = datasets.Dataset.from_dict({"input_ids": ids})
    n = args.warmup + args.iters

    marks: dict[str, list[float]] = {"gen0": [], "gen1": [], "opt0": [], "optN": []}
    lengths: list[float] = []  # mean response length of each rollout
    checks: dict[str, object] = {}
    orig_generation, orig_forward = ppo_mod.batch_generation, ppo_mod.forward

    def timed_generation(model, queries, *a, **k):
        marks["gen0"].append(time.perf_counter())
        out = orig_generation(model, queries, *a, **k)
        marks["gen1"].append(time.perf_counter())
        resp = out[0][:, queries.shape[1] :]
        checks["query_shape"] = list(queries.shape)
        checks["response_shape"] = list(resp.shape)
        checks["response_eos_or_pad"] = int(
            ((resp == tok.eos_token_id) | (resp == tok.pad_token_id)).sum()
        )
        # Tokens up to and including the first EOS (what the episode keeps).
        eos = resp == tok.eos_token_id
        ends = torch.where(eos.any(1), eos.int().argmax(1) + 1, resp.shape[1])
        lengths.append(float(ends.float().mean()))
        return out

    def timed_forward(model, *a, **k):
        if isinstance(model, ppo_mod.PolicyAndValueWrapper) and len(marks["opt0"]) < len(
            marks["gen1"]
        ):
            marks["opt0"].append(time.perf_counter())
        return orig_forward(model, *a, **k)

    ppo_mod.batch_generation, ppo_mod.forward = timed_generation, timed_forward

    # TRL calls gc.collect() twice per iteration (end of scoring, end of iteration); its cost
    # is part of TRL's iteration and is reported separately for the reader.
    gc_time = [0.0, 0]
    orig_collect = ppo_mod.gc.collect

    def timed_collect(*a, **k):
        t = time.perf_counter()
        try:
            return orig_collect(*a, **k)
        finally:
            gc_time[0] += time.perf_counter() - t
            gc_time[1] += 1

    # The trainer module uses only gc.collect.
    ppo_mod.gc = types.SimpleNamespace(collect=timed_collect)

    clock = common.StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.tick()

    out_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["num_minibatches"],
        num_ppo_epochs=s["ppo_epochs"],
        response_length=s["response_len"],
        total_episodes=s["batch_size"] * n,
        # Fixed lengths: EOS is suppressed, nothing to truncate. Ragged: stop at EOS.
        stop_token="eos" if args.ragged else None,
        missing_eos_penalty=None,
        temperature=s["temperature"],
        learning_rate=common.RAGGED_PPO_LR if args.ragged else s["lr"],
        kl_coef=s["kl_coef"],
        num_sample_generations=0,
        # fp32, no gradient checkpointing (the TRL config defaults are bf16 + checkpointing).
        bf16=args.precision == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=lm(),
        ref_model=lm(),
        reward_model=rm(),
        value_model=rm(),
        train_dataset=train,
        eval_dataset=train.select(range(s["batch_size"])),
        callbacks=[Clock()],
    )
    opt_step = trainer.optimizer.step

    def timed_step(*a, **k):
        result = opt_step(*a, **k)
        marks["optN"].append(time.perf_counter())
        return result

    trainer.optimizer.step = timed_step
    rss_setup = common.rss_now_mib()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0

    epochs_x_mb = s["ppo_epochs"] * s["num_minibatches"]
    ends = clock.ends
    opt_end = marks["optN"][epochs_x_mb - 1 :: epochs_x_mb]
    split_all = {
        "generation": [b - a for a, b in zip(marks["gen0"], marks["gen1"])],
        "scoring": [b - a for a, b in zip(marks["gen1"], marks["opt0"])],
        "optimization": [b - a for a, b in zip(marks["opt0"], opt_end)],
        "other": [b - a for a, b in zip(opt_end, ends)],
    }
    total = common.steady(clock.durations(), args.warmup)
    split = {k: common.steady(v, args.warmup) for k, v in split_all.items()}
    # The time between an iteration's start and its generation (data loading) goes to other.
    starts = [clock.start] + ends[:-1]
    pre = common.steady([g - a for a, g in zip(starts, marks["gen0"])], args.warmup)
    split["other"] = [o + p for o, p in zip(split["other"], pre)]
    checks.update(
        {
            "iterations": len(ends),
            "optimizer_steps": len(marks["optN"]),
            "threads_in_run": torch.get_num_threads(),
            "optimizer": type(trainer.optimizer.optimizer).__name__,
            "optimizer_fused": bool(trainer.optimizer.optimizer.defaults.get("fused")),
            "gc_collect_calls": gc_time[1],
            "response_len_mean": common.steady(lengths, args.warmup),
            "gc_collect_s_per_iter": gc_time[0] / max(1, len(ends)),
        }
    )
    common.write_result(
        args.out,
        {
            "framework": "trl",
            "bench": "ppo_ragged" if args.ragged else "ppo",
            "size": args.size,
            "precision": args.precision,
            "iter_s": total,
            "split_s": split,
            "fit_wall_s": wall,
            "rss_start_mib": rss_start,
            "rss_after_import_mib": rss_import,
            "rss_after_setup_mib": rss_setup,
            "checks": checks,
            "versions": {
                "trl": trl.__version__,
                "transformers": transformers.__version__,
            },
        },
    )


if __name__ == "__main__":
    main()
