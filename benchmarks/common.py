"""Shared pieces of the speed benchmarks: settings, sizes, memory/timing helpers, FLOP formulas.

This module must import with only the standard library and torch, because the TRL-side
scripts (``trl_side/*.py``) run it under the separate TRL virtualenv, where ``lit_rlhf`` is
not installed. :func:`build_artifacts` (run once, with the kit's own interpreter) imports the
kit lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"

#: Threads per measurement (the reference machine has 2 cores).
THREADS = 2

#: Model shapes. GPT-2 blocks; the vocabulary (512) and positions (64) are shared.
SIZES = {
    "1m": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
    "20m": {"hidden_size": 512, "num_layers": 6, "num_heads": 8},
}
VOCAB_SIZE = 512
MAX_POSITIONS = 64

#: Precisions a measurement can run in: fp32, or bf16 mixed precision (autocast, fp32 master
#: weights) switched on the way each framework's users do it.
PRECISIONS = ("fp32", "bf16")

#: The work measured, identical on both sides (see README "Equal work").
PPO = {
    "batch_size": 16,  # prompts (= episodes) per rollout
    "prompt_len": 16,  # every prompt is exactly this many tokens: no padding anywhere
    "response_len": 24,  # EOS and pad are suppressed in sampling: always 24 tokens
    "ppo_epochs": 4,
    "num_minibatches": 1,
    "lr": 3e-6,
    "temperature": 1.0,
    "kl_coef": 0.05,
}
SFT = {"batch_size": 16, "seq_len": 64, "prompt_len": 16, "lr": 1e-4}
RM = {"pairs_per_batch": 8, "seq_len": 64, "prompt_len": 16, "lr": 1e-4}
#: InstructGPT's comparison data: K = 4..9 ranked responses per prompt, C(K, 2) pairs each.
#: lit_rlhf trains on the K-wise records (one forward per response, every pair of a prompt in
#: one batch element); TRL's RewardTrainer takes pairs, so it gets the same pairs expanded.
RM_KWISE = {"k_min": 4, "k_max": 9, "prompts_per_batch": 2, "n_prompts": 256}
#: Variable-length data (``--ragged``): the SFT/RM prompts as above, each completion (or
#: chosen/rejected response) 1 .. seq_len - prompt_len - 1 tokens, uniformly; sequences are
#: 18..64 tokens with EOS. TRL pads each batch to its longest; lit_rlhf packs it.
RAGGED_FILES = {"sft": "demos_ragged.jsonl", "rm": "pairs_ragged.jsonl"}
#: ppo_ragged's learning rate, both sides. At PPO["lr"] the updates shorten the sampled
#: responses within a few iterations, at a different pace in each kit (measured: mean 5.4
#: vs 9.4 tokens at 1M), which would time different work; at 0 every forward, backward and
#: optimizer step still runs and both sample from policy_ragged's own length distribution.
RAGGED_PPO_LR = 0.0


# ----------------------------------------------------------------------------- process setup
def setup_threads(n: int = THREADS) -> None:
    """Pin torch's intra-/inter-op thread pools (call before any heavy torch work)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def rss_now_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_args(description: str) -> argparse.Namespace:
    """The command line every measurement script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--artifacts", required=True, help="folder written by build_artifacts")
    p.add_argument("--warmup", type=int, default=2, help="iterations/steps not timed")
    p.add_argument("--iters", type=int, default=5, help="timed iterations/steps")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument(
        "--kwise",
        action="store_true",
        help="RM only: InstructGPT's K-wise comparison data (RM_KWISE) instead of pairs",
    )
    p.add_argument(
        "--ragged",
        action="store_true",
        help="SFT/RM only: variable-length sequences (RAGGED_FILES) instead of fixed 64 tokens",
    )
    p.add_argument("--bench", default=None, help="bench_bare.py only: sft, rm or ppo")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16 = bf16 autocast with fp32 weights (each framework's own bf16 switch)",
    )
    return p.parse_args()


def write_result(path: str | os.PathLike, result: dict) -> None:
    """Write one measurement's JSON (adds peak RSS and process facts)."""
    import torch

    result.setdefault("peak_rss_mib", peak_rss_mib())
    result["threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    result["python"] = sys.version.split()[0]
    result["loadavg_end"] = os.getloadavg()[0]
    Path(path).write_text(json.dumps(result, indent=1))


def bare_trainer(callback, precision: str = "fp32", **kwargs):
    """A one-CPU Lightning Trainer with nothing but ``callback``: no logger, checkpoints,
    progress bar or model summary, so only the training work is timed. ``precision`` is a
    :data:`PRECISIONS` entry (bf16 = Lightning's ``bf16-mixed``)."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        **kwargs,
    )


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def steady(xs: list[float], warmup: int) -> list[float]:
    """Drop the first ``warmup`` entries (compilation of kernels, allocator growth)."""
    return list(xs[warmup:])


class StepClock:
    """Timestamps of step ends; step ``i`` lasts from end ``i - 1`` (or the start) to end ``i``.

    Measuring end-to-end between consecutive step ends charges every per-step cost of the
    framework (data loading, hooks, logging, optimizer, scheduler) to the step.
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.ends: list[float] = []

    def begin(self) -> None:
        self.start = time.perf_counter()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        marks = [self.start] + self.ends
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def counting_collate(collate, lengths_out: list[list[int]], keys: tuple[str, ...] = ("input_ids",)):
    """Wrap a collate function to record each batch's sequence lengths (before padding).

    ``keys`` name the per-example token lists (TRL's reward data: chosen and rejected ids).
    """

    def collate_and_count(examples):
        lengths_out.append([len(ex[k]) for ex in examples for k in keys])
        return collate(examples)

    return collate_and_count


# ----------------------------------------------------------------------------- FLOP formulas
def model_dims(size: str) -> dict[str, int]:
    s = SIZES[size]
    return {"L": s["num_layers"], "d": s["hidden_size"], "V": VOCAB_SIZE}


def param_counts(size: str) -> dict[str, int]:
    """GPT-2 parameter counts: per block 12 d^2 + 13 d, final LayerNorm, tied embeddings."""
    m = model_dims(size)
    d, n_layers = m["d"], m["L"]
    blocks = n_layers * (12 * d * d + 13 * d) + 2 * d
    embed = VOCAB_SIZE * d + MAX_POSITIONS * d
    return {"non_embedding": blocks, "embedding": embed, "total": blocks + embed}


def forward_flops(size: str, n_seq: int, seq_len: int, lm_positions: int) -> float:
    """FLOPs of one forward over ``n_seq`` full sequences of ``seq_len`` tokens.

    Per token ``2 * 12 L d^2`` (the block matmuls), per sequence ``4 L d T^2`` (QK^T and AV
    of dense T x T attention) and ``2 d V`` per position that goes through the LM head
    (``lm_positions`` per sequence; 0 for backbone-only reward/value forwards). Norms,
    softmax, GELU, embeddings and the scalar heads are left out (< 1 %).
    """
    m = model_dims(size)
    n_layers, d, vocab = m["L"], m["d"], m["V"]
    per_seq = (
        2 * 12 * n_layers * d * d * seq_len
        + 4 * n_layers * d * seq_len * seq_len
        + 2 * d * vocab * lm_positions
    )
    return float(n_seq * per_seq)


def generation_flops(size: str, n_seq: int, prompt_len: int, new_tokens: int) -> float:
    """Sampling with a KV cache: a prefill of the prompt, then one token per step.

    Block matmuls for ``prompt_len + new_tokens - 1`` tokens, the LM head on ``new_tokens``
    positions, and attention of each new query against its growing context.
    """
    m = model_dims(size)
    n_layers, d, vocab = m["L"], m["d"], m["V"]
    tokens = prompt_len + new_tokens - 1
    attn_pairs = prompt_len * prompt_len + sum(prompt_len + i for i in range(1, new_tokens))
    per_seq = 2 * 12 * n_layers * d * d * tokens + 4 * n_layers * d * attn_pairs
    per_seq += 2 * d * vocab * new_tokens
    return float(n_seq * per_seq)


def ppo_iteration_flops(size: str) -> dict[str, float]:
    """Useful FLOPs of one PPO iteration (the same count for both frameworks).

    Generation; scoring = reference (LM head on the R response positions), value and reward
    forwards (the sampling policy's log-probs can be read from the sampling pass, as TRL
    does, so a separate policy forward is not counted as useful); optimisation =
    ``ppo_epochs`` x (policy + value) x 3 (forward + backward = 3 forwards).
    """
    b, q, r = PPO["batch_size"], PPO["prompt_len"], PPO["response_len"]
    t = q + r
    gen = generation_flops(size, b, q, r)
    score = forward_flops(size, b, t, r) + 2 * forward_flops(size, b, t, 0)
    opt = PPO["ppo_epochs"] * 3 * (forward_flops(size, b, t, r) + forward_flops(size, b, t, 0))
    return {"generation": gen, "scoring": score, "optimization": opt, "total": gen + score + opt}


def real_step_flops(size: str, lengths: list[int], lm_head: bool) -> float:
    """Forward + backward FLOPs of one step over sequences of these lengths, padding excluded."""
    return sum(3 * forward_flops(size, 1, n, n if lm_head else 0) for n in lengths)
