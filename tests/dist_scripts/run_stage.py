"""Train one stage's module for a few steps under a strategy; save what the tests compare.

    python tests/dist_scripts/run_stage.py --stage sft|rm|ppo --strategy single|ddp_fork|fsdp \
        --workdir DIR [--uneven]

Every run sees the same GLOBAL batch per optimizer step: one process takes it whole, two
processes take half each (SFT and RM through Lightning's gradient accumulation of two
micro-batches, PPO through its own micro-batches), so the trained weights must agree.
``fsdp`` relaunches this script once for rank 1 (Lightning's subprocess launcher, like
``strategy=ddp``), so it runs only as a script, never inside pytest.

Rank 0 writes ``DIR/result.pt``: the full final weights of every sub-model (gathered under
FSDP2), per-step losses of every rank, whether each backward reduced gradients, seconds per
step, the logged metrics, and for PPO what generation did. The HF export goes to
``DIR/export``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)  # one thread per rank; also keeps fork from inheriting a busy pool
# Lightning's parallel strategies reset the thread count to cores / processes unless this is
# set (2 threads on a busy 2-core machine made a 1-process FSDP step 100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from lit_rlhf.callbacks.hf_export import HFExportCallback  # noqa: E402
from lit_rlhf.data.comparisons import ComparisonCollator, encode_comparisons  # noqa: E402
from lit_rlhf.data.lm_tokenize import LMCollator, encode_demonstrations  # noqa: E402
from lit_rlhf.data.ppo_datamodule import PPODataModule  # noqa: E402
from lit_rlhf.models.tiny import build_tiny_causal_lm, tiny_config  # noqa: E402
from lit_rlhf.models.tokenizer import tiny_test_tokenizer  # noqa: E402
from lit_rlhf.modules.ppo import PPOModule  # noqa: E402
from lit_rlhf.modules.reward import RewardModule  # noqa: E402
from lit_rlhf.modules.sft import SFTModule  # noqa: E402
from lit_rlhf.modules.sharding import FSDP2Strategy, unsharded_copy  # noqa: E402
from lit_rlhf.ops.masking import truncate_after_eos  # noqa: E402
from lit_rlhf.rollout import HFGenerateEngine, response_logprobs  # noqa: E402
from lit_rlhf.rollout.packed import PackedRollout  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2)
WORDS = "good bad film plot actor great awful fine slow fun dull story".split()
#: Optimizer steps of every run; global batch sizes (prompts for RM, episodes for PPO).
STEPS = 3
SFT_BATCH, RM_BATCH, PPO_BATCH = 8, 4, 8
PPO_ROLLOUTS = 2  # x ppo_epochs 2 = 4 optimizer steps
#: deepspeed<stage>: GPU only (conf/strategy/deepspeed.yaml with that ZeRO stage).
STRATEGIES = ["single", "ddp_fork", "fsdp", "deepspeed2", "deepspeed3"]
#: Reductions started by gradient syncs in this process (DDP comm hook / FSDP2 reduce-scatter).
REDUCTIONS = [0]


def _counting_allreduce(state, bucket):
    REDUCTIONS[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


def _count_reduce_scatter():
    # FSDP2 looks the collective up at call time; its name changed across torch versions.
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        real = getattr(torch.distributed, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, **kwargs):
            REDUCTIONS[0] += 1
            return _real(*args, **kwargs)

        setattr(torch.distributed, name, counted)


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(n))


def _classifier(tok, seed: int):
    cfg = tiny_config("gpt2", 0, tokenizer=tok, **SMALL)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg)


def _loader(examples: list, global_batch: int, world: int, collate) -> DataLoader:
    """One optimizer step = ``global_batch`` examples, in the order multi-process runs see.

    Lightning always gives a distributed training loader a *shuffling* DistributedSampler
    (seeded by ``PL_GLOBAL_SEED``); rank r takes every world-th index of one permutation. Two
    ranks x two accumulated micro-batches therefore cover the permutation's next
    ``global_batch`` indices per step, which is what the same sampler with one replica gives
    one process.
    """
    if world > 1:
        return DataLoader(examples, batch_size=global_batch // (2 * world), collate_fn=collate)
    sampler = DistributedSampler(examples, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(examples, batch_size=global_batch, sampler=sampler, collate_fn=collate)


def sft_setup(tok, world: int):
    prompts = [f"Review {_text(i, 1 + i % 3)}:" for i in range(SFT_BATCH * STEPS)]
    answers = [_text(i + 7, 2 + i % 4) for i in range(SFT_BATCH * STEPS)]
    examples, _ = encode_demonstrations(tok, prompts, answers, max_length=48)
    # sequence_mean: a mean of equal-sized per-rank means is the global mean (token_mean
    # over ranks with different token counts is not, under any data-parallel strategy).
    module = SFTModule(
        build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL),
        lr=3e-3,
        schedule="constant",
        loss_reduction="sequence_mean",
    )
    loader = _loader(examples, SFT_BATCH, world, LMCollator(pad_token_id=tok.pad_token_id))
    return module, {"train_dataloaders": loader}, 2 if world > 1 else 1


def rm_setup(tok, world: int):
    records = [
        {
            "prompt": f"Rate {_text(i, 2)}:",
            "completions": [_text(i + k, 1 + (i + k) % 4) for k in range(3)],
            "ranks": [(i + k) % 3 for k in range(3)],
        }
        for i in range(RM_BATCH * STEPS)
    ]
    examples, _, _ = encode_comparisons(tok, records, max_length=48)
    module = RewardModule(_classifier(tok, 1), lr=3e-3, schedule="constant")
    # Padding-free, as the rm stage's default: the packed path (position ids, ``ends``, the
    # packed-attention probe) runs under each strategy. These responses are too alike in
    # length to share rows; data that packs makes Adam amplify rounding noise in the
    # loss-invariant final-norm and key biases past WEIGHT_ATOL (layout-dependent rounding;
    # the packed scores themselves equal the padded ones, tests/test_packing.py).
    collate = ComparisonCollator(tok.pad_token_id, padding_free=True)
    loader = _loader(examples, RM_BATCH, world, collate)
    return module, {"train_dataloaders": loader}, 2 if world > 1 else 1


class ScriptedGeneration(HFGenerateEngine):
    """The default engine, recording how it was called and what it returned.

    With ``scripted`` the sampled responses are replaced by a fixed function of each prompt
    (same length for every row), so runs that split a batch differently across ranks see the
    same episodes: sampling noise depends on how rows are batched, the PPO update does not.
    """

    def __init__(self, tok, scripted: bool, force_unsynced: bool = False) -> None:
        self.tok, self.scripted, self.force_unsynced = tok, scripted, force_unsynced
        self.calls: list[dict] = []

    def generate(self, policy, query_ids, query_mask, max_new_tokens, *args):
        synced = args[-1]
        if self.force_unsynced:  # the negative control: what synced_gpus prevents
            args = (*args[:-1], False)
        ro = super().generate(policy, query_ids, query_mask, max_new_tokens, *args)
        self.calls.append(
            {
                "synced_gpus": bool(synced),
                "max_length": int(ro.response_mask.sum(-1).max()),
                "prompts": [q[m.bool()].tolist() for q, m in zip(query_ids, query_mask)],
            }
        )
        if not self.scripted:
            return ro
        last = query_ids[:, -1:]
        steps = torch.arange(max_new_tokens, device=query_ids.device)
        ids = 10 + (last * 7 + steps * 13) % (len(self.tok) - 20)
        ids[:, -1] = self.tok.eos_token_id
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        ro.response_ids, ro.response_mask, ro.has_eos = truncate_after_eos(ids, eos, pad)
        # generate() returns the sampling log-probs of its tokens: those of the scripted ones.
        with torch.no_grad():
            logprobs, _ = response_logprobs(policy, ro, args[0])
        ro.logprobs = logprobs.masked_fill(~ro.response_mask, 0.0)
        return ro


def ppo_setup(tok, world: int, workdir: str, engine: ScriptedGeneration):
    PackedRollout.pays = lambda self, model, lm_head: True  # pack every PPO forward here
    prompts = os.path.join(workdir, "prompts.jsonl")
    texts = os.path.join(workdir, "texts.jsonl")
    with open(prompts, "w") as fh:
        rows = (json.dumps({"prompt": f"Review {i} {_text(i, 2)}:"}) for i in range(32))
        fh.writelines(row + "\n" for row in rows)
    with open(texts, "w") as fh:
        fh.writelines(json.dumps({"text": _text(i, 12)}) + "\n" for i in range(32))
    module = PPOModule(
        build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL),
        _classifier(tok, 1),
        build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL),
        _classifier(tok, 2),
        tok.eos_token_id,
        tok.pad_token_id,
        n_rollouts=PPO_ROLLOUTS,
        ppo_epochs=2,
        num_minibatches=1,  # minibatch = the whole rollout: its split across ranks is fixed
        micro_batch_size=PPO_BATCH // (2 * world),  # two micro-steps per optimizer step
        max_new_tokens=8,
        policy_lr=3e-3,
        value_lr=3e-3,
        warmup_steps=0,
        whiten_advantages=False,  # whitening statistics are per rank by design
        ptx_coef=0.5,
        ptx_reduction="sequence_mean",
        engine=engine,  # the engine seam: no module global is patched
    )
    dm = PPODataModule(
        prompts,
        texts,
        batch_size=PPO_BATCH // world,
        max_prompt_length=16,
        ptx_ratio=1.0,
        ptx_max_length=12,
    ).connect(tok)
    return module, {"datamodule": dm}, 1


class Recorder(L.Callback):
    """Per-step losses, per-backward reductions and step times; writes the result file."""

    def __init__(
        self,
        path: str,
        module: L.LightningModule,
        generation: ScriptedGeneration | None,
        uneven: bool,
    ) -> None:
        self.path, self.generation, self.uneven = path, generation, uneven
        self.initial = {
            name: {k: v.detach().clone() for k, v in getattr(module, name).state_dict().items()}
            for name in module.sharded_attrs
        }
        self.losses: list[float] = []
        self.reduced: list[int] = []
        self.step_seconds: list[float] = []
        self._count = 0

    def on_fit_start(self, trainer, module):
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # Lightning registers comm hooks on CUDA only; gloo runs them too.
            trainer.strategy.model.register_comm_hook(None, _counting_allreduce)

    def on_train_start(self, trainer, module):
        if self.uneven and trainer.global_rank == 0:
            module.hparams.max_new_tokens = 2  # rank 0's responses end long before rank 1's

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.step_seconds.append(time.perf_counter() - self._t0)
        if outputs is not None and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))

    def on_after_backward(self, trainer, module):
        self.reduced.append(REDUCTIONS[0] - self._count)
        self._count = REDUCTIONS[0]

    def on_fit_end(self, trainer, module):
        weights = {}
        for name in module.sharded_attrs:
            full = unsharded_copy(getattr(module, name))  # every rank gathers (FSDP2, ZeRO-3)
            if full is not None:
                weights[name] = {k: v.detach().cpu().clone() for k, v in full.state_dict().items()}
        # Collectives need tensors on the rank's device (NCCL refuses CPU tensors).
        device = trainer.strategy.root_device
        losses = trainer.strategy.all_gather(torch.tensor(self.losses, device=device))
        result = {
            "world_size": trainer.world_size,
            "weights": weights,
            "initial": self.initial,
            "losses": losses.reshape(trainer.world_size, -1).tolist(),
            "reduced_per_backward": self.reduced,
            "step_seconds": self.step_seconds,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
        }
        if isinstance(module, PPOModule):
            local = torch.tensor([h["objective/scores"] for h in module.history], device=device)
            result["local_scores"] = (
                trainer.strategy.all_gather(local).reshape(trainer.world_size, -1).tolist()
            )
            lengths = torch.tensor([c["max_length"] for c in self.generation.calls], device=device)
            result["response_lengths"] = (
                trainer.strategy.all_gather(lengths).reshape(trainer.world_size, -1).tolist()
            )
            result["synced_gpus"] = [c["synced_gpus"] for c in self.generation.calls]
            prompts = [c["prompts"] for c in self.generation.calls]  # [rollout][row]
            if trainer.world_size > 1:
                gathered = [None] * trainer.world_size
                torch.distributed.all_gather_object(gathered, prompts)
                prompts = gathered
            else:
                prompts = [prompts]
            result["prompts"] = prompts  # [rank][rollout][row] token ids
        if trainer.is_global_zero:
            torch.save(result, self.path)
            per_step = _seconds_per_step(self.step_seconds, trainer, module)
            print(f"seconds per optimizer step (median after the first): {per_step:.4f}")


def _seconds_per_step(batch_seconds: list[float], trainer, module) -> float:
    """Median time of an optimizer step, leaving out the first (lazy initialisation)."""
    if isinstance(module, PPOModule):  # one "batch" = one rollout = ppo_epochs steps here
        per = module.hparams.ppo_epochs * module.hparams.num_minibatches
        steps = [t / per for t in batch_seconds]
    else:
        k = trainer.accumulate_grad_batches
        steps = [sum(batch_seconds[i : i + k]) for i in range(0, len(batch_seconds), k)]
    steps = sorted(steps[1:] or steps)
    return steps[len(steps) // 2]


def _deepspeed_from_yaml(stage: int):
    import yaml
    from lightning.pytorch.strategies import DeepSpeedStrategy

    path = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "strategy", "deepspeed.yaml")
    with open(path) as fh:
        config = yaml.safe_load(fh)["strategy"]["config"]
    config["zero_optimization"]["stage"] = stage
    return DeepSpeedStrategy(config=config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["sft", "rm", "ppo"], required=True)
    parser.add_argument(
        "--strategy",
        choices=["single", "ddp_fork", "fsdp", "deepspeed2", "deepspeed3"],
        required=True,
    )
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--devices", type=int, help="default: 1 for single, else 2")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--uneven", action="store_true", help="PPO: rank 0 stops generating early")
    parser.add_argument("--unsynced", action="store_true", help="PPO: force synced_gpus off")
    parser.add_argument("--steps", type=int, help="optimizer steps (PPO: rollouts); for timing")
    args = parser.parse_args()
    global STEPS, PPO_ROLLOUTS
    if args.steps:
        STEPS = PPO_ROLLOUTS = args.steps
    os.makedirs(args.workdir, exist_ok=True)
    world = args.devices or (1 if args.strategy == "single" else 2)
    L.seed_everything(0, verbose=False)
    tok = tiny_test_tokenizer()

    generation = None
    if args.stage == "sft":
        module, fit_kwargs, accumulate = sft_setup(tok, world)
    elif args.stage == "rm":
        module, fit_kwargs, accumulate = rm_setup(tok, world)
    else:
        generation = ScriptedGeneration(tok, not args.uneven, args.unsynced)
        module, fit_kwargs, accumulate = ppo_setup(tok, world, args.workdir, generation)

    backend = "gloo" if args.accelerator == "cpu" else None
    if args.strategy == "single":
        strategy = "auto"
    elif args.strategy == "ddp_fork":
        strategy = DDPStrategy(start_method="fork", process_group_backend=backend)
    elif args.strategy == "fsdp":
        _count_reduce_scatter()
        strategy = FSDP2Strategy(block_classes=["GPT2Block"], process_group_backend=backend)
    else:  # GPU only: the shipped conf/strategy/deepspeed.yaml at ZeRO stage 2 or 3
        strategy = _deepspeed_from_yaml(stage=int(args.strategy[-1]))
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices or world,
        strategy=strategy,
        max_epochs=1 if args.stage != "ppo" else -1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            Recorder(os.path.join(args.workdir, "result.pt"), module, generation, args.uneven),
            HFExportCallback(os.path.join(args.workdir, "export"), tok),
        ],
    )
    trainer.fit(module, **fit_kwargs)


if __name__ == "__main__":
    sys.exit(main())
