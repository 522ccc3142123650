"""Next-token cross-entropy on marked target tokens (SFT and the PPO-ptx term)."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.ops.logprobs import token_logprobs
from lit_rlhf.ops.masking import masked_sum

__all__ = ["LM_LOSS_REDUCTIONS", "lm_loss", "next_token_nll"]

#: Accepted values of ``lm_loss(..., reduction=...)``.
LM_LOSS_REDUCTIONS = ("token_mean", "sequence_mean", "sequence_sum")


def next_token_nll(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood of the marked target tokens.

    ``loss_mask`` is in ``input_ids`` coordinates and marks the tokens to be *predicted*
    (e.g. the response tokens of an SFT example, EOS included). The shift happens here:
    ``nll[:, t]`` is ``-log p(input_ids[:, t + 1] | input_ids[:, :t + 1])`` and counts where
    ``loss_mask[:, t + 1]`` is true. ``loss_mask[:, 0]`` is ignored (nothing predicts the
    first token).

    Args:
        logits: ``(B, L, V)`` causal-LM logits over ``input_ids``.
        input_ids: ``(B, L)``.
        loss_mask: ``(B, L)`` bool or 0/1, true on target tokens.

    Returns:
        ``(nll, mask)``: ``nll`` ``(B, L - 1)`` float32, exactly 0 where ``mask`` is false
        (so ``(nll * mask).sum()`` is safe); ``mask`` ``(B, L - 1)`` bool.
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    mask = loss_mask[:, 1:] != 0
    logp = token_logprobs(logits, input_ids)
    nll = torch.where(mask, -logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return nll, mask


def lm_loss(
    logits: Tensor, input_ids: Tensor, loss_mask: Tensor, reduction: str = "token_mean"
) -> Tensor:
    """Next-token cross-entropy on the target tokens marked by ``loss_mask``, as a scalar.

    Reductions (``n_b`` = target tokens of sequence ``b``, ``N = sum_b n_b``):

    - ``"token_mean"``: ``sum_{b,t} nll / N``; every target token weighs the same, so long
      sequences dominate.
    - ``"sequence_mean"``: mean over sequences of ``sum_t nll_b / n_b``; every sequence
      weighs the same.
    - ``"sequence_sum"``: mean over sequences of ``sum_t nll_b`` (the negative
      log-likelihood of the whole sequence); scales with sequence length.

    Sequences without any target token are left out of the sequence reductions; a batch with
    no target token gives 0 (still attached to the graph, so DDP sees every parameter used).

    PPO-ptx: the objective adds ``gamma * E[log pi(x)]`` over pretraining text, i.e. the
    loss adds ``gamma * lm_loss(...)``. What ``gamma`` means depends on the reduction: with
    ``"sequence_sum"`` it weighs a whole sequence's log-likelihood (``log pi(x)`` as the paper
    writes it), with ``"token_mean"``/``"sequence_mean"`` it weighs one average token, so the
    same gamma pulls about sequence-length times less than in the sum form. InstructGPT's
    gamma = 27.8 does not say which form it used; DeepSpeed-Chat found 27.8 unstable with a
    per-token mean. Tune gamma for the reduction you use and report both.

    Args:
        logits: ``(B, L, V)`` causal-LM logits over ``input_ids``.
        input_ids: ``(B, L)``.
        loss_mask: ``(B, L)`` bool or 0/1, true on tokens to be predicted.
        reduction: One of :data:`LM_LOSS_REDUCTIONS`.

    Returns:
        0-dim float32 loss. Logits at positions that predict no target get zero gradient.
    """
    if reduction not in LM_LOSS_REDUCTIONS:
        raise ValueError(
            f"unknown lm_loss reduction {reduction!r}; use one of {LM_LOSS_REDUCTIONS}"
        )
    nll, mask = next_token_nll(logits, input_ids, loss_mask)
    if reduction == "token_mean":
        return nll.sum() / mask.sum().clamp(min=1)
    per_seq = masked_sum(nll, mask, dim=-1)
    n_tokens = mask.sum(-1)
    if reduction == "sequence_mean":
        per_seq = per_seq / n_tokens.clamp(min=1)
    has_target = n_tokens > 0
    return masked_sum(per_seq, has_target) / has_target.sum().clamp(min=1)
