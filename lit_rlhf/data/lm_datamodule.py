"""DataModules for language-model training: demonstrations (SFT) and pretraining text.

Both receive the tokenizer late through :meth:`LMDataModule.connect`, so the same object works
from Hydra, from a script or from another project.
"""

from __future__ import annotations

import logging
import random

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.lm_tokenize import (
    LMCollator,
    TruncationStats,
    encode_demonstrations,
    encode_texts,
    pack_examples,
)
from lit_rlhf.data.records import DataFormatError, read_records

log = logging.getLogger("lit_rlhf")


def split_train_val(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``val_fraction`` of ``records`` (at least one when > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * val_fraction))) if val_fraction > 0 else 0
    if n_val >= len(records):
        raise DataFormatError(
            f"only {len(records)} records: too few to hold out a validation split; "
            "give a separate val file or lower val_fraction"
        )
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


class LMDataModule(L.LightningDataModule):
    """Tokenized, dynamically padded (optionally packed) language-model batches.

    Args:
        train_source: File path or HF dataset name of the training records.
        val_source: Separate validation records; when None, ``val_fraction`` of the training
            records is held out.
        kind: ``"demonstrations"`` (loss on completion tokens) or ``"pretrain"`` (all tokens).
        fields: Canonical-to-source field-name mapping, e.g. ``{"completion": "response"}``.
        max_length: Longest sequence in tokens (see the truncation policy in
            :func:`~lit_rlhf.data.lm_tokenize.encode_demonstrations`).
        batch_size: Sequences (or packed rows) per training batch.
        eval_batch_size: Per validation batch (defaults to ``batch_size``).
        val_fraction: Share held out when ``val_source`` is None.
        packing: Concatenate examples into ``max_length`` rows with per-example position ids
            (fewer, fuller rows per step: ``batch_size`` then counts rows).
        padding_free: Pack each batch's own examples into rows as wide as its longest one
            (or twice that; :func:`~lit_rlhf.data.lm_tokenize.pack_batch`): the same
            examples per step and the same token-mean loss, without compute on padding.
            Needs a model whose attention follows restarting position ids (checked by the
            modules).
        num_workers: DataLoader workers.
        seed: Seed of the split and of the shuffling.
        limit: Read at most this many records per source (quick experiments).
    """

    def __init__(
        self,
        train_source: str,
        val_source: str | None = None,
        kind: str = "demonstrations",
        fields: dict[str, str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        packing: bool = False,
        padding_free: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("demonstrations", "pretrain"):
            raise ValueError(f"kind must be 'demonstrations' or 'pretrain', got {kind!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.train_source, self.val_source, self.kind = train_source, val_source, kind
        self.fields = dict(fields or {})
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.packing = val_fraction, packing
        self.padding_free = padding_free
        self.num_workers, self.seed, self.limit = num_workers, seed, limit
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.truncation = TruncationStats()

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> LMDataModule:
        """Give the DataModule its tokenizer (before ``setup``); returns self."""
        self.tokenizer = tokenizer
        return self

    def _encode(self, records: list[dict]) -> list[dict]:
        if self.kind == "demonstrations":
            examples, stats = encode_demonstrations(
                self.tokenizer,
                [r["prompt"] for r in records],
                [r["completion"] for r in records],
                self.max_length,
            )
        else:
            examples, stats = encode_texts(
                self.tokenizer, [r["text"] for r in records], self.max_length
            )
        for key, value in vars(stats).items():
            setattr(self.truncation, key, getattr(self.truncation, key) + value)
        return pack_examples(examples, self.max_length) if self.packing else examples

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("call datamodule.connect(tokenizer) before setup()")
        if self.train_examples:
            return
        records = read_records(self.train_source, self.kind, self.fields, self.limit)
        if self.val_source:
            train, val = records, read_records(self.val_source, self.kind, self.fields, self.limit)
        else:
            train, val = split_train_val(records, self.val_fraction, self.seed)
        self.truncation = TruncationStats()
        self.train_examples = self._encode(train)
        self.val_examples = self._encode(val) if val else []
        t = self.truncation
        if t.prompts_cut or t.responses_cut or t.chunks:
            log.warning(
                "truncation (max_length=%d): %d prompts cut on the left (%d tokens), %d responses "
                "cut on the right (%d tokens), %d extra chunks from long texts; %d over-long "
                "prompts/responses were cut by characters before tokenization (their token "
                "counts cover only what was tokenized), %d long texts tokenized in pieces",
                self.max_length,
                t.prompts_cut,
                t.prompt_tokens_cut,
                t.responses_cut,
                t.response_tokens_cut,
                t.chunks,
                t.chars_cut,
                t.texts_split,
            )

    def _collator(self) -> LMCollator:
        return LMCollator(
            pad_token_id=self.tokenizer.pad_token_id,
            packed=self.packing,
            padding_free=self.padding_free,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_examples,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_examples,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
        )


class DemonstrationsDataModule(LMDataModule):
    """``{"prompt", "completion"}`` records; loss on completion tokens (+ EOS) only."""

    def __init__(self, train_source: str, **kwargs) -> None:
        super().__init__(train_source, kind="demonstrations", **kwargs)


class PretrainDataModule(LMDataModule):
    """``{"text"}`` records; loss on every token. Packing is on by default (short texts)."""

    def __init__(self, train_source: str, packing: bool = True, **kwargs) -> None:
        super().__init__(train_source, kind="pretrain", packing=packing, **kwargs)
