"""Time reward-model training steps of lit_rlhf's RewardModule + ComparisonsDataModule.

Pairwise records (K = 2: one pair per prompt), every response exactly ``RM["seq_len"]``
tokens (prompt + completion + EOS); one step scores the 2 x pairs responses in one forward.
``--ragged``: responses of random length (18..64 tokens), packed into padding-free rows (the
kit's default ``rm.padding_free``); ``--kwise``: InstructGPT's K = 4..9 responses per prompt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    args = common.child_args(__doc__)
    common.setup_threads()
    rss_start = common.rss_now_mib()
    import lightning as L
    import torch
    import transformers

    from lit_rlhf.data.comparisons import ComparisonsDataModule
    from lit_rlhf.models.loading import load_sequence_classifier, load_tokenizer
    from lit_rlhf.modules.reward import RewardModule

    transformers.utils.logging.set_verbosity_error()
    rss_import = common.rss_now_mib()
    art = Path(args.artifacts)
    s = common.RM
    L.seed_everything(0, verbose=False)
    tok = load_tokenizer(str(art / "tokenizer"))
    model = load_sequence_classifier(str(art / args.size / "rm"), "float32", tokenizer=tok)
    # HF Trainer defaults on the TRL side: AdamW betas (0.9, 0.999), linear decay, clip 1.0.
    module = RewardModule(
        model, lr=s["lr"], betas=(0.9, 0.999), schedule="linear", min_lr_ratio=0.0
    )
    data = "kwise.jsonl" if args.kwise else "pairs.jsonl"
    data = common.RAGGED_FILES["rm"] if args.ragged else data
    # K-wise: a batch element is one prompt with all its K responses (C(K, 2) pairs).
    dm = ComparisonsDataModule(
        str(art / data),
        max_length=s["seq_len"],
        batch_size=common.RM_KWISE["prompts_per_batch"] if args.kwise else s["pairs_per_batch"],
        val_fraction=0.0,
    ).connect(tok)

    clock = common.StepClock()
    seen = {"rows": 0, "tokens": 0, "max_len": 0, "min_len": 1 << 30}
    pairs_per_step: list[int] = []  # every pair of a prompt's K responses (no ties here)
    rows_per_step: list[int] = []
    lengths_per_step: list[list[int]] = []

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()
            lengths = batch["lengths"]
            lengths_per_step.append(lengths.tolist())
            seen["rows"] += int(lengths.shape[0])
            seen["tokens"] += int(lengths.sum())
            seen["max_len"] = max(seen["max_len"], int(batch["input_ids"].shape[1]))
            seen["min_len"] = min(seen["min_len"], int(lengths.min()))
            k = batch["valid"].sum(-1)
            pairs_per_step.append(int((k * (k - 1) // 2).sum()))
            rows_per_step.append(int(lengths.shape[0]))

    n = args.warmup + args.iters
    trainer = common.bare_trainer(
        Clock(),
        args.precision,
        max_steps=n,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    rss_setup = common.rss_now_mib()
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    wall = time.perf_counter() - t0
    steps = common.steady(clock.durations(), args.warmup)
    pairs = sum(common.steady(pairs_per_step, args.warmup))
    rows = sum(common.steady(rows_per_step, args.warmup))
    timed = common.steady(lengths_per_step, args.warmup)
    tokens = sum(sum(lens) for lens in timed)
    flops = sum(common.real_step_flops(args.size, lens, lm_head=False) for lens in timed)
    bench = "rm_kwise" if args.kwise else "rm_ragged" if args.ragged else "rm"
    common.write_result(
        args.out,
        {
            "framework": "lit_rlhf",
            "bench": bench,
            "size": args.size,
            "precision": args.precision,
            "step_s": steps,
            "pairs_per_step": pairs / len(steps),
            "pairs_per_s": pairs / sum(steps),
            "seqs_per_s": rows / sum(steps),
            "tokens_per_s": tokens / sum(steps),
            "flops_per_s": flops / sum(steps),
            "fit_wall_s": wall,
            "rss_start_mib": rss_start,
            "rss_after_import_mib": rss_import,
            "rss_after_setup_mib": rss_setup,
            "checks": {
                "steps": len(clock.ends),
                "rows_seen": seen["rows"],
                "tokens_seen": seen["tokens"],
                "batch_len_max": seen["max_len"],
                "seq_len_min": seen["min_len"],
                "threads_in_run": torch.get_num_threads(),
                "optimizer": type(trainer.optimizers[0]).__name__,
            },
            "versions": {"lightning": L.__version__, "transformers": transformers.__version__},
        },
    )


if __name__ == "__main__":
    main()
