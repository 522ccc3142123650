"""Reductions and index helpers over padded ``(B, T)`` batches.

Masks are bool or 0/1 tensors; ``True``/1 marks a real (counted) entry. Every reduction
selects with :func:`torch.where` rather than multiplying by the mask, so a ``NaN``/``inf``
sitting in a padded position never leaks into the result or its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "first_true_index",
    "last_true_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "position_ids_from_mask",
    "truncate_after_eos",
]


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _count(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    # Integer count: a bf16 sum of ones stops being exact above 256.
    full = torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, x.shape))
    return full.sum() if dim is None else full.sum(dim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Sum of ``x`` over the entries where ``mask`` is true.

    Naive equivalent: ``(x * mask).sum(dim)`` (but padded ``NaN``/``inf`` are ignored).

    Args:
        x: Values, e.g. ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``x``.
        dim: Dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked sum, with ``dim`` reduced.
    """
    mask = _as_bool(mask)
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true; 0 where nothing is selected.

    Naive equivalent: ``(x * mask).sum(dim) / mask.sum(dim)`` with ``0/0`` read as 0.

    Args:
        x: Values, e.g. ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``x``.
        dim: Dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked mean, with ``dim`` reduced.
    """
    mask = _as_bool(mask)
    total = masked_sum(x, mask, dim)
    return total / _count(x, mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all masked entries of ``x`` (one scalar over the whole batch).

    Args:
        x: Values, e.g. ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``x``.
        unbiased: Apply Bessel's correction ``n / (n - 1)``. With fewer than two selected
            entries the correction is skipped (the result is then 0, never ``NaN``/``inf``).

    Returns:
        A 0-dim tensor.
    """
    mask = _as_bool(mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _count(x, mask).to(var.dtype)
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise the masked entries of ``x`` with their (batch-global) mean and variance.

    ``(x - mean) / sqrt(var + eps)``, where ``var`` is the unbiased masked variance. With
    ``shift_mean=False`` the mean is added back (only the scale changes; PPO's reward
    whitening uses this so the sign of the reward survives).

    Args:
        x: Values, e.g. advantages ``(B, T)``.
        mask: Bool or 0/1 tensor broadcastable to ``x``.
        shift_mean: Subtract the mean (True) or keep it (False).
        eps: Added to the variance before the square root.

    Returns:
        Tensor shaped like ``x``; unmasked positions are 0.
    """
    mask = _as_bool(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens, for left- or right-padded batches.

    ``(mask.cumsum(-1) - 1).clamp(min=0)``: the first real token gets 0; left padding gets 0
    too (its value is irrelevant because it is never attended to).

    Args:
        attention_mask: ``(B, T)`` bool or 0/1.

    Returns:
        ``(B, T)`` long.
    """
    return (_as_bool(attention_mask).long().cumsum(-1) - 1).clamp(min=0)


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last true entry of each row.

    Args:
        mask: ``(B, T)`` bool or 0/1.

    Returns:
        ``(B,)`` long; -1 for a row with no true entry.
    """
    mask = _as_bool(mask)
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(-1).values


def first_true_index(mask: Tensor) -> Tensor:
    """Index of the first true entry of each row.

    Args:
        mask: ``(B, T)`` bool or 0/1.

    Returns:
        ``(B,)`` long; ``T`` for a row with no true entry.
    """
    mask = _as_bool(mask)
    length = mask.shape[-1]
    idx = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, length)).min(-1).values


def truncate_after_eos(
    response_ids: Tensor, eos_token_id: int | Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut generated responses after their first EOS.

    The mask is derived from the EOS positions only, never from the pad id, so it stays
    right when ``pad_token_id == eos_token_id`` or when ``generate`` already padded the tail.

    Args:
        response_ids: ``(B, T)`` generated token ids (prompt excluded).
        eos_token_id: The EOS id, or several ids that all end a response.
        pad_token_id: Id written over every token after the first EOS.

    Returns:
        ``(ids, response_mask, has_eos)``: ``ids`` ``(B, T)`` with every token after the first
        EOS replaced by ``pad_token_id``; ``response_mask`` ``(B, T)`` bool, true up to and
        including the first EOS (the whole row when it has none); ``has_eos`` ``(B,)`` bool.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be (B, T), got shape {tuple(response_ids.shape)}")
    eos = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos)
    eos_count = is_eos.long().cumsum(-1)
    # Strictly after the first EOS: at least one EOS seen before this position.
    after_first = (eos_count - is_eos.long()) > 0
    ids = response_ids.masked_fill(after_first, pad_token_id)
    return ids, ~after_first, is_eos.any(-1)
