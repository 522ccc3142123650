"""The reward model's K-wise ranking loss and pairwise accuracy (InstructGPT §3.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kwise_ranking_loss", "pairwise_accuracy", "ranking_pair_mask"]


def _check_shapes(rewards: Tensor, ranks: Tensor, valid: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (P, K), got shape {tuple(rewards.shape)}")
    for name, t in (("ranks", ranks), ("valid", valid)):
        if t.shape != rewards.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must equal rewards shape {tuple(rewards.shape)}"
            )


def ranking_pair_mask(ranks: Tensor, valid: Tensor) -> Tensor:
    """Ordered pairs ``(i, j)`` of one prompt's responses where ``i`` is ranked better.

    Args:
        ranks: ``(P, K)`` ranks, 0 = best; equal ranks are ties.
        valid: ``(P, K)`` bool or 0/1; false marks padding (prompts with fewer than K).

    Returns:
        ``(P, K, K)`` bool, true where both are valid and ``ranks[p, i] < ranks[p, j]``. Ties
        and padding give no pair; each untied pair appears exactly once.
    """
    valid = valid != 0
    better = ranks.unsqueeze(-1) < ranks.unsqueeze(-2)
    return better & valid.unsqueeze(-1) & valid.unsqueeze(-2)


def kwise_ranking_loss(
    rewards: Tensor,
    ranks: Tensor,
    valid: Tensor,
    margin: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor]:
    """InstructGPT's reward-model loss over all ranked pairs of each prompt.

    For prompt ``p`` with untied valid pairs ``(w, l)`` (``w`` ranked better)::

        loss_p = -(1 / n_p) * sum_{(w, l)} log sigmoid(r_w - r_l - margin)

    where ``n_p`` is the number of such pairs (``C(K, 2)`` without ties or padding). All
    pairs of one prompt form one batch element, so each response is scored once however many
    pairs it is in. The loss is the mean of ``loss_p`` over prompts with ``n_p > 0``.
    ``K = 2`` with ranks ``[0, 1]`` is the usual (chosen, rejected) loss.

    Args:
        rewards: ``(P, K)`` scalar rewards of the K responses of each prompt.
        ranks: ``(P, K)`` integer ranks, 0 = best; equal ranks are ties (pair dropped).
        valid: ``(P, K)`` bool or 0/1; false marks padding for prompts with fewer responses.
        margin: Required reward gap (as in TRL's margin term); a float, a
            ``(P,)`` tensor (one per prompt), or a tensor that broadcasts to ``(P, K, K)``
            (indexed ``[p, better, worse]``) for one margin per pair.

    Returns:
        ``(loss, n_pairs)``: a 0-dim float32 loss (0, still attached to ``rewards``, when no
        prompt has a pair) and the total number of pairs as a 0-dim long tensor.
    """
    _check_shapes(rewards, ranks, valid)
    pairs = ranking_pair_mask(ranks, valid)
    # Padded slots may hold garbage (inf/NaN); zero them so no NaN reaches the backward pass.
    r = torch.where(valid != 0, rewards.float(), torch.zeros((), device=rewards.device))
    if isinstance(margin, Tensor):
        margin = margin.to(r)
        if margin.dim() == 1:
            # One margin per prompt.
            margin = margin.reshape(-1, 1, 1)
    diff = r.unsqueeze(-1) - r.unsqueeze(-2) - margin
    logsig = F.logsigmoid(diff)
    zero = torch.zeros((), dtype=logsig.dtype, device=logsig.device)
    n_per_prompt = pairs.sum((-1, -2))
    loss_per_prompt = -torch.where(pairs, logsig, zero).sum((-1, -2)) / n_per_prompt.clamp(min=1)
    has_pairs = n_per_prompt > 0
    loss = torch.where(has_pairs, loss_per_prompt, zero).sum() / has_pairs.sum().clamp(min=1)
    return loss, n_per_prompt.sum()


def pairwise_accuracy(rewards: Tensor, ranks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """How many untied valid pairs the rewards order like the ranks.

    A pair counts as correct only if ``r_better > r_worse`` strictly: equal rewards count as
    wrong (not 0.5), so a constant reward model scores 0 rather than 50 %.

    Args:
        rewards: ``(P, K)``.
        ranks: ``(P, K)`` integer ranks, 0 = best; ties give no pair.
        valid: ``(P, K)`` bool or 0/1.

    Returns:
        ``(n_correct, n_pairs)`` as 0-dim long tensors (sum them across batches/ranks before
        dividing).
    """
    _check_shapes(rewards, ranks, valid)
    pairs = ranking_pair_mask(ranks, valid)
    r = rewards.detach()
    correct = pairs & (r.unsqueeze(-1) > r.unsqueeze(-2))
    return correct.sum(), pairs.sum()
