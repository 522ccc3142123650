"""Load Hugging Face causal LMs, reward/value models and tokenizers by hub name or local path.

Every loader takes an explicit ``dtype`` (transformers 5 otherwise keeps the checkpoint's dtype),
can switch dropout off (RL needs deterministic forwards), and turns the many ways
``from_pretrained`` can fail into one :class:`ModelLoadError` that names the path and the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from lit_rlhf.models.heads import HEAD_ATTR, check_head_spec, install_score_head

log = logging.getLogger("lit_rlhf")

PAD_TOKEN = "<|pad|>"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded from the given name or path."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"bf16"``/... or a ``torch.dtype`` into a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError as err:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from err


def _describe(name_or_path: str, what: str) -> str:
    if os.path.isdir(name_or_path):
        return f"{what} folder '{name_or_path}' exists but could not be loaded"
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        return f"{what} path '{name_or_path}' does not exist"
    return (
        f"'{name_or_path}' is not a local folder and could not be fetched from the "
        f"Hugging Face Hub (offline, or no such repository)"
    )


def set_config_dropout(config: PretrainedConfig, p: float) -> list[str]:
    """Set every dropout probability in a transformers config to ``p``.

    Covers GPT-2 style ``*_pdrop`` and Llama/BERT style ``*dropout*`` float fields.

    Returns:
        The names of the fields that were changed.
    """
    changed = []
    for key, value in list(vars(config).items()):
        is_prob = isinstance(value, float) and not isinstance(value, bool)
        if is_prob and (key.endswith("pdrop") or "dropout" in key):
            setattr(config, key, float(p))
            changed.append(key)
    return changed


def set_module_dropout(model: torch.nn.Module, p: float) -> None:
    """Set ``p`` on every ``nn.Dropout`` inside ``model`` (after construction)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = float(p)


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    Args:
        name_or_path: Hub name or local folder.
        padding_side: ``"right"`` for training, ``"left"`` for generation.

    Returns:
        The tokenizer; when it lacked a pad token (or pad == EOS) ``<|pad|>`` is added, so
        the caller must resize the model's embeddings (:func:`load_causal_lm` does).
    """
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{_describe(name_or_path, 'tokenizer')}: {str(err).rstrip('. ')}. Point the stage "
            f"at a folder written by save_pretrained (or a Hub name reachable from this machine)."
        ) from err
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Add ``<|pad|>`` when the tokenizer has no pad token or pads with EOS.

    A pad equal to EOS makes sequence-classification pooling score the token *before* EOS
    and hides EOS from loss masks built by pad-id search (see pitfalls.md).

    Returns:
        True when a token was added (embeddings must then be resized).
    """
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            "the tokenizer has no EOS token; the recipe needs one to end responses. "
            "Set tokenizer.eos_token before using it."
        )
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.info("added pad token %s (id %d) distinct from EOS", PAD_TOKEN, tokenizer.pad_token_id)
    return True


def _load_config(name_or_path: str, dropout: float | None, **overrides: Any) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(name_or_path, **overrides)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{_describe(name_or_path, 'model')}: {str(err).rstrip('. ')}. Check the model path "
            f"override (e.g. model.name_or_path=...) points at a folder with config.json."
        ) from err
    if dropout is not None:
        set_config_dropout(config, dropout)
    if getattr(config, "activation_function", None) == "gelu_new":
        # The same tanh-approximated GELU as one fused kernel instead of ~8 elementwise ops
        # (agrees to float rounding; measurably faster and lighter on small GPT-2 models).
        config.activation_function = "gelu_pytorch_tanh"
    return config


