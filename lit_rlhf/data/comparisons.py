"""Comparison data for the reward model, batched the InstructGPT way.

A batch element is ONE prompt with ALL its K ranked responses (K may vary between prompts);
the reward model scores every response of a batch in one forward and the loss compares all
untied pairs of each prompt (:func:`~lit_rlhf.ops.ranking.kwise_ranking_loss`). Batch size
therefore counts prompts: InstructGPT used 64 prompts, i.e. up to 64 x C(9, 2) = 2,304 pairs.

Records are K-wise ``{"prompt", "completions": [...], "ranks": [...]}`` (0 = best, equal ranks
tie) or pairwise ``{"prompt", "chosen", "rejected"}`` (read as K = 2). An optional ``gold``
list (one number per completion, higher = better) travels with a record so the validation
loop can also measure agreement with a gold ordering (the embedded world's label stage writes
it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.lm_datamodule import split_train_val
from lit_rlhf.data.lm_tokenize import TruncationStats, encode_demonstrations, pack_batch
from lit_rlhf.data.records import DataFormatError, read_records

log = logging.getLogger("lit_rlhf")


def count_untied_pairs(ranks: Sequence[int]) -> int:
    """Number of response pairs of one prompt whose ranks differ (the pairs the loss uses)."""
    counts: dict[int, int] = {}
    for r in ranks:
        counts[r] = counts.get(r, 0) + 1
    n = len(ranks)
    return n * (n - 1) // 2 - sum(c * (c - 1) // 2 for c in counts.values())


def read_comparisons_with_gold(
    source: str, fields: Mapping[str, str] | None = None, limit: int | None = None
) -> list[dict]:
    """Read K-wise or pairwise comparisons, keeping an optional per-completion ``gold`` list.

    The same reader as :func:`~lit_rlhf.data.records.read_records` with kind
    ``"comparisons"``, which validates ``gold`` (one finite number per completion).

    Args:
        source: ``.jsonl``/``.json``/``.parquet`` file or HF dataset name.
        fields: Canonical-to-source field names, e.g. ``{"chosen": "preferred"}``.
        limit: Read at most this many records.

    Returns:
        ``{"prompt", "completions", "ranks"}`` records, plus ``"gold"`` where the source has it.

    Raises:
        DataFormatError: naming the file, line and field of the first malformed record.
    """
    return read_records(source, "comparisons", fields, limit)


def encode_comparisons(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping], max_length: int
) -> tuple[list[dict], TruncationStats, int]:
    """Tokenize comparison records into one example per prompt.

    Each response becomes ``prompt ids + completion ids + EOS`` under the demonstrations'
    truncation policy (the response is kept, the prompt is cut from the left). Records whose
    responses all tie carry no pair to learn from and are dropped (counted).

    Args:
        tokenizer: Any HF tokenizer (no special tokens added besides the appended EOS).
        records: Records from :func:`read_comparisons_with_gold`.
        max_length: Longest prompt+response sequence in tokens.

    Returns:
        ``(examples, stats, dropped_all_tied)``; an example is ``{"input_ids": [K lists],
        "ranks": [K ints]}`` plus ``"gold"`` when the record has it. ``stats`` counts responses.
    """
    kept = [r for r in records if count_untied_pairs(r["ranks"]) > 0]
    dropped = len(records) - len(kept)
    if not kept:
        return [], TruncationStats(), dropped
    prompts = [r["prompt"] for r in kept for _ in r["completions"]]
    completions = [c for r in kept for c in r["completions"]]
    # One tokenizer call for all responses: the fast tokenizer batches internally.
    rows, stats = encode_demonstrations(tokenizer, prompts, completions, max_length)
    examples, start = [], 0
    for rec in kept:
        k = len(rec["completions"])
        example = {
            "input_ids": [row["input_ids"] for row in rows[start : start + k]],
            "ranks": list(rec["ranks"]),
        }
        if "gold" in rec:
            example["gold"] = list(rec["gold"])
        examples.append(example)
        start += k
    return examples, stats, dropped


class ComparisonCollator:
    """Collate prompt groups into one flat batch of responses.

    Output for P prompts with at most ``Kmax`` responses and N responses in total:

    - ``input_ids``, ``attention_mask``: ``(N, T)``, one row per response (right padded);
    - padding-free instead: ``input_ids`` and ``position_ids`` ``(R, W)``, the responses
      packed into R rows (:func:`~lit_rlhf.data.lm_tokenize.pack_batch`; position ids
      restart per response),
      ``attention_mask`` None and ``ends`` ``(N,)``, the flat index ``row * W + column``
      of each response's last token;
    - ``lengths``: ``(N,)`` tokens of each response row;
    - ``ranks``: ``(P, Kmax)`` long, ``valid``: ``(P, Kmax)`` bool (slot holds a response);
    - ``index``: ``(P, Kmax)`` long, the response (0..N-1) of each slot (0 in empty slots);
    - ``gold`` ``(P, Kmax)`` float and ``has_gold`` ``(P,)`` bool when any example has gold.

    Args:
        pad_token_id: Id written into padding positions (never read: the mask decides).
        padding_free: Pack the responses (no forward compute on padding).
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False) -> None:
        self.pad_token_id = int(pad_token_id)
        self.padding_free = padding_free

    def _padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor | None]:
        n, longest = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @staticmethod
    def _packed(rows: list[list[int]]) -> dict[str, torch.Tensor | None]:
        packed, bins = pack_batch([{"input_ids": ids} for ids in rows])
        width = max(len(r["input_ids"]) for r in packed)
        input_ids = torch.zeros((len(packed), width), dtype=torch.long)
        position_ids = torch.zeros((len(packed), width), dtype=torch.long)
        ends = torch.zeros(len(rows), dtype=torch.long)
        for r, (row, members) in enumerate(zip(packed, bins)):
            used = len(row["input_ids"])
            input_ids[r, :used] = torch.tensor(row["input_ids"], dtype=torch.long)
            position_ids[r, :used] = torch.tensor(row["position_ids"], dtype=torch.long)
            # The never-read tail: as in LMCollator (position 0, not the pad id).
            input_ids[r, used:] = input_ids[r, 0]
            offset = r * width
            for i in members:
                offset += len(rows[i])
                ends[i] = offset - 1
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": None,
            "ends": ends,
        }

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor | None]:
        rows = [ids for ex in examples for ids in ex["input_ids"]]
        batch = self._packed(rows) if self.padding_free else self._padded(rows)
        batch["lengths"] = torch.tensor([len(r) for r in rows], dtype=torch.long)
        p, kmax = len(examples), max(len(ex["input_ids"]) for ex in examples)
        ranks = torch.zeros((p, kmax), dtype=torch.long)
        valid = torch.zeros((p, kmax), dtype=torch.bool)
        index = torch.zeros((p, kmax), dtype=torch.long)
        row = 0
        for j, ex in enumerate(examples):
            k = len(ex["input_ids"])
            ranks[j, :k] = torch.tensor(ex["ranks"], dtype=torch.long)
            valid[j, :k] = True
            index[j, :k] = torch.arange(row, row + k)
            row += k
        batch.update(ranks=ranks, valid=valid, index=index)
        if any("gold" in ex for ex in examples):
            gold = torch.zeros((p, kmax), dtype=torch.float32)
            has_gold = torch.zeros(p, dtype=torch.bool)
            for j, ex in enumerate(examples):
                if "gold" in ex:
                    gold[j, : len(ex["gold"])] = torch.tensor(ex["gold"], dtype=torch.float32)
                    has_gold[j] = True
            batch["gold"], batch["has_gold"] = gold, has_gold
        return batch


