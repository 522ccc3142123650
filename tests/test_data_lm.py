"""Record validation, LM tokenization (masking, truncation), collation, the LM DataModules.

Packing (dataset rows and padding-free batches) is tested in tests/test_packing.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lit_rlhf.data import lm_tokenize
from lit_rlhf.data.lm_datamodule import (
    DemonstrationsDataModule,
    PretrainDataModule,
    split_train_val,
)
from lit_rlhf.data.lm_tokenize import (
    LMCollator,
    encode_demonstrations,
    encode_texts,
    tokenize_capped,
)
from lit_rlhf.data.records import DataFormatError, read_records, write_jsonl


def _jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _demos(n, start=0):
    return [{"prompt": f"question {i}? ", "completion": f"answer {i}."} for i in range(start, n)]


# -- records ------------------------------------------------------------------------------


def test_read_demonstrations_jsonl(tmp_path):
    extra = {"prompt": "", "completion": "x", "id": 7}
    path = _jsonl(tmp_path / "d.jsonl", [*_demos(2), "", extra])
    recs = read_records(path, "demonstrations")
    assert recs == [*_demos(2), {"prompt": "", "completion": "x"}]  # extras dropped, "" prompt ok
    assert read_records(path, "demonstrations", limit=1) == _demos(1)


def test_missing_file_names_path(tmp_path):
    for ext in ("jsonl", "json", "parquet"):
        missing = str(tmp_path / f"nope.{ext}")
        with pytest.raises(DataFormatError, match="does not exist") as err:
            read_records(missing, "demonstrations")
        assert missing in str(err.value)


def test_folder_given_as_data_file_says_it_is_a_folder(tmp_path):
    for name in ("demos.jsonl", "demos.json", "demos.parquet", "demos"):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(DataFormatError, match="is a folder; give the file inside it"):
            read_records(str(folder), "demonstrations")


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [*_demos(2), "   ", {"prompt": "p"}])
    with pytest.raises(DataFormatError) as err:
        read_records(path, "demonstrations")
    msg = str(err.value)
    # Blank line 3 is skipped but still counted: the bad record is line 4.
    assert f"{path}, line 4" in msg and "'completion'" in msg


def test_empty_completion(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_demos(1)[0], {"prompt": "p", "completion": "  "}])
    with pytest.raises(DataFormatError, match=r"line 2: field 'completion' is empty") as err:
        read_records(path, "demonstrations")
    assert path in str(err.value)


def test_non_string_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": 3}])
    with pytest.raises(DataFormatError, match=r"line 1: field 'completion' must be a string"):
        read_records(path, "demonstrations")


def test_non_json_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_demos(1)[0], '{"prompt": "p", "completion": '])
    with pytest.raises(DataFormatError, match=r"line 2: not valid JSON") as err:
        read_records(path, "demonstrations")
    assert path in str(err.value)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(_demos(1)[0]).encode() + b'\n{"prompt": "\xff\xfe", "completion": "x"}\n'
    )
    with pytest.raises(DataFormatError, match=r"line 2: not valid UTF-8") as err:
        read_records(str(path), "demonstrations")
    assert str(path) in str(err.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ['[{"prompt": "p", "completion": "c"}]'])
    with pytest.raises(DataFormatError, match=r"line 1: expected a JSON object, got list") as err:
        read_records(path, "demonstrations")
    assert path in str(err.value)


def test_json_array_file(tmp_path):
    good = tmp_path / "d.json"
    good.write_text(json.dumps(_demos(3)))
    assert read_records(str(good), "demonstrations") == _demos(3)
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": _demos(2)}))
    assert read_records(str(wrapped), "demonstrations") == _demos(2)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([*_demos(2), {"prompt": "p"}]))
    with pytest.raises(DataFormatError, match=r"record 3: missing field 'completion'") as err:
        read_records(str(bad), "demonstrations")
    assert str(bad) in str(err.value)

    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"prompt": "p", "completion": "c"}))
    with pytest.raises(DataFormatError, match="expected a JSON array") as err:
        read_records(str(obj), "demonstrations")
    assert str(obj) in str(err.value)

    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "p",\n "completion": }]')
    with pytest.raises(DataFormatError, match=r"line 2: not valid JSON") as err:
        read_records(str(broken), "demonstrations")
    assert str(broken) in str(err.value)


def test_parquet_file(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(_demos(3)), path)
    assert read_records(path, "demonstrations") == _demos(3)

    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": ""}] * 2), bad)
    with pytest.raises(DataFormatError, match=r"record 1: field 'completion' is empty") as err:
        read_records(bad, "demonstrations")
    assert bad in str(err.value)

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="not a readable Parquet file"):
        read_records(str(corrupt), "demonstrations")


def test_unsupported_and_empty(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n")
    with pytest.raises(DataFormatError, match="unsupported data file"):
        read_records(str(csv), "demonstrations")
    empty = _jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataFormatError, match="holds no demonstrations records"):
        read_records(empty, "demonstrations")
    with pytest.raises(DataFormatError, match="unknown record kind"):
        read_records(empty, "demos")


def test_field_mapping(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a."}])
    fields = {"prompt": "question", "completion": "answer"}
    assert read_records(path, "demonstrations", fields) == [{"prompt": "q?", "completion": "a."}]
    with pytest.raises(DataFormatError, match="missing field 'prompt'.*data.fields.prompt="):
        read_records(path, "demonstrations")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q?"}])
    with pytest.raises(DataFormatError) as err:
        read_records(bad, "demonstrations", fields)
    msg = str(err.value)
    # The source's name is reported, and the hint names the canonical mapping key.
    assert "missing field 'answer'" in msg and "data.fields.completion=" in msg

    texts = _jsonl(tmp_path / "t.jsonl", [{"body": "some text"}])
    assert read_records(texts, "pretrain", {"text": "body"}) == [{"text": "some text"}]


def test_comparisons_pairwise_and_kwise(tmp_path):
    path = _jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "completions": ["a", "b", "c"], "ranks": [1, 0, 1]},
        ],
    )
    recs = read_records(path, "comparisons")
    assert recs[0] == {"prompt": "p", "completions": ["good", "bad"], "ranks": [0, 1]}
    assert recs[1] == {"prompt": "q", "completions": ["a", "b", "c"], "ranks": [1, 0, 1]}

    # An empty sampled response is a legitimate (bad) K-wise candidate: ranked, not refused.
    empty = _jsonl(
        tmp_path / "e.jsonl", [{"prompt": "p", "completions": ["a", ""], "ranks": [0, 1]}]
    )
    assert read_records(empty, "comparisons")[0]["completions"] == ["a", ""]

    mapped = _jsonl(tmp_path / "m.jsonl", [{"q": "p", "win": "good", "lose": "bad"}])
    fields = {"prompt": "q", "chosen": "win", "rejected": "lose"}
    assert read_records(mapped, "comparisons", fields)[0]["completions"] == ["good", "bad"]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 1]}, "one rank per"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": 0}, "one rank per completion"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1.5]}, "rank 1 is 1.5"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, "1"]}, "rank 1 is '1'"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [True, 0]}, "rank 0 is True"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, -1]}, "rank 1 is -1"),
        ({"prompt": "p", "completions": ["a"], "ranks": [0]}, ">= 2 strings"),
        ({"prompt": "p", "completions": ["a", 3], "ranks": [0, 1]}, "completion 1 must be"),
        ({"prompt": "p", "completions": ["a", "b"]}, "missing field 'ranks'"),
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same text"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 10**30]}, "rank 1 is 1000"),
    ],
)
def test_comparison_errors_name_file_and_line(tmp_path, record, pattern):
    ok = {"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1]}
    path = _jsonl(tmp_path / "c.jsonl", [ok, record])
    with pytest.raises(DataFormatError, match=pattern) as err:
        read_records(path, "comparisons")
    assert f"{path}, line 2" in str(err.value)


def test_write_jsonl_roundtrip(tmp_path):
    path = str(tmp_path / "sub" / "out.jsonl")
    write_jsonl(_demos(3), path)
    assert read_records(path, "demonstrations") == _demos(3)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.jsonl"]


# -- tokenization -------------------------------------------------------------------------


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_demonstrations_masks_prompt(byte_tok):
    prompts, comps = ["Review: ", "Q"], ["great", "no"]
    exs, stats = encode_demonstrations(byte_tok, prompts, comps, max_length=64)
    for ex, p, c in zip(exs, prompts, comps):
        p_ids, c_ids = _ids(byte_tok, p), _ids(byte_tok, c)
        assert ex["input_ids"] == p_ids + c_ids + [byte_tok.eos_token_id]
        assert ex["loss_mask"] == [0] * len(p_ids) + [1] * (len(c_ids) + 1)
        first = len(p_ids)
        assert ex["loss_mask"][first] == 1 and ex["loss_mask"][first - 1] == 0
    assert stats.examples == 2 and stats.prompts_cut == stats.responses_cut == 0

    no_eos, _ = encode_demonstrations(byte_tok, ["a"], ["b"], 8, append_eos=False)
    assert no_eos[0]["input_ids"] == _ids(byte_tok, "ab") and no_eos[0]["loss_mask"] == [0, 1]


def test_encode_demonstrations_subword_boundary(tok):
    # With a BPE tokenizer, prompt and completion are tokenized apart, so the targets are
    # exactly the completion's own tokens (+ EOS), however the two strings would merge.
    prompt, comp = "Write a positive review.\nReview:", " The acting was wonderful."
    (ex,), _ = encode_demonstrations(tok, [prompt], [comp], max_length=128)
    targets = [t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert targets == _ids(tok, comp) + [tok.eos_token_id]
    assert tok.decode(targets[:-1]) == comp
    assert ex["loss_mask"].index(1) == len(_ids(tok, prompt))


def test_encode_demonstrations_truncation(byte_tok):
    prompt, comp = "0123456789", "abc"  # byte tokenizer: 10 prompt tokens, 3 + EOS response
    exs, stats = encode_demonstrations(byte_tok, [prompt, "xy"], [comp, "z"], max_length=8)
    ex = exs[0]
    assert len(ex["input_ids"]) == 8
    # The response (with EOS) is whole; the prompt keeps its last 4 tokens.
    assert ex["input_ids"] == _ids(byte_tok, "6789abc") + [byte_tok.eos_token_id]
    assert ex["loss_mask"] == [0] * 4 + [1] * 4
    assert exs[1]["input_ids"] == _ids(byte_tok, "xyz") + [byte_tok.eos_token_id]
    assert (stats.prompts_cut, stats.prompt_tokens_cut) == (1, 6)
    assert stats.responses_cut == 0
    metrics = stats.as_metrics()
    assert metrics["data/prompts_cut"] == 1.0 and metrics["data/prompt_tokens_cut"] == 6.0


def test_encode_demonstrations_overlong_response(byte_tok):
    exs, stats = encode_demonstrations(byte_tok, ["prompt"], ["abcdefghij"], max_length=6)
    assert exs[0]["input_ids"] == _ids(byte_tok, "abcdef")  # EOS lost, prompt gone
    assert exs[0]["loss_mask"] == [1] * 6
    assert (stats.responses_cut, stats.response_tokens_cut) == (1, 5)  # 10 + EOS - 6
    assert (stats.prompts_cut, stats.prompt_tokens_cut) == (1, 6)


class _LongestInput:
    """Wraps a tokenizer and records the longest string it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0
        self.eos_token_id = tok.eos_token_id

    def __call__(self, texts, **kw):
        texts_ = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest, *map(len, texts_)])
        return self.tok(texts, **kw)


