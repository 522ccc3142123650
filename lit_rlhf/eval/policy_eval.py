"""Evaluate policies: gold score, KL to the reference, and LM loss on held-out text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.data.lm_tokenize import LMCollator, encode_texts
from lit_rlhf.ops.lm_loss import next_token_nll
from lit_rlhf.rollout import HFGenerateEngine, RolloutEngine, response_logprobs, sample_rollouts


@dataclass
class PolicySamples:
    """Responses of one policy to a list of prompts, with their KL to a reference.

    Attributes:
        prompts: The prompts, in order.
        responses: One decoded response per prompt.
        kl: Per-response KL estimate ``sum_t log pi(y_t) - log pi_ref(y_t)`` (nats), or None.
        lengths: Response lengths in tokens.
    """

    prompts: list[str]
    responses: list[str]
    kl: list[float] | None
    lengths: list[int]


@torch.no_grad()
def sample_with_kl(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reference: PreTrainedModel | None = None,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    batch_size: int = 64,
    max_prompt_length: int = 128,
    desc: str | None = None,
    engine: RolloutEngine | None = None,
) -> PolicySamples:
    """Sample one response per prompt and estimate KL(policy || reference) on it.

    The KL is the k1 estimator summed over response tokens, with log-probs at the sampling
    temperature (an unbiased estimate of the sequence-level KL under the policy's samples).
    """
    engine = engine or HFGenerateEngine()
    responses: list[str] = []
    kls: list[float] = []
    lengths: list[int] = []
    for _, ro in sample_rollouts(
        policy,
        tokenizer,
        prompts,
        1,
        max_new_tokens,
        temperature,
        batch_size,
        max_prompt_length,
        sort_by_length=False,  # batch j holds prompts j * batch_size onwards, in order
        progress=desc,
        engine=engine,
    ):
        responses += [
            t.strip() for t in tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
        ]
        lengths += ro.response_mask.sum(-1).tolist()
        if reference is not None:
            logp = ro.logprobs
            if not engine.exact_logprobs:  # the engine's own numbers are not the policy's
                logp, _ = response_logprobs(policy, ro, temperature)
            ref, _ = response_logprobs(reference, ro, temperature)
            kls += ((logp - ref) * ro.response_mask).sum(-1).tolist()
    return PolicySamples(prompts, responses, kls if reference is not None else None, lengths)


@torch.no_grad()
def lm_loss_on_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int = 128,
    batch_size: int = 32,
) -> float:
    """Per-token mean NLL (nats) of ``model`` on ``texts`` (+ EOS): the alignment-tax probe."""
    model.eval()
    examples, _ = encode_texts(tokenizer, texts, max_length)
    collate = LMCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size]).items()}
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        nll, mask = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
        total += float((nll * mask).sum())
        count += int(mask.sum())
    return total / max(1, count)
