"""Byte-level BPE tokenizers trained offline: round trips, special tokens, save/reload."""

import json
import time

import pytest
from transformers import AutoTokenizer

from lit_rlhf.models.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    tiny_test_tokenizer,
    train_corpus_tokenizer,
)

CORPUS = [
    "The acting was absolutely brilliant. I loved the music.",
    "The plot was dull, but the ending was fine.",
    "Write a positive review of the acting in The Silent River.\nReview:",
] * 20
ODD = [
    "Hello  wörld 😀 — ünïcode!",
    "tabs\tand\nnewlines\r\n",
    " leading and trailing spaces ",
    "The acting was superb.",
    "",
]


def test_round_trip_special_tokens_and_padding():
    tok = train_corpus_tokenizer(CORPUS, vocab_size=300)
    assert len(tok) <= 300
    assert tok.eos_token == tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.padding_side == "right" and tok.model_max_length == 512
    for text in ODD:  # byte-level: anything encodes, decoding is exact
        ids = tok(text)["input_ids"]
        assert tok.eos_token_id not in ids  # nothing is added automatically
        assert tok.decode(ids) == text
    # learned merges: a frequent word is one token, with its leading space
    assert tok.convert_ids_to_tokens(tok(" acting")["input_ids"]) == ["Ġacting"]
    batch = tok(["The plot", "The acting was absolutely brilliant."], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id
    assert batch["attention_mask"][0][-1] == 0 and all(batch["attention_mask"][1])


def test_save_and_reload_with_auto_tokenizer(tmp_path):
    tok = train_corpus_tokenizer(CORPUS, vocab_size=300, save_dir=tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in ODD + CORPUS[:3]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == text
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (0, 1, 0)
    assert again.padding_side == "right" and len(again) == len(tok)


def test_training_is_deterministic(tmp_path):
    train_corpus_tokenizer(CORPUS, 300, save_dir=tmp_path / "a")
    train_corpus_tokenizer(iter(CORPUS), 300, save_dir=tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        a = json.loads((tmp_path / "a" / name).read_text())
        assert a == json.loads((tmp_path / "b" / name).read_text())


def test_tiny_test_tokenizer_is_fast_and_usable():
    start = time.perf_counter()
    tok = tiny_test_tokenizer()
    assert time.perf_counter() - start < 1.0
    assert tok.pad_token_id != tok.eos_token_id
    text = "Write a positive review of the plot.\nReview: The plot was great."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tiny_test_tokenizer() is not tok  # a fresh object per call: tests may mutate it


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_corpus_tokenizer(CORPUS, vocab_size=100)