def _uncapped(tok, prompt, comp, max_length):
    # The token-level policy on the whole strings, written out: keep the response's first
    # max_length tokens (with EOS), then the prompt's last tokens that still fit.
    c = (_ids(tok, comp) + [tok.eos_token_id])[:max_length]
    room = max_length - len(c)
    p = _ids(tok, prompt)[-room:] if room else []
    return p + c


def test_overlong_record_is_cut_by_characters_before_tokenization(tok):
    words = " ".join(f"word{i % 97}" for i in range(40_000))  # ~300k characters
    prompts, comps = [words + " Review:", "short prompt"], [" fine", words]
    spy = _LongestInput(tok)
    exs, stats = encode_demonstrations(spy, prompts, comps, max_length=32)
    # The tokenizer never saw the 300k-character strings, only their cut ends.
    assert spy.longest <= 32 * lm_tokenize.CHARS_PER_TOKEN
    assert stats.chars_cut == 2
    for ex, p, c in zip(exs, prompts, comps):
        assert ex["input_ids"] == _uncapped(tok, p, c, 32)
    assert stats.prompts_cut == 2 and stats.responses_cut == 1


def test_cut_text_that_tokenizes_short_is_redone_whole(byte_tok, monkeypatch):
    # One character per token of budget: the cut text gives too few tokens to be sure, so the
    # whole text is tokenized; the result is what token-level truncation alone gives.
    monkeypatch.setattr(lm_tokenize, "CHARS_PER_TOKEN", 1)
    text = "abcdefghijklmnopqrstuvwxyz" * 3
    (start,), n_cut = tokenize_capped(byte_tok, [text], 8, keep="start")
    (end,), _ = tokenize_capped(byte_tok, [text], 8, keep="end")
    assert n_cut == 1 and start == end == _ids(byte_tok, text)
    with pytest.raises(ValueError, match="keep"):
        tokenize_capped(byte_tok, [text], 8, keep="middle")


