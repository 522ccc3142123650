"""Tiny GPT-2- and Llama-shaped models built from a config, with no downloads.

They serve the embedded default (the "GPT-3" of the offline review world is a tiny GPT-2
trained from scratch) and every unit test.
"""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    dropout: float = 0.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PretrainedConfig:
    """Build a small GPT-2 or Llama config.

    Args:
        arch: ``"gpt2"`` (learned absolute positions, LayerNorm with bias) or ``"llama"``
            (RoPE, RMSNorm, SwiGLU).
        vocab_size: Vocabulary size (``len(tokenizer)`` when a tokenizer is given).
        hidden_size: Model width.
        num_layers: Number of transformer blocks.
        num_heads: Attention heads.
        max_positions: Longest sequence the model accepts.
        dropout: Residual/embedding/attention dropout.
        tokenizer: When given, its vocab size and pad/EOS/BOS ids are copied in.
    """
    special = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id
            if tokenizer.bos_token_id is not None
            else tokenizer.eos_token_id,
        }
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            # GPT-2's tanh GELU as one fused kernel (same function as "gelu_new").
            activation_function="gelu_pytorch_tanh",
            **special,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 8 // 3,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            tie_word_embeddings=True,
            **special,
        )
    raise ValueError(f"unknown tiny model arch {arch!r}; use 'gpt2' or 'llama'")


def build_tiny_causal_lm(
    arch: str = "gpt2",
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int = 512,
    seed: int | None = None,
    **config_kwargs,
) -> PreTrainedModel:
    """Create a randomly initialised tiny causal LM (float32).

    Args:
        arch: ``"gpt2"`` or ``"llama"``.
        tokenizer: Tokenizer whose vocab and special ids the model adopts.
        vocab_size: Used when no tokenizer is given.
        seed: When given, weights are initialised deterministically from it.
        **config_kwargs: Forwarded to :func:`tiny_config` (hidden_size, num_layers, ...).
    """
    import torch

    config = tiny_config(arch, vocab_size, tokenizer=tokenizer, **config_kwargs)
    if seed is None:
        return AutoModelForCausalLM.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
