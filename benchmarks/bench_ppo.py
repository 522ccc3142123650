"""Time PPO iterations of lit_rlhf's PPOModule (one process, one size).

``--ragged``: the policy whose responses end at random lengths (``policy_ragged``), so the
scoring and training forwards run padding-free (the kit's default ``ppo.padding_free``).

Run by run_all.py; standalone:
    python benchmarks/bench_ppo.py --size 1m --artifacts benchmarks/.cache/artifacts --out r.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build(args, n_rollouts: int):
    """The PPOModule, datamodule and tokenizer of the benchmark (shared with profile_ppo.py)."""
    from lit_rlhf.data.ppo_datamodule import PPODataModule
    from lit_rlhf.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
    from lit_rlhf.modules.ppo import PPOModule

    # The kit's own loaders (what its stages use), so load-time choices of the kit count.
    art = Path(args.artifacts)
    tok = load_tokenizer(str(art / "tokenizer"))

    # --ragged: the policy whose responses end at random lengths (artifacts.RAGGED_EOS_PROB).
    policy_dir = art / args.size / ("policy_ragged" if getattr(args, "ragged", False) else "policy")

    def lm():
        return load_causal_lm(str(policy_dir), "float32", tokenizer=tok)

    def rm():
        return load_sequence_classifier(str(art / args.size / "rm"), "float32", tokenizer=tok)

    s = common.PPO
    module = PPOModule(
        policy=lm(),
        value_model=rm(),
        ref_model=lm(),
        reward_model=rm(),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        n_rollouts=n_rollouts,
        ppo_epochs=s["ppo_epochs"],
        num_minibatches=s["num_minibatches"],
        temperature=s["temperature"],
        max_new_tokens=s["response_len"],
        kl_coef=s["kl_coef"],
        # ppo_ragged: lr 0 on both sides (see common.RAGGED_PPO_LR).
        policy_lr=common.RAGGED_PPO_LR if getattr(args, "ragged", False) else s["lr"],
        value_lr=common.RAGGED_PPO_LR if getattr(args, "ragged", False) else s["lr"],
        # TRL's PPOTrainer does not clip gradients; equal work.
        max_grad_norm=None,
    )
    dm = PPODataModule(
        str(art / "prompts.jsonl"),
        batch_size=s["batch_size"],
        max_prompt_length=s["prompt_len"],
    ).connect(tok)
    return module, dm, tok


def main() -> None:
    args = common.child_args(__doc__)
    common.setup_threads()
    rss_start = common.rss_now_mib()
    import lightning as L
    import torch
    import transformers

    import lit_rlhf  # noqa: F401

    transformers.utils.logging.set_verbosity_error()
    rss_import = common.rss_now_mib()
    n = args.warmup + args.iters
    L.seed_everything(0, verbose=False)
    module, dm, _ = build(args, n)

    clock = common.StepClock()

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick()

    trainer = common.bare_trainer(Clock(), args.precision, max_epochs=-1)
    rss_setup = common.rss_now_mib()
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    wall = time.perf_counter() - t0

    hist = module.history
    total = common.steady(clock.durations(), args.warmup)
    split = {
        k: common.steady([h[f"time/{k}"] for h in hist], args.warmup)
        for k in ("generation", "scoring", "optimization")
    }
    split["other"] = [t - sum(split[k][i] for k in split) for i, t in enumerate(total)]
    ro = module.last_rollout
    common.write_result(
        args.out,
        {
            "framework": "lit_rlhf",
            "bench": "ppo_ragged" if args.ragged else "ppo",
            "size": args.size,
            "precision": args.precision,
            "iter_s": total,
            "split_s": split,
            "fit_wall_s": wall,
            "rss_start_mib": rss_start,
            "rss_after_import_mib": rss_import,
            "rss_after_setup_mib": rss_setup,
            "checks": {
                "query_shape": list(ro.query_ids.shape),
                "response_shape": list(ro.response_ids.shape),
                "response_tokens_min": int(ro.response_mask.sum(-1).min()),
                "response_len_mean": common.steady(
                    [h["rollout/response_length"] for h in hist], args.warmup
                ),
                "query_pad_tokens": int((ro.query_mask == 0).sum()),
                "iterations": len(hist),
                "threads_in_run": torch.get_num_threads(),
            },
            "versions": {
                "lightning": L.__version__,
                "transformers": transformers.__version__,
            },
        },
    )


if __name__ == "__main__":
    main()
