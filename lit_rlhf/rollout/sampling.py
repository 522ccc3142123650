"""Batched sampling from text prompts: the one loop behind labeling and evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.data.lm_tokenize import left_pad
from lit_rlhf.rollout.engine import HFGenerateEngine, RolloutEngine
from lit_rlhf.rollout.record import Rollout


@torch.no_grad()
def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n_per_prompt: list[int] | int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    batch_size: int = 64,
    max_prompt_length: int = 128,
    sort_by_length: bool = True,
    progress: str | None = None,
    engine: RolloutEngine | None = None,
) -> Iterator[tuple[list[int], Rollout]]:
    """Sample ``n_per_prompt[i]`` responses for prompt ``i``, one batch at a time.

    Args:
        model: Causal LM (in eval mode while sampling; its mode is restored after).
        tokenizer: Its tokenizer (pad must differ from EOS).
        prompts: Prompt strings.
        n_per_prompt: Responses per prompt (one int for all).
        max_new_tokens: Response length limit.
        temperature: Sampling temperature.
        batch_size: Sequences generated together.
        max_prompt_length: Prompts keep their last this-many tokens.
        sort_by_length: Batch prompts of similar length (little padding); False keeps the
            given order, so batch ``j`` holds rows ``j * batch_size`` onwards.
        progress: Description of a progress bar (None: no bar).
        engine: The sampler (default :class:`HFGenerateEngine`).

    Yields:
        ``(rows, rollout)``: the prompt index of each row, and the batch's rollout.
    """
    engine = engine or HFGenerateEngine()
    counts = [n_per_prompt] * len(prompts) if isinstance(n_per_prompt, int) else list(n_per_prompt)
    flat = [i for i, k in enumerate(counts) for _ in range(k)]
    ids = [
        p[-max_prompt_length:] for p in tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ]
    device = next(model.parameters()).device
    order = sorted(range(len(flat)), key=lambda j: len(ids[flat[j]])) if sort_by_length else None
    order = order if order is not None else list(range(len(flat)))
    was_training = model.training
    model.eval()
    engine.load_weights(model)
    try:
        starts = range(0, len(order), batch_size)
        # disable=None: tqdm stays quiet when stderr is not a terminal (log files, CI).
        bar = tqdm(starts, desc=progress, disable=True if progress is None else None, leave=False)
        for s in bar:
            rows = [flat[j] for j in order[s : s + batch_size]]
            query, mask = left_pad([ids[i] for i in rows], tokenizer.pad_token_id)
            yield (
                rows,
                engine.generate(
                    model,
                    query.to(device),
                    mask.to(device),
                    max_new_tokens,
                    temperature,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                ),
            )
    finally:
        model.train(was_training)


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n_per_prompt: list[int] | int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    batch_size: int = 64,
    max_prompt_length: int = 128,
    progress: str | None = None,
    engine: RolloutEngine | None = None,
) -> list[list[str]]:
    """Decoded responses (special tokens removed), one list per prompt (:func:`sample_rollouts`)."""
    out: list[list[str]] = [[] for _ in prompts]
    for rows, ro in sample_rollouts(
        model,
        tokenizer,
        prompts,
        n_per_prompt,
        max_new_tokens,
        temperature,
        batch_size,
        max_prompt_length,
        sort_by_length=True,
        progress=progress,
        engine=engine,
    ):
        texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
        for i, text in zip(rows, texts):
            out[i].append(text.strip())
    return out