def test_huge_pretraining_text_is_tokenized_in_pieces_and_kept_whole(byte_tok, monkeypatch):
    monkeypatch.setattr(lm_tokenize, "TEXT_PIECE_CHARS", 50)
    text = " ".join(f"token{i}" for i in range(60))  # ~430 characters, 9+ pieces
    spy = _LongestInput(byte_tok)
    exs, stats = encode_texts(spy, [text, "xy"], max_length=16)
    assert spy.longest <= 50 and stats.texts_split == 1
    flat = [t for ex in exs for t in ex["input_ids"]]
    eos = [byte_tok.eos_token_id]
    assert flat == _ids(byte_tok, text) + eos + _ids(byte_tok, "xy") + eos


def test_encode_texts_chunks_without_dropping(byte_tok):
    texts = ["abcdefghijklm", "xy"]
    exs, stats = encode_texts(byte_tok, texts, max_length=5)
    flat = [t for ex in exs for t in ex["input_ids"]]
    eos = [byte_tok.eos_token_id]
    expected = _ids(byte_tok, texts[0]) + eos + _ids(byte_tok, texts[1]) + eos
    assert flat == expected  # nothing dropped, order kept
    assert [len(ex["input_ids"]) for ex in exs] == [5, 5, 4, 3]
    assert all(all(ex["loss_mask"]) for ex in exs)
    assert stats.chunks == 2 and stats.examples == 2


