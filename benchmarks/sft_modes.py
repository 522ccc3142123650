"""Which mode did an SFT model land in? A diagnostic for the weak-SFT start of the RM plateau.

Samples one response per eval prompt from each policy export and prints, per export:

- ``gold``: mean gold score (:class:`~lit_rlhf.eval.gold.GoldJudge`), overall and per split
  (seen frames, held-out frames, held-out aspects);
- ``sentiment right`` / ``wrong``: share of responses whose VADER sentiment, signed by the
  requested one, is above 0.05 / below -0.05 (a weak SFT often ignores the cue);
- ``mentions aspect``: share of responses naming the requested aspect.

Example (the measurement in docs/results.md)::

    python benchmarks/sft_modes.py --prompts $LIT_RLHF_HOME/data/embedded-*/prompts_eval.jsonl \
        $LIT_RLHF_HOME/exports/sft-<hash>
"""

from __future__ import annotations

import argparse
import json

import torch

from lit_rlhf.data.review_world import mentions_aspect, parse_instruction
from lit_rlhf.eval.gold import GoldJudge, vader_compound
from lit_rlhf.eval.policy_eval import sample_with_kl
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer


def _mean(values, keep) -> float:
    kept = [v for v, k in zip(values, keep) if k]
    return sum(kept) / len(kept) if kept else float("nan")


def describe(export: str, records: list[dict], seed: int) -> dict[str, float]:
    """Gold per split, sentiment-right/wrong shares and aspect-mention share of one export."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(export)
    policy = load_causal_lm(export)
    prompts = [r["prompt"] for r in records]
    responses = sample_with_kl(policy, tokenizer, prompts).responses
    gold = GoldJudge()(prompts, responses)
    parsed = [parse_instruction(p) for p in prompts]
    signed = [s * vader_compound(r) for (s, _), r in zip(parsed, responses)]
    every = [True] * len(records)
    seen = [not r.get("heldout_frame") and not r.get("heldout_aspect") for r in records]
    return {
        "gold": _mean(gold, every),
        "gold seen": _mean(gold, seen),
        "gold heldout frames": _mean(gold, [bool(r.get("heldout_frame")) for r in records]),
        "gold heldout aspects": _mean(gold, [bool(r.get("heldout_aspect")) for r in records]),
        "sentiment right": _mean([v > 0.05 for v in signed], every),
        "sentiment wrong": _mean([v < -0.05 for v in signed], every),
        "mentions aspect": _mean(
            [mentions_aspect(r, a) for (_, a), r in zip(parsed, responses)], every
        ),
    }


def main() -> None:
    """Parse arguments and print one line per export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="policy export folders (SFT, PPO, ...)")
    parser.add_argument("--prompts", required=True, help="the world's prompts_eval.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for export in args.exports:
        stats = describe(export, records, args.seed)
        print(export, "  ".join(f"{k} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
