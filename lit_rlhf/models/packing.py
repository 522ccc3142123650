"""Does a model keep packed sequences apart? A one-forward probe before trusting packed rows.

Packed rows (several sequences end to end, ``position_ids`` restarting at 0, no attention
mask) are only correct when the model turns restarting positions into a block-diagonal causal
mask, as transformers' ``create_causal_mask`` does for most decoder models. A model that
does not would let every sequence attend to the ones before it, silently. The probe catches
that with one tiny forward on two sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_rlhf.models.heads import has_score_head

__all__ = ["PackedAttentionError", "packed_attention_leak", "require_packed_attention"]


class PackedAttentionError(ValueError):
    """The model attends across packed sequences."""


@torch.no_grad()
def packed_attention_leak(model: nn.Module) -> float:
    """How much a packed sequence still sees of the one before it, relative to no separation.

    Runs the model on ``[a, b]`` packed (positions ``0 1 2 0 1``, no attention mask),
    on ``b`` alone and on ``[a, b]`` with a plain all-ones mask (``b`` attends to ``a``).

    Args:
        model: A causal LM (its logits are compared) or a sequence classifier (its
            backbone's hidden states), on any device, in any mode, sharded or not.

    Returns:
        ``|packed - alone| / |joined - alone|`` (max over ``b``'s outputs): ~0 when the
        model separates packed sequences, ~1 when it does not.
    """
    device = next(model.parameters()).device
    # Ordinary tokens: a pad id in an unmasked input makes transformers print a warning.
    special = {getattr(model.config, k, None) for k in ("pad_token_id", "eos_token_id")}
    vocab = int(getattr(model.config, "vocab_size", 16))
    ordinary = [i for i in range(vocab - 1, -1, -1) if i not in special][:5]
    ids = torch.tensor([ordinary], device=device)
    pos = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            packed = _outputs(model, ids, None, pos)[0, 3:]
            alone = _outputs(model, ids[:, 3:], None, pos[:, 3:])[0]
            joined = _outputs(model, ids, torch.ones_like(ids), pos)[0, 3:]
    finally:
        model.train(was_training)
    err = (packed - alone).abs().max()
    leak = (joined - alone).abs().max()
    return float(err / leak) if leak > 0 else 0.0


def _outputs(model: nn.Module, ids, mask, pos) -> torch.Tensor:
    # A classifier's own forward pools one position; its backbone (a separate FSDP unit
    # when sharded) gives every position. A causal LM runs whole (its root owns embeddings).
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": False}
    if has_score_head(model) and getattr(model, "base_model", model) is not model:
        return model.base_model(**kwargs).last_hidden_state.float()
    return model(**kwargs).logits.float()


def require_packed_attention(model: nn.Module, where: str = "padding_free/packing") -> None:
    """Raise :class:`PackedAttentionError` unless the model keeps packed sequences apart.

    Args:
        model: The model about to receive packed rows.
        where: The option that produced them, named in the error.
    """
    ratio = packed_attention_leak(model)
    if ratio > 0.05:
        raise PackedAttentionError(
            f"{type(model).__name__} attends across packed sequences (leak ratio {ratio:.2f}): "
            "its attention ignores restarting position_ids. Turn off "
            f"{where} for this model (e.g. sft.padding_free=false, rm.padding_free=false, "
            "ppo.padding_free=false, pretrain.packing=false)."
        )
