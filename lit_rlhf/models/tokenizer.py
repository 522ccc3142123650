"""Train small byte-level BPE tokenizers offline and wrap them as Hugging Face tokenizers.

Byte-level means every string encodes (unknown words fall back to bytes) and decoding gives
the text back exactly. The special tokens follow the recipe's conventions: EOS
``<|endoftext|>`` (also BOS, never added automatically) and a distinct pad ``<|pad|>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_TEST_SENTENCES = (
    "Write a positive review of the acting in The Silent River.\nReview:",
    "Write a negative review of the plot in Iron Harbor.\nReview:",
    " The acting was absolutely brilliant. I loved the music, it was so wonderful.",
    " The plot was dull and the ending was terrible. I would not recommend it.",
    "The music was fine. The pacing was slow, but the visuals were beautiful.",
    "Hello world! Numbers 0123456789 and punctuation: , . ? ; ' \" ( ) - _",
)


def train_corpus_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike | None = None,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    The vocabulary holds the 256 byte symbols, the two special tokens (EOS id 0, pad id 1)
    and learned merges up to ``vocab_size``. Spaces attach to the following word (GPT-2
    style, no prefix space is added), so ``" The"`` after a prompt and ``"The"`` at the start
    of a text are different tokens. Training is deterministic for the same texts.

    Args:
        texts: Training texts (consumed once).
        vocab_size: Target vocabulary size including bytes and specials (>= 258).
        save_dir: When given, the tokenizer is written there with ``save_pretrained`` and
            loads back with ``AutoTokenizer.from_pretrained(save_dir)``.
        model_max_length: Longest sequence the tokenizer reports as allowed.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token == bos_token == "<|endoftext|>"``,
        ``pad_token == "<|pad|>"`` and ``padding_side == "right"``.
    """
    if vocab_size < 258:
        raise ValueError(
            f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        # Exact round trips: no space clean-up around punctuation on decode.
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


def tiny_test_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A small tokenizer trained on a few built-in sentences, for unit tests (< 0.1 s)."""
    return train_corpus_tokenizer(_TEST_SENTENCES * 4, vocab_size)
