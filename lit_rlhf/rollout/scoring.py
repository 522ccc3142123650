"""Phase 2 of an RL step: log-probs, values and reward-model scores of sampled responses.

Every forward gets position ids from the attention mask (or the packed layout's own), and
every log-prob is computed from ``logits / temperature`` with the temperature used for
sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lit_rlhf.models.heads import (
    apply_score_head,
    backbone_hidden,
    packed_sequence_scores,
    sequence_scores,
)
from lit_rlhf.ops.logprobs import entropy_from_logits, selective_log_softmax
from lit_rlhf.ops.masking import position_ids_from_mask
from lit_rlhf.rollout.packed import PackedRollout
from lit_rlhf.rollout.record import Rollout


def response_logprobs(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float,
    with_entropy: bool = False,
    packed: PackedRollout | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (B, R) of the response tokens under ``model`` (logits / T), and entropy.

    Padded layout: only the R + 1 last positions go through the LM head (``logits_to_keep``):
    the logits at position Q - 1 + t predict response token t. With ``packed`` (and when
    :meth:`PackedRollout.pays` for this model) the forward runs on the packed rows and the
    same logits are gathered from them.
    """
    if packed is not None and packed.pays(model, lm_head=True):
        logits = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
        ).logits
        logits = logits.flatten(0, 1)[packed.states]
    else:
        r = rollout.response_ids.shape[1]
        mask = rollout.attention_mask
        logits = model(
            input_ids=rollout.input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=r + 1,
        ).logits[:, :-1]
    logits = logits.float() / temperature
    logprobs = selective_log_softmax(logits, rollout.response_ids)
    entropy = None
    if with_entropy:  # logged only: no autograd graph for it
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def response_values(
    model: PreTrainedModel, rollout: Rollout, packed: PackedRollout | None = None
) -> Tensor:
    """Values (B, R): the value head at position Q - 1 + t, the state before response token t."""
    if packed is not None and packed.pays(model, lm_head=False):
        hidden = backbone_hidden(model, packed.input_ids, None, packed.position_ids)
        return apply_score_head(model, hidden.flatten(0, 1)[packed.states])
    q = rollout.query_ids.shape[1]
    hidden = backbone_hidden(model, rollout.input_ids, rollout.attention_mask)
    return apply_score_head(model, hidden[:, q - 1 : -1])


@torch.no_grad()
def score(model: PreTrainedModel, rollout: Rollout, packed: PackedRollout | None = None) -> Tensor:
    """RM scores (B,) read at each sequence's last real token (EOS when present)."""
    if packed is not None and packed.pays(model, lm_head=False):
        return packed_sequence_scores(model, packed.input_ids, packed.position_ids, packed.ends)
    return sequence_scores(model, rollout.input_ids, rollout.attention_mask)
