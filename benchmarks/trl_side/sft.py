"""Time SFT steps of TRL 1.0.0's SFTTrainer on the shared demonstrations (TRL venv).

Prompt-completion records (loss on completion + EOS, as lit_rlhf), batch and length as
benchmarks/bench_sft.py (``--ragged``: variable lengths, which TRL's default collator pads
to each batch's longest; tokens/s counts real tokens); the precision of ``--precision`` and
no gradient checkpointing (TRL's config default, which would change the work). Everything
else is TRL's default (fused AdamW, gradient clipping at 1.0, per-step entropy/accuracy
metrics, logging every 10 steps).
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rss_import = common.rss_now_mib()
    art = Path(args.artifacts)
    s = common.SFT
    tok = AutoTokenizer.from_pretrained(art / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(art / args.size / "policy", dtype=torch.float32)
    data = common.RAGGED_FILES["sft"] if args.ragged else "demos.jsonl"
    records = [json.loads(line) for line in open(art / data)]
    train = datasets.Dataset.from_list(records)

    clock = common.StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.tick()

    n = args.warmup + args.iters
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_sft_"),
        per_device_train_batch_size=s["batch_size"],
        max_length=s["seq_len"],
        max_steps=n,
        learning_rate=s["lr"],
        completion_only_loss=True,
        packing=False,
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
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[Clock()]
    )
    lengths_per_step: list[list[int]] = []  # real tokens of each example, batch by batch
    trainer.data_collator = common.counting_collate(trainer.data_collator, lengths_per_step)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    loss_tokens = [sum(m) for m in trainer.train_dataset["completion_mask"]]
    rss_setup = common.rss_now_mib()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = common.steady(clock.durations(), args.warmup)
    timed = common.steady(lengths_per_step[: len(clock.ends)], args.warmup)
    tokens = sum(sum(lens) for lens in timed)
    flops = sum(common.real_step_flops(args.size, lens, lm_head=True) for lens in timed)
    common.write_result(
        args.out,
        {
            "framework": "trl",
            "bench": "sft_ragged" if args.ragged else "sft",
            "size": args.size,
            "precision": args.precision,
            "step_s": steps,
            "tokens_per_step": tokens / len(steps),
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
                "loss_tokens_per_example": sorted(set(loss_tokens)),
                "threads_in_run": torch.get_num_threads(),
                "optimizer": type(trainer.optimizer.optimizer).__name__,
                "optimizer_fused": bool(trainer.optimizer.optimizer.defaults.get("fused")),
            },
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        },
    )


if __name__ == "__main__":
    main()
