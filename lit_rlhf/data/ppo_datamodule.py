"""Prompts (and the pretraining mix for PPO-ptx) for PPO rollouts.

The batch of rollout ``k`` is a pure function of ``k``, the seed and the rank: prompts are
visited in a seeded permutation per pass, so resuming only needs the rollout counter that
the PPO module checkpoints, and every rank of a distributed run gets different prompts.
"""

from __future__ import annotations

import itertools
import random

import lightning as L
import torch
from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.lm_tokenize import LMCollator, encode_texts, left_pad, tokenize_capped
from lit_rlhf.data.records import DataFormatError, read_records


class _RolloutTicker(IterableDataset):
    """Yields 0, 1, 2, ... forever; the PPO module fetches the real batch by its own counter."""

    def __iter__(self):
        return itertools.count()


class PPODataModule(L.LightningDataModule):
    """Prompt batches for rollouts, plus pretraining batches when ``ptx_ratio > 0``.

    Args:
        prompts_source: ``{"prompt"}`` records (file or HF dataset).
        pretrain_source: ``{"text"}`` records for PPO-ptx (required when ``ptx_ratio > 0``).
        fields: Field-name mapping for user data.
        batch_size: Prompts per rollout per process (episodes per rollout = batch_size x ranks).
        max_prompt_length: Prompts longer than this keep their last tokens (counted).
        ptx_ratio: Pretraining examples per RL episode (InstructGPT: 8); 0 disables ptx.
        ptx_max_length: Tokens per pretraining example (longer texts are chunked).
        seed: Seed of the prompt and pretraining orders.
        limit: Read at most this many records per source.
        group_size: Samples per prompt K: a rollout holds ``batch_size / K`` prompts, each in
            K consecutive rows (the group of GRPO/RLOO); 1 for PPO with a critic.
    """

    def __init__(
        self,
        prompts_source: str,
        pretrain_source: str | None = None,
        fields: dict[str, str] | None = None,
        batch_size: int = 32,
        max_prompt_length: int = 64,
        ptx_ratio: float = 0.0,
        ptx_max_length: int = 64,
        seed: int = 0,
        limit: int | None = None,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        if group_size < 1 or batch_size % group_size:
            raise ValueError(
                f"ppo.batch_size ({batch_size}) must be a multiple of ppo.group_size "
                f"({group_size}): each prompt is sampled group_size times"
            )
        self.group_size = group_size
        if ptx_ratio < 0:
            raise ValueError(f"ptx_ratio must be >= 0, got {ptx_ratio}")
        if ptx_ratio > 0 and not pretrain_source:
            raise DataFormatError(
                "PPO-ptx is on (ptx_ratio > 0) but no pretraining data was given; set "
                'data.pretrain=<{"text"} file> or turn ptx off (ppo.ptx.enabled=false)'
            )
        self.prompts_source, self.pretrain_source = prompts_source, pretrain_source
        self.fields = dict(fields or {})
        self.batch_size, self.max_prompt_length = batch_size, max_prompt_length
        self.ptx_ratio, self.ptx_max_length = ptx_ratio, ptx_max_length
        self.seed, self.limit = seed, limit
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.prompts: list[list[int]] = []
        self.ptx_examples: list[dict] = []
        self.prompts_cut = self.prompts_chars_cut = 0
        self.rank, self.world_size = 0, 1
        self._orders: dict[tuple[int, int, int], list[int]] = {}

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> PPODataModule:
        """Give the DataModule its tokenizer (before ``setup``); returns self."""
        self.tokenizer = tokenizer
        return self

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("call datamodule.connect(tokenizer) before setup()")
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.prompts:
            return
        records = read_records(self.prompts_source, "prompts", self.fields, self.limit)
        ids, self.prompts_chars_cut = tokenize_capped(
            self.tokenizer, [r["prompt"] for r in records], self.max_prompt_length, keep="end"
        )
        self.prompts_cut = sum(len(p) > self.max_prompt_length for p in ids)
        self.prompts = [list(p[-self.max_prompt_length :]) for p in ids]
        if len(self.prompts) < self.batch_size * self.world_size:
            raise DataFormatError(
                f"{self.prompts_source}: {len(self.prompts)} prompts, fewer than one rollout "
                f"({self.batch_size} x {self.world_size} ranks); lower ppo.batch_size"
            )
        if self.ptx_ratio > 0:
            texts = read_records(self.pretrain_source, "pretrain", self.fields, self.limit)
            self.ptx_examples, _ = encode_texts(
                self.tokenizer, [t["text"] for t in texts], self.ptx_max_length
            )

    @property
    def ptx_per_rollout(self) -> int:
        """Pretraining examples drawn per rollout per process."""
        return int(round(self.batch_size * self.ptx_ratio))

    def _take(self, n_items: int, per_step: int, step: int, offset: int, salt: int) -> list[int]:
        """Indices ``[offset, offset + per_step)`` of step ``step`` in seeded permutations."""
        start = step * per_step * self.world_size + offset
        out = []
        for pos in range(start, start + per_step):
            epoch, i = divmod(pos, n_items)
            out.append(self._order(n_items, salt, epoch)[i])
        return out

    def _order(self, n_items: int, salt: int, epoch: int) -> list[int]:
        key = (n_items, salt, epoch)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            order = list(range(n_items))
            random.Random(self.seed * 1_000_003 + salt * 7919 + epoch).shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def rollout_batch(self, index: int) -> dict:
        """The batch of rollout ``index`` for this rank.

        Returns:
            ``{"query_ids" (B, Q) left-padded, "query_mask" (B, Q), "ptx": LM batch or None}``.
        """
        b, k = self.batch_size, self.group_size
        # b // k distinct prompts, each in k consecutive rows (a critic-free estimator's group).
        chosen = self._take(len(self.prompts), b // k, index, self.rank * (b // k), salt=1)
        prompts = [self.prompts[i] for i in chosen for _ in range(k)]
        query_ids, query_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        ptx = None
        if self.ptx_ratio > 0 and self.ptx_per_rollout > 0:
            n = self.ptx_per_rollout
            idx = self._take(len(self.ptx_examples), n, index, self.rank * n, salt=2)
            ptx = LMCollator(self.tokenizer.pad_token_id)([self.ptx_examples[i] for i in idx])
        return {"query_ids": query_ids, "query_mask": query_mask, "ptx": ptx}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_RolloutTicker(), batch_size=None)