class ComparisonsDataModule(L.LightningDataModule):
    """K-wise (or pairwise) comparisons, one prompt with all its responses per batch element.

    Args:
        train_source: File path or HF dataset name of the training comparisons.
        val_source: Separate validation comparisons; when None, ``val_fraction`` of the
            training records (whole prompts) is held out.
        fields: Canonical-to-source field-name mapping.
        max_length: Longest prompt+response in tokens (the prompt is cut from the left).
        batch_size: Prompts per training batch (InstructGPT: 64).
        eval_batch_size: Prompts per validation batch (defaults to ``batch_size``).
        val_fraction: Share of prompts held out when ``val_source`` is None.
        padding_free: Pack each batch's responses into rows (no forward compute on padding;
            the same scores up to float rounding). Needs a model whose attention follows
            restarting position ids (checked by :class:`~lit_rlhf.modules.reward.RewardModule`).
        num_workers: DataLoader workers.
        seed: Seed of the split and the shuffling.
        limit: Read at most this many records per source.
    """

    def __init__(
        self,
        train_source: str,
        val_source: str | None = None,
        fields: dict[str, str] | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        padding_free: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size (prompts per batch) must be >= 1, got {batch_size}")
        self.train_source, self.val_source = train_source, val_source
        self.fields = dict(fields or {})
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.padding_free = padding_free
        self.seed, self.limit = seed, limit
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.val_records: list[dict] = []
        self.dropped_all_tied = 0
        self.truncation = TruncationStats()

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> ComparisonsDataModule:
        """Give the DataModule its tokenizer (before ``setup``); returns self."""
        self.tokenizer = tokenizer
        return self

    def _encode(self, records: list[dict], source: str) -> list[dict]:
        examples, stats, dropped = encode_comparisons(self.tokenizer, records, self.max_length)
        for key, value in vars(stats).items():
            setattr(self.truncation, key, getattr(self.truncation, key) + value)
        self.dropped_all_tied += dropped
        if dropped and not examples:
            raise DataFormatError(
                f"{source}: all {len(records)} records rank every response as a tie; the "
                "reward model needs at least one pair with different ranks"
            )
        if dropped:
            log.warning(
                "%s: dropped %d of %d records whose responses all tie (no pair to learn from)",
                source,
                dropped,
                len(records),
            )
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("call datamodule.connect(tokenizer) before setup()")
        if self.train_examples:
            return
        records = read_comparisons_with_gold(self.train_source, self.fields, self.limit)
        if self.val_source:
            train = records
            val = read_comparisons_with_gold(self.val_source, self.fields, self.limit)
        else:
            train, val = split_train_val(records, self.val_fraction, self.seed)
        self.dropped_all_tied, self.truncation = 0, TruncationStats()
        self.train_examples = self._encode(train, str(self.train_source))
        self.val_records = val
        val_name = str(self.val_source or self.train_source)
        self.val_examples = self._encode(val, val_name) if val else []
        if self.truncation.prompts_cut or self.truncation.responses_cut:
            log.warning(
                "comparisons truncated to max_length=%d: %d prompts cut on the left, "
                "%d responses cut on the right (%d over-long ones cut by characters before "
                "tokenization)",
                self.max_length,
                self.truncation.prompts_cut,
                self.truncation.responses_cut,
                self.truncation.chars_cut,
            )

    @property
    def train_pairs(self) -> int:
        """Untied training pairs (what one epoch of the loss compares)."""
        return sum(count_untied_pairs(ex["ranks"]) for ex in self.train_examples)

    @property
    def val_pairs(self) -> int:
        """Untied validation pairs."""
        return sum(count_untied_pairs(ex["ranks"]) for ex in self.val_examples)

    def stats(self) -> dict[str, float]:
        """Data counts for ``metrics.json``."""
        return {
            "rm/prompts_train": float(len(self.train_examples)),
            "rm/prompts_val": float(len(self.val_examples)),
            "rm/pairs_train": float(self.train_pairs),
            "rm/pairs_val": float(self.val_pairs),
            "rm/dropped_all_tied": float(self.dropped_all_tied),
            **self.truncation.as_metrics(),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_examples,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=ComparisonCollator(self.tokenizer.pad_token_id, self.padding_free),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_examples,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=ComparisonCollator(self.tokenizer.pad_token_id, self.padding_free),
            num_workers=self.num_workers,
        )
