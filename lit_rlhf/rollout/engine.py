"""Phase 1 of an RL step: sampling responses, behind an engine interface.

:class:`RolloutEngine` is the seam for faster samplers (vLLM, SGLang, a static-cache compiled
decoder): PPO, the label stage and evaluation call an engine, never ``model.generate``
directly. :class:`HFGenerateEngine`, the default, samples with transformers' ``generate``
from the training policy module itself.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from lit_rlhf.ops.logprobs import selective_log_softmax
from lit_rlhf.ops.masking import truncate_after_eos
from lit_rlhf.rollout.record import Rollout


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
    """Sample one response per prompt with ``policy.generate`` (top_k=0, top_p=1).

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


class RolloutEngine(abc.ABC):
    """Samples one response per prompt row from a policy.

    What an engine must return, from :meth:`generate`: a :class:`Rollout` holding the given
    ``query_ids`` and ``query_mask`` (same device), ``response_ids`` (B, R) with R <=
    ``max_new_tokens``, pad after the first EOS, ``response_mask`` (B, R) True up to and
    including the first EOS, ``has_eos`` (B,), and ``logprobs`` (B, R) of the sampled tokens
    at ``temperature`` (0 where masked) or None. Sampling is pure (no top-k/top-p, no
    repetition penalty): PPO's importance ratio assumes the samples come from the policy's
    own distribution at that temperature.

    Log-probs: when :attr:`exact_logprobs` is True, ``Rollout.logprobs`` equal the training
    policy's forward on the same tokens up to float rounding, and PPO uses them as the old
    log-probs (no extra forward). An engine with its own kernels or precision (vLLM in bf16)
    sets it False; PPO then recomputes the old log-probs with one policy forward in phase 2,
    and the engine's own may be None.

    Weights: :meth:`load_weights` is called with the training policy before every rollout,
    on every rank. An engine that samples from the policy module itself does nothing; one
    holding its own copy copies (or broadcasts) the new weights there. It is called after the
    previous rollout's optimizer steps, so the samples always come from the current policy.
    """

    #: Whether ``Rollout.logprobs`` can serve as PPO's old log-probs.
    exact_logprobs: bool = True

    def load_weights(self, policy: PreTrainedModel) -> None:  # noqa: B027 (optional hook)
        """Make the engine sample from ``policy``'s current weights (default: nothing to do)."""

    @abc.abstractmethod
    def generate(
        self,
        policy: PreTrainedModel,
        query_ids: Tensor,
        query_mask: Tensor,
        max_new_tokens: int,
        temperature: float,
        eos_token_id: int,
        pad_token_id: int,
        synced: bool = False,
    ) -> Rollout:
        """Sample responses to (B, Q) left-padded prompts; see the class docstring.

        ``synced``: the ranks must keep stepping together until all are done (sharded
        strategies: FSDP, ZeRO-3), so a rank whose responses end early does not deadlock.
        """


class HFGenerateEngine(RolloutEngine):
    """The default engine: transformers' ``generate`` on the training policy (KV cache)."""

    exact_logprobs = True

    def generate(
        self,
        policy: PreTrainedModel,
        query_ids: Tensor,
        query_mask: Tensor,
        max_new_tokens: int,
        temperature: float,
        eos_token_id: int,
        pad_token_id: int,
        synced: bool = False,
    ) -> Rollout:
        return generate(
            policy,
            query_ids,
            query_mask,
            max_new_tokens,
            temperature,
            eos_token_id,
            pad_token_id,
            synced,
        )
