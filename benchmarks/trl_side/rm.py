"""Time reward-model steps of TRL 1.0.0's RewardTrainer on the shared pairs (TRL venv).

Explicit-prompt ``{"prompt", "chosen", "rejected"}`` records; TRL appends EOS and scores the
chosen and rejected halves in one forward, like lit_rlhf. fp32, no gradient checkpointing;
everything else is TRL's default (fused AdamW, clipping at 1.0, per-step reward metrics).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main() -> None:
    args = common.child_args(__doc__)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    common.setup_threads()
    rss_start = common.rss_now_mib()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rss_import = common.rss_now_mib()
    art = Path(args.artifacts)
    s = common.RM
    tok = AutoTokenizer.from_pretrained(art / "tokenizer")
    model = AutoModelForSequenceClassification.from_pretrained(
        art / args.size / "rm", dtype=torch.float32
    )
    # K-wise comparisons reach TRL as their expanded pairs (its data format).
    data = "kwise_pairs.jsonl" if args.kwise else "pairs.jsonl"
    data = common.RAGGED_FILES["rm"] if args.ragged else data  # padded to each batch's longest
    records = [json.loads(line) for line in open(art / data)]
    train = datasets.Dataset.from_list(records)

    clock = common.StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.tick()

    n = args.warmup + args.iters
    config = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_rm_"),
        per_device_train_batch_size=s["pairs_per_batch"],
        max_length=s["seq_len"],
        max_steps=n,
        learning_rate=s["lr"],
        bf16=args.precision == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[Clock()]
    )
    lengths_per_step: list[list[int]] = []  # real tokens of each response, batch by batch
    trainer.data_collator = common.counting_collate(
        trainer.data_collator, lengths_per_step, ("chosen_ids", "rejected_ids")
    )
    lengths = [len(x) for x in trainer.train_dataset["chosen_ids"]]
    lengths += [len(x) for x in trainer.train_dataset["rejected_ids"]]
    rss_setup = common.rss_now_mib()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = common.steady(clock.durations(), args.warmup)
    pairs = s["pairs_per_batch"]
    timed = common.steady(lengths_per_step[: len(clock.ends)], args.warmup)
    tokens = sum(sum(lens) for lens in timed)
    flops = sum(common.real_step_flops(args.size, lens, lm_head=False) for lens in timed)
    common.write_result(
        args.out,
        {
            "framework": "trl",
            "bench": "rm_kwise" if args.kwise else "rm_ragged" if args.ragged else "rm",
            "size": args.size,
            "precision": args.precision,
            "step_s": steps,
            "pairs_per_step": pairs,
            "pairs_per_s": pairs * len(steps) / sum(steps),
            "seqs_per_s": 2 * pairs * len(steps) / sum(steps),
            "tokens_per_s": tokens / sum(steps),
            "flops_per_s": flops / sum(steps),
            "fit_wall_s": wall,
            "rss_start_mib": rss_start,
            "rss_after_import_mib": rss_import,
            "rss_after_setup_mib": rss_setup,
            "checks": {
                "steps": len(clock.ends),
                "tokens_seen": int(trainer._total_train_tokens),
                "seq_len_min": min(lengths),
                "seq_len_max": max(lengths),
                "threads_in_run": torch.get_num_threads(),
                "optimizer": type(trainer.optimizer.optimizer).__name__,
                "optimizer_fused": bool(trainer.optimizer.optimizer.defaults.get("fused")),
            },
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        },
    )


if __name__ == "__main__":
    main()
