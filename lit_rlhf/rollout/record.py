"""The record of a batch of episodes that every phase of an RL step reads and fills in.

Layout: prompts are LEFT-padded to Q tokens, responses RIGHT-padded to R tokens, and the
scored sequence is ``[query | response]`` of length Q + R.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lit_rlhf.rollout.packed import PackedRollout, pack_rollout


@dataclass
class Rollout:
    """A batch of bandit episodes (one prompt -> one response -> one score).

    Attributes:
        query_ids: (B, Q) left-padded prompt ids.
        query_mask: (B, Q) 1 on real prompt tokens.
        response_ids: (B, R) response ids, pad after the first EOS.
        response_mask: (B, R) bool, True up to and including the first EOS.
        has_eos: (B,) bool.
        logprobs: (B, R) policy log-probs of the response tokens at sampling time.
        ref_logprobs: (B, R) reference (SFT) log-probs of the same tokens.
        values: (B, R) value estimates of the states before each response token.
        scores: (B,) RM scores after the missing-EOS rule (what PPO optimises).
        raw_scores: (B,) RM scores as read.
        advantages: (B, R) per-token advantages (phase 4; GAE, whitened when configured).
        returns: (B, R) value targets of the same phase.
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    has_eos: Tensor
    logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    raw_scores: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        """(B, Q + R) query and response ids."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, Q + R) mask of real tokens (response tokens after EOS are masked)."""
        return torch.cat([self.query_mask.long(), self.response_mask.long()], dim=1)

    def pack(self) -> PackedRollout:
        """The padding-free layout of these sequences (:func:`pack_rollout`)."""
        return pack_rollout(self.query_mask, self.response_mask, self.input_ids)

    def select(self, index: Tensor) -> Rollout:
        """The sub-batch at ``index`` (minibatch slicing)."""
        return Rollout(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )


def split_episodes(
    batch_size: int, num_minibatches: int, micro_batch_size: int | None
) -> tuple[int, int]:
    """Episodes per minibatch and per micro-batch of one rollout; every episode is used.

    Raises:
        ValueError: When the rollout does not split evenly (the remainder would be dropped
            from every optimisation epoch without a word) or a size is < 1.
    """
    if num_minibatches < 1 or batch_size % num_minibatches:
        raise ValueError(
            f"ppo.batch_size ({batch_size}) must be divisible by ppo.num_minibatches "
            f"({num_minibatches})"
        )
    mb = batch_size // num_minibatches
    if micro_batch_size is None:
        return mb, mb
    if micro_batch_size < 1 or mb % min(micro_batch_size, mb):
        raise ValueError(
            f"ppo.micro_batch_size ({micro_batch_size}) must be >= 1 and divide the minibatch "
            f"of {mb} episodes (ppo.batch_size / ppo.num_minibatches); otherwise "
            f"{mb % max(micro_batch_size, 1)} episodes of each minibatch would be dropped"
        )
    return mb, min(micro_batch_size, mb)
