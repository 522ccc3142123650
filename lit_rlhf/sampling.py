"""Batched sampling of text responses from a causal LM (labeling and evaluation)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.rollout import generate


@torch.no_grad()
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
) -> list[list[str]]:
    """Sample ``n_per_prompt[i]`` responses for prompt ``i`` (pure sampling, cut at EOS).

    Args:
        model: Causal LM (put in eval mode here).
        tokenizer: Its tokenizer (pad must differ from EOS).
        prompts: Prompt strings.
        n_per_prompt: Responses per prompt (one int for all).
        max_new_tokens: Response length limit.
        temperature: Sampling temperature.
        batch_size: Sequences generated together.
        max_prompt_length: Prompts keep their last this-many tokens.
        progress: Description of a progress bar (None: no bar).

    Returns:
        One list of decoded responses (special tokens removed) per prompt.
    """
    counts = [n_per_prompt] * len(prompts) if isinstance(n_per_prompt, int) else list(n_per_prompt)
    flat = [i for i, k in enumerate(counts) for _ in range(k)]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids = [p[-max_prompt_length:] for p in ids]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[str]] = [[] for _ in prompts]
    # Sort by prompt length so batches carry little padding.
    order = sorted(range(len(flat)), key=lambda j: len(ids[flat[j]]))
    starts = range(0, len(order), batch_size)
    # disable=None: tqdm stays quiet when stderr is not a terminal (log files, CI).
    for s in tqdm(starts, desc=progress, disable=True if progress is None else None, leave=False):
        rows = [flat[j] for j in order[s : s + batch_size]]
        q = max(len(ids[i]) for i in rows)
        query = torch.full((len(rows), q), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), q), dtype=torch.long)
        for r, i in enumerate(rows):
            query[r, q - len(ids[i]) :] = torch.tensor(ids[i])
            mask[r, q - len(ids[i]) :] = 1
        ro = generate(
            model,
            query.to(device),
            mask.to(device),
            max_new_tokens,
            temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
        for i, text in zip(rows, texts):
            out[i].append(text.strip())
    model.train(was_training)
    return out
