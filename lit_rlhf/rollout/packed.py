"""Padding-free PPO forwards: a rollout's sequences packed end to end into few rows.

In a :class:`~lit_rlhf.rollout.record.Rollout` the prompt is left-padded and the response
right-padded, so the real tokens of episode ``i`` are one contiguous span of its padded row,
columns ``Q - len(prompt_i)`` to ``Q + len(response_i)``. Packing copies these spans into
rows (positions restarting at 0 per sequence, no attention mask: transformers builds the
block-diagonal causal mask from the positions). Everything PPO reads — the log-prob of
response token t, the value of the state before it, the RM score at the last token — is
gathered from the packed output at the position that held it in the padded layout, so
the numbers equal the padded forward's up to float rounding.

Packing removes padded tokens from the transformer blocks, but the LM head, which the padded
layout runs on the R + 1 response positions only (``logits_to_keep``), would run on every
packed position, prompts included. :meth:`PackedRollout.pays` compares both with a FLOP
model and the forwards pack only where the packed one is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_rlhf.data.lm_tokenize import choose_bins


@dataclass
class PackedRollout:
    """Where a rollout's tokens sit in a padding-free layout.

    Attributes:
        input_ids: (P, W) packed rows; the tail of a row repeats its first id (never read).
        position_ids: (P, W) positions restarting at 0 at each sequence's start (0 in tails).
        states: (B, R) flat index ``row * W + column`` of the position whose output scores
            response token t (the state before it); positions past a response's end point
            at its last real token (their outputs are masked by every caller).
        ends: (B,) flat index of each sequence's last real token (EOS when present).
        padded_shape: (B, Q + R) of the padded layout, for the cost comparison.
        response_len: R.
    """

    input_ids: Tensor
    position_ids: Tensor
    states: Tensor
    ends: Tensor
    padded_shape: tuple[int, int]
    response_len: int

    def pays(self, model: nn.Module, lm_head: bool) -> bool:
        """Whether the packed forward of ``model`` costs fewer FLOPs than the padded one.

        Per token ``24 L d^2`` (block matmuls), per row ``4 L d T^2`` (dense attention over
        its width T; the block-diagonal mask of packed rows saves nothing in SDPA) and, with
        ``lm_head``, ``2 d V`` per position through the LM head: the padded layout keeps
        R + 1 positions per row, the packed one all of them. Models whose config does not
        give the sizes are not packed.
        """
        cfg = getattr(model, "config", None)
        if hasattr(cfg, "get_text_config"):  # multimodal configs nest the LM's sizes
            cfg = cfg.get_text_config()
        layers = getattr(cfg, "num_hidden_layers", None)
        d = getattr(cfg, "hidden_size", None)
        vocab = getattr(cfg, "vocab_size", None) if lm_head else 0
        if not layers or not d or vocab is None:
            return False
        b, t = self.padded_shape
        p, w = self.input_ids.shape

        def flops(rows: int, width: int, head_positions: int) -> float:
            block = 24 * layers * d * d * rows * width + 4 * layers * d * rows * width * width
            return block + 2 * d * vocab * rows * head_positions

        return flops(p, w, w) < flops(b, t, self.response_len + 1)


def pack_rollout(query_mask: Tensor, response_mask: Tensor, input_ids: Tensor) -> PackedRollout:
    """Pack the real tokens of a rollout's ``[query | response]`` rows.

    Rows are as wide as the longest sequence, or twice as wide when that saves >= 10 % of
    the slots (:func:`~lit_rlhf.data.lm_tokenize.choose_bins`, as for SFT/RM batches).

    Args:
        query_mask: (B, Q) 1 on real prompt tokens (left padding); every prompt needs >= 1.
        response_mask: (B, R) True up to and including the first EOS (right padding).
        input_ids: (B, Q + R) ``[query | response]`` ids.

    Returns:
        The packed layout; see :class:`PackedRollout`.
    """
    dev = input_ids.device
    b, q = query_mask.shape
    r = response_mask.shape[1]
    lp = query_mask.sum(1)
    lr = response_mask.sum(1)
    if bool((lp == 0).any()):
        raise ValueError("pack_rollout: an empty prompt has no state to score its response")
    lengths = (lp + lr).tolist()  # one host sync per packing
    bins = choose_bins(lengths)
    width = max(sum(lengths[i] for i in bin_) for bin_ in bins)
    row = torch.empty(b, dtype=torch.long)
    offset = torch.empty(b, dtype=torch.long)
    for k, bin_ in enumerate(bins):
        at = 0
        for i in bin_:
            row[i], offset[i] = k, at
            at += lengths[i]
    start = (row * width + offset).to(dev)  # (B,) flat start of each sequence

    # Token copy: sequence i's k-th real token comes from padded column Q - lp_i + k.
    n = torch.as_tensor(lengths, device=dev)
    seq = torch.repeat_interleave(torch.arange(b, device=dev), n)  # (N,)
    k = torch.arange(int(n.sum()), device=dev) - torch.repeat_interleave(n.cumsum(0) - n, n)
    flat_ids = torch.full((len(bins) * width,), -1, dtype=torch.long, device=dev)
    flat_pos = torch.zeros(len(bins) * width, dtype=torch.long, device=dev)
    flat_ids[start[seq] + k] = input_ids[seq, q - lp[seq] + k]
    flat_pos[start[seq] + k] = k
    ids = flat_ids.view(len(bins), width)
    # Tails: position 0 (a sequence of its own, never past the position table) and a real
    # id (the row's first), not pad, which transformers warns about without a mask.
    ids = torch.where(ids < 0, ids[:, :1], ids)

    # The state before response token t sits at packed column offset + lp - 1 + t.
    t = torch.arange(r, device=dev)[None].expand(b, r)
    t = torch.minimum(t, (lr - 1).clamp(min=0)[:, None])
    states = start[:, None] + (lp - 1)[:, None] + t
    ends = start + n - 1
    return PackedRollout(ids, flat_pos.view(len(bins), width), states, ends, (b, q + r), r)
