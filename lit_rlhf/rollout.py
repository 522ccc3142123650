"""Generation and scoring of a batch of prompts: phases 1 and 2 of a PPO step.

Layout: prompts are LEFT-padded to Q tokens, responses RIGHT-padded to R tokens, and the
scored sequence is ``[query | response]`` of length Q + R. Every forward gets position ids
from the attention mask, and every log-prob is computed from ``logits / temperature`` with the
temperature used for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from lit_rlhf.models.heads import (
    apply_score_head,
    backbone_hidden,
    packed_sequence_scores,
    sequence_scores,
)
from lit_rlhf.ops.logprobs import entropy_from_logits, selective_log_softmax
from lit_rlhf.ops.masking import position_ids_from_mask, truncate_after_eos
from lit_rlhf.packed_rollout import PackedRollout, pack_rollout


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


class NonFiniteSamplingError(RuntimeError):
    """A model's next-token logits are NaN or inf, so nothing can be sampled from it."""


class _FiniteFirstStep(LogitsProcessor):
    """Checks the first generated step's logits (one host sync per call of ``generate``).

    Overflowed weights make every step non-finite, and the first one is enough to say so in
    one line; ``torch.multinomial`` would raise a bare RuntimeError (a device assert on CUDA).
    """

    def __init__(self) -> None:
        self.checked = False

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if not self.checked:
            self.checked = True
            if not bool(torch.isfinite(scores).all()):
                raise NonFiniteSamplingError(
                    "the model's next-token logits are NaN or inf, so no response can be "
                    "sampled (its weights or activations overflowed); if it is being trained, "
                    "lower its learning rate or add warmup"
                )
        return scores


@torch.no_grad()
def generate(
    policy: PreTrainedModel,
    query_ids: Tensor,
    query_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> Rollout:
    """Phase 1: sample one response per prompt (pure sampling: top_k=0, top_p=1).

    The sampling pass's own logits give the policy's log-probs of the sampled tokens
    (``Rollout.logprobs``), so phase 2 needs no extra policy forward. They are the raw
    logits / T from the KV-cache forwards, equal to a full forward's up to float rounding.

    Args:
        policy: Causal LM.
        query_ids: (B, Q) left-padded prompts.
        query_mask: (B, Q).
        max_new_tokens: Response length limit R.
        temperature: Sampling temperature T.
        eos_token_id: Ends a response; everything after the first one is masked.
        pad_token_id: Fills the tail.
        synced_gpus: Keep ranks stepping together under sharded strategies (FSDP/ZeRO-3) so
            ranks whose responses end early do not deadlock the others.
    """
    out = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        synced_gpus=synced_gpus,
        return_dict_in_generate=True,
        output_logits=True,
        logits_processor=LogitsProcessorList([_FiniteFirstStep()]),
    )
    response = out.sequences[:, query_ids.shape[1] :]
    response, mask, has_eos = truncate_after_eos(response, eos_token_id, pad_token_id)
    # (B, R, V) raw (unprocessed) logits, one row per generated step: the same numbers a full
    # forward's LM head gives, which is what every later log-prob is compared with.
    logits = torch.stack(out.logits, dim=1)
    del out
    logprobs = selective_log_softmax(logits, response, temperature).masked_fill(~mask, 0.0)
    return Rollout(query_ids, query_mask, response, mask, has_eos, logprobs=logprobs)


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