def _sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    if tokenizer is None:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    dropout: float | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load an ``AutoModelForCausalLM`` with an explicit dtype and dropout.

    Args:
        name_or_path: Hub name or local folder.
        dtype: Parameter dtype (``"float32"`` for trainable models).
        dropout: When given, every dropout probability of the config is set to it
            (0.0 for RL; InstructGPT's SFT used 0.2).
        tokenizer: When given, embeddings are resized to it and pad/EOS ids copied to
            the model and generation configs.
    """
    config = _load_config(name_or_path, dropout)
    archs = getattr(config, "architectures", None) or []
    if archs and all("SequenceClassification" in a for a in archs):
        # transformers would load the backbone and invent a random LM head without a word.
        raise ModelLoadError(
            f"'{name_or_path}' is a reward/value model (architectures={archs}), not a causal "
            "LM; pass a language-model folder (the pretrain, sft or ppo stage's export)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=config, dtype=resolve_dtype(dtype)
        )
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(f"{_describe(name_or_path, 'model')} as a causal LM: {err}") from err
    if dropout is not None:
        set_module_dropout(model, dropout)
    _sync_special_tokens(model, tokenizer)
    return model


def load_sequence_classifier(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    dropout: float | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    from_causal_lm: bool = False,
) -> PreTrainedModel:
    """Load a scalar-head ``AutoModelForSequenceClassification`` (reward or value model).

    Args:
        name_or_path: Hub name or local folder.
        dtype: Parameter dtype.
        dropout: Optional dropout override (0.0 for RL).
        tokenizer: Optional tokenizer to resize embeddings to and take pad/EOS ids from.
        from_causal_lm: True when initialising a new reward model from a causal-LM
            checkpoint (the unembedding is dropped and a fresh scalar head created).
            False requires the folder to already be a one-label sequence classifier.
    """
    config = _load_config(name_or_path, dropout, num_labels=1)
    archs = getattr(config, "architectures", None) or []
    if not from_causal_lm and not any("SequenceClassification" in a for a in archs):
        raise ModelLoadError(
            f"'{name_or_path}' is not a sequence-classification (reward) model "
            f"(architectures={archs}); pass the folder exported by the rm stage."
        )
    spec = getattr(config, HEAD_ATTR, None)
    try:
        # An MLP-head export has no `score.weight`: transformers would report the head's keys
        # as missing/unexpected and make a random linear head, which is replaced below.
        quiet = _hf_quiet() if spec else contextlib.nullcontext()
        with quiet:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, dtype=resolve_dtype(dtype)
            )
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(
            f"{_describe(name_or_path, 'model')} as a sequence classifier: {err}"
        ) from err
    if spec:
        _restore_score_head(model, spec, name_or_path)
    if dropout is not None:
        set_module_dropout(model, dropout)
    _sync_special_tokens(model, tokenizer)
    return model


@contextlib.contextmanager
def _hf_quiet():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _restore_score_head(model: PreTrainedModel, spec: Any, name_or_path: str) -> None:
    """Rebuild the head ``config.lit_rlhf_score_head`` describes and load its saved weights."""
    try:
        if not isinstance(spec, dict) or spec.get("kind") != "mlp":
            raise ValueError("not an MLP head")
        check_head_spec("mlp", spec.get("hidden"))
    except ValueError:
        raise ModelLoadError(
            f"'{name_or_path}': config.json field {HEAD_ATTR}={spec!r} is not a score head this "
            'kit knows (expected {"kind": "mlp", "hidden": N}); re-export the reward model.'
        ) from None
    head = install_score_head(model, "mlp", spec["hidden"])
    prefix = next(n for n, m in model.named_modules() if m is head) + "."
    wanted = {prefix + k for k in head.state_dict()}
    tensors = _read_tensors(name_or_path, wanted)
    if set(tensors) != wanted:
        raise ModelLoadError(
            f"'{name_or_path}' declares an MLP score head but its weights lack "
            f"{sorted(wanted - set(tensors))}; re-export the reward model with save_pretrained."
        )
    head.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()})


def _read_tensors(name_or_path: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named ``keys`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open

    def resolve(filename: str) -> str | None:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)

    index = resolve("model.safetensors.index.json")
    if index:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted({weight_map[k] for k in keys if k in weight_map})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for filename in files:
        path = resolve(filename)
        if path is None:
            continue
        with safe_open(path, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in keys & set(fh.keys())})
    return out
