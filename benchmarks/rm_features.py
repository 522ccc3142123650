"""Is a reward model's last-token feature alive? A diagnostic for the RM "chance plateau".

Scores held-out comparisons with an RM export and prints, per export:

- ``feature sd``: per-dimension standard deviation of the backbone's last-token state across
  responses, averaged over dimensions (a collapsed backbone gives nearly the same vector
  for every response, so no head on top can rank them);
- ``units ever on`` / ``units on``: for an MLP score head, the share of its ReLU units that
  fire for at least one response, and the mean share firing per response (equal values mean
  each unit is on for every response or for none: the head sees a constant);
- ``score sd`` and ``acc``: the spread of the scores and the pairwise agreement with the
  records' ranks.

Example (the measurement in docs/results.md)::

    python benchmarks/rm_features.py --comparisons <label export>/comparisons_val.jsonl \
        <rm export at rm.lr=1e-3> <rm export at rm.lr=3e-4>
"""

from __future__ import annotations

import argparse

import torch

from lit_rlhf.data.comparisons import (
    ComparisonCollator,
    encode_comparisons,
    read_comparisons_with_gold,
)
from lit_rlhf.models.heads import MLPScoreHead, apply_score_head, backbone_hidden, score_head
from lit_rlhf.models.loading import load_sequence_classifier, load_tokenizer
from lit_rlhf.modules.reward import grouped_rewards
from lit_rlhf.ops.masking import last_true_index
from lit_rlhf.ops.ranking import pairwise_accuracy


@torch.no_grad()
def describe(export: str, records: list[dict], max_length: int) -> dict[str, float]:
    """Feature spread, head activity, score spread and accuracy of one RM export."""
    tokenizer = load_tokenizer(export)
    model = load_sequence_classifier(export, tokenizer=tokenizer).eval()
    examples, _, _ = encode_comparisons(tokenizer, records, max_length)
    batch = ComparisonCollator(tokenizer.pad_token_id)(examples)
    hidden = backbone_hidden(model, batch["input_ids"], batch["attention_mask"])
    last = last_true_index(batch["attention_mask"].bool()).clamp(min=0)
    pooled = hidden[torch.arange(hidden.shape[0]), last]  # (N, H)
    scores = apply_score_head(model, pooled)  # (N,)
    rewards = grouped_rewards(scores, batch["index"], batch["valid"])
    correct, pairs = pairwise_accuracy(rewards, batch["ranks"], batch["valid"])
    out = {
        "feature sd": pooled.std(0).mean().item(),
        "score sd": scores.std().item(),
        "acc": (correct.float() / pairs.clamp(min=1)).item(),
    }
    head = score_head(model)
    if isinstance(head, MLPScoreHead):
        on = head.proj(pooled) > 0  # (N, hidden)
        out["units ever on"] = on.any(0).float().mean().item()
        out["units on"] = on.float().mean().item()
    return out


def main() -> None:
    """Parse arguments and print one line per export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="RM export folders")
    parser.add_argument("--comparisons", required=True, help="held-out comparisons .jsonl")
    parser.add_argument("--records", type=int, default=60, help="records to score")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    records = read_comparisons_with_gold(args.comparisons, limit=args.records)
    for export in args.exports:
        stats = describe(export, records, args.max_length)
        print(export, "  ".join(f"{k} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
