"""Time SFT training steps of lit_rlhf's SFTModule + DemonstrationsDataModule (one process).

Every demonstration is exactly ``SFT["seq_len"]`` tokens (prompt + completion + EOS), so a
batch carries no padding and tokens/s counts the same tokens on both sides. With
``--ragged`` lengths vary (18..64 tokens); tokens/s then counts real tokens only, and the
batches are padding-free (the kit's default ``sft.padding_free``).
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

    from lit_rlhf.data.lm_datamodule import DemonstrationsDataModule
    from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
    from lit_rlhf.modules.sft import SFTModule

    transformers.utils.logging.set_verbosity_error()
    rss_import = common.rss_now_mib()
    art = Path(args.artifacts)
    s = common.SFT
    L.seed_everything(0, verbose=False)
    tok = load_tokenizer(str(art / "tokenizer"))
    model = load_causal_lm(str(art / args.size / "policy"), "float32", tokenizer=tok)
    # HF Trainer defaults on the TRL side: AdamW betas (0.9, 0.999), linear decay, clip 1.0.
    module = SFTModule(model, lr=s["lr"], betas=(0.9, 0.999), schedule="linear", min_lr_ratio=0.0)
    dm = DemonstrationsDataModule(
        str(art / (common.RAGGED_FILES["sft"] if args.ragged else "demos.jsonl")),
        max_length=s["seq_len"],
        batch_size=s["batch_size"],
        val_fraction=0.0,
        padding_free=True,
    ).connect(tok)
    lengths_per_step: list[list[int]] = []  # real tokens of each example, batch by batch
    make_collator = dm._collator
    dm._collator = lambda: common.counting_collate(make_collator(), lengths_per_step)

    clock = common.StepClock()
    seen: dict[str, int] = {"tokens": 0, "max_len": 0, "min_len": 1 << 30, "loss_tokens": 0}

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()
            lengths = lengths_per_step[len(clock.ends) - 1]
            seen["tokens"] += sum(lengths)
            seen["max_len"] = max(seen["max_len"], int(batch["input_ids"].shape[1]))
            seen["min_len"] = min(seen["min_len"], min(lengths))
            seen["loss_tokens"] += int(batch["loss_mask"][:, 1:].sum())

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
    timed = common.steady(lengths_per_step[: len(clock.ends)], args.warmup)
    tokens = sum(sum(lens) for lens in timed)
    flops = sum(common.real_step_flops(args.size, lens, lm_head=True) for lens in timed)
    common.write_result(
        args.out,
        {
            "framework": "lit_rlhf",
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
                "tokens_seen": seen["tokens"],
                "batch_len_max": seen["max_len"],
                "seq_len_min": seen["min_len"],
                "loss_tokens": seen["loss_tokens"],
                "threads_in_run": torch.get_num_threads(),
                "optimizer": type(trainer.optimizers[0]).__name__,
            },
            "versions": {"lightning": L.__version__, "transformers": transformers.__version__},
        },
    )


if __name__ == "__main__":
    main()