def test_collator_dynamic_padding(byte_tok):
    exs, _ = encode_demonstrations(byte_tok, ["ab", "abcdef"], ["c", "g"], max_length=32)
    batch = LMCollator(pad_token_id=byte_tok.pad_token_id)(exs)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8]
    assert batch["input_ids"][0, 4:].tolist() == [byte_tok.pad_token_id] * 4
    assert batch["loss_mask"].dtype == torch.bool
    assert batch["loss_mask"][0].tolist() == [False, False, True, True] + [False] * 4
    assert batch["position_ids"][1].tolist() == list(range(8))
    padded = LMCollator(pad_token_id=byte_tok.pad_token_id, pad_to_multiple_of=5)(exs)
    assert padded["input_ids"].shape == (2, 10)


# -- DataModules --------------------------------------------------------------------------


def test_demonstrations_datamodule_val_split(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", _demos(20))
    dm = DemonstrationsDataModule(path, val_fraction=0.2, batch_size=4, max_length=64, seed=1)
    with pytest.raises(RuntimeError, match="connect"):
        dm.setup("fit")
    assert dm.connect(tok) is dm
    dm.setup("fit")
    assert len(dm.train_examples) == 16 and len(dm.val_examples) == 4
    as_text = {tok.decode(e["input_ids"]) for e in dm.train_examples + dm.val_examples}
    assert len(as_text) == 20  # disjoint and complete
    # Same seed -> same split.
    dm2 = DemonstrationsDataModule(path, val_fraction=0.2, batch_size=4, max_length=64, seed=1)
    dm2.connect(tok).setup("fit")
    assert dm2.val_examples == dm.val_examples

    for batch in dm.train_dataloader():
        lengths = batch["attention_mask"].sum(-1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # dynamic padding
        assert batch["input_ids"].shape[0] <= 4
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == 4


def test_demonstrations_datamodule_separate_val_file(tmp_path, tok):
    train = _jsonl(tmp_path / "train.jsonl", _demos(6))
    val = _jsonl(tmp_path / "val.jsonl", _demos(9, start=6))
    dm = DemonstrationsDataModule(train, val_source=val, batch_size=2, max_length=64)
    dm.connect(tok).setup("fit")
    assert len(dm.train_examples) == 6 and len(dm.val_examples) == 3
    assert tok.decode(dm.val_examples[0]["input_ids"]).startswith("question 6?")

    bad_val = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    dm = DemonstrationsDataModule(train, val_source=bad_val).connect(tok)
    with pytest.raises(DataFormatError, match="bad.jsonl, line 1"):
        dm.setup("fit")


def test_datamodule_truncation_counted(tmp_path, byte_tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 30, "completion": "c"}] * 4)
    dm = DemonstrationsDataModule(path, val_fraction=0.25, max_length=10).connect(byte_tok)
    dm.setup("fit")
    assert dm.truncation.prompts_cut == 4 and dm.truncation.prompt_tokens_cut == 4 * 22


def test_pretrain_datamodule_packs(tmp_path, tok):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "word " * (i % 5 + 1)} for i in range(12)])
    dm = PretrainDataModule(path, val_fraction=0.25, max_length=32, batch_size=2).connect(tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"] is None and batch["loss_mask"].any()
    assert batch["input_ids"].shape[1] <= 32
    assert any((row[1:] == 0).any() for row in batch["position_ids"])  # restarts: packed


def test_split_train_val_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val([1, 2, 3], 1.0, 0)
    with pytest.raises(DataFormatError, match="too few"):
        split_train_val([1], 0.5, 0)
    train, val = split_train_val(list(range(10)), 0.0, 0)
    assert train == list(range(10)) and val == []
    train, val = split_train_val(list(range(10)), 0.01, 0)
    assert len(val) == 1  # at least one when > 0
