"""Per-token log-probabilities and entropies from language-model logits.

The vocabulary axis is large (50k+), so these functions work on chunks of about
``chunk_rows`` rows of ``(B*T, V)`` and upcast one chunk at a time to float32: a full float32
``log_softmax`` copy of bf16 logits would otherwise double the peak memory of the step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["entropy_from_logits", "selective_log_softmax", "token_logprobs"]

#: About this many ``(V,)`` rows are upcast and reduced at once.
DEFAULT_CHUNK_ROWS = 2048


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _leading_chunks(shape: torch.Size, chunk_rows: int) -> list[slice]:
    """Slices over dim 0 holding about ``chunk_rows`` rows of the ``(..., V)`` tensor each.

    Chunking along dim 0 (not the flattened rows) keeps a non-contiguous view such as
    ``logits[:, :-1]`` from being copied whole by ``reshape``.
    """
    if len(shape) < 2:
        raise ValueError(f"logits need a vocab axis, got shape {tuple(shape)}")
    if len(shape) == 2:
        per_item = 1
    else:
        per_item = max(1, math.prod(shape[1:-1]))
    step = max(1, chunk_rows // per_item)
    return [slice(i, i + step) for i in range(0, shape[0], step)]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float64 stays float64 (gradient checks); every lower precision goes to float32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, without the full copy.

    Naive equivalent::

        torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])[..., 0]

    computed as ``logit[index] - logsumexp(logits)`` per chunk of rows, in float32 (float64
    input stays float64). Differentiable.

    Args:
        logits: ``(B, T, V)`` (any leading shape ``(..., V)``), any float dtype.
        index: ``(B, T)`` (the leading shape of ``logits``) integer token ids.
        temperature: Logits are divided by it (use the sampling temperature).
        chunk_rows: About this many ``(V,)`` rows are upcast at once (whole ``B`` items).

    Returns:
        ``(B, T)`` log-probabilities in float32 (float64 for float64 input).
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits shape without the vocab axis "
            f"{tuple(logits.shape[:-1])}"
        )
    dtype = _compute_dtype(logits)
    vocab = logits.shape[-1]
    out = []
    for rows in _leading_chunks(logits.shape, chunk_rows):
        chunk = logits[rows].reshape(-1, vocab).to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, index[rows].reshape(-1, 1).long()).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out or index.numel() == 0:
        return torch.zeros(index.shape, dtype=dtype, device=logits.device)
    return torch.cat(out).reshape(index.shape)


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each next token of ``input_ids`` under causal-LM ``logits``.

    ``out[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``: ``logits[:, :-1]``
    predicts ``input_ids[:, 1:]``. Padded positions get a value too; mask them afterwards.

    Args:
        logits: ``(B, L, V)`` from one forward pass over ``input_ids``.
        input_ids: ``(B, L)``.
        temperature: Logits are divided by it; must be the temperature used for sampling,
            for the policy and the reference alike, or the KL is wrong.

    Returns:
        ``(B, L - 1)`` float32 log-probabilities.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, L, V) and input_ids (B, L), got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:], temperature=temperature)


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Entropy of the categorical distribution ``softmax(logits / temperature)`` per position.

    Naive equivalent: ``-(p * log p).sum(-1)`` with ``p = softmax(logits.float() / T)``.

    Args:
        logits: ``(B, T, V)`` (any leading shape ``(..., V)``).
        temperature: Logits are divided by it.
        chunk_rows: About this many ``(V,)`` rows are upcast at once (whole ``B`` items).

    Returns:
        ``(B, T)`` entropies in nats, float32 (float64 for float64 input).
    """
    _check_temperature(temperature)
    dtype = _compute_dtype(logits)
    vocab = logits.shape[-1]
    out = []
    for rows in _leading_chunks(logits.shape, chunk_rows):
        chunk = logits[rows].reshape(-1, vocab).to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        logp = F.log_softmax(chunk, dim=-1)
        p = logp.exp()
        # 0 * log 0 = 0: a -inf logit (a banned token) must not turn the entropy into NaN.
        plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=dtype, device=p.device))
        out.append(-plogp.sum(-1))
    if not out or logits.numel() == 0:
        return torch.zeros(logits.shape[:-1], dtype=dtype, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])
