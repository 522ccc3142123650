"""ComparisonsDataModule: K-wise/pairwise records, grouping per prompt, ties, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lit_rlhf.data.comparisons import (
    ComparisonCollator,
    ComparisonsDataModule,
    count_untied_pairs,
    encode_comparisons,
    read_comparisons_with_gold,
)
from lit_rlhf.data.records import DataFormatError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


KWISE = [
    {"prompt": "Review A:", "completions": ["good film", "bad", "meh ok"], "ranks": [0, 2, 1]},
    {"prompt": "Review B:", "completions": ["x", "y", "z", "w", "v"], "ranks": [1, 1, 0, 3, 2]},
    {"prompt": "Review C:", "completions": ["fine", "awful"], "ranks": [0, 1]},
    {"prompt": "Review D:", "completions": ["same", "same too"], "ranks": [0, 0]},
]


def _encode(tok, prompt, completion):
    return (
        tok(prompt, add_special_tokens=False)["input_ids"]
        + tok(completion, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )


def test_count_untied_pairs_matches_loop():
    for ranks in ([0, 1], [0, 0], [1, 1, 0, 3, 2], [2, 2, 2, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]):
        naive = sum(ranks[i] != ranks[j] for i in range(len(ranks)) for j in range(i))
        assert count_untied_pairs(ranks) == naive
    assert count_untied_pairs(list(range(9))) == 36


def test_collator_groups_every_prompt_responses_in_one_element(tok):
    examples, stats, dropped = encode_comparisons(tok, KWISE, max_length=64)
    assert dropped == 1 and len(examples) == 3  # Review D ties everything
    assert stats.examples == 10 and stats.prompts_cut == 0
    batch = ComparisonCollator(tok.pad_token_id)(examples)
    n = 3 + 5 + 2
    assert batch["input_ids"].shape[0] == n == batch["attention_mask"].shape[0]
    assert batch["ranks"].shape == (3, 5) == batch["valid"].shape == batch["index"].shape
    assert batch["valid"].sum(-1).tolist() == [3, 5, 2]
    assert batch["ranks"].tolist() == [[0, 2, 1, 0, 0], [1, 1, 0, 3, 2], [0, 1, 0, 0, 0]]
    assert batch["index"].tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 6, 7], [8, 9, 0, 0, 0]]
    # Each slot's row holds prompt ids + completion ids + EOS, right padded.
    for p, rec in enumerate(KWISE[:3]):
        for k, comp in enumerate(rec["completions"]):
            row = batch["index"][p, k]
            length = int(batch["attention_mask"][row].sum())
            assert batch["attention_mask"][row, :length].all()
            assert batch["input_ids"][row, :length].tolist() == _encode(tok, rec["prompt"], comp)
            assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
    assert "gold" not in batch


def test_datamodule_batch_size_counts_prompts_and_reads_pairwise(tmp_path, tok):
    recs = [dict(r, prompt=f"{r['prompt']} {i}") for i in range(4) for r in KWISE[:3]]
    pairwise = [{"prompt": "P:", "chosen": "yes good", "rejected": "no"}] * 3
    train = write_jsonl(tmp_path / "train.jsonl", recs + pairwise)
    val = write_jsonl(tmp_path / "val.jsonl", KWISE)
    dm = ComparisonsDataModule(train, val, max_length=64, batch_size=4, seed=0).connect(tok)
    dm.setup()
    assert len(dm.train_examples) == 15 and len(dm.val_examples) == 3
    assert dm.dropped_all_tied == 1
    assert dm.train_pairs == 4 * (3 + 9 + 1) + 3
    batches = list(dm.train_dataloader())
    assert [b["ranks"].shape[0] for b in batches] == [4, 4, 4, 3]
    for b in batches:  # padding-free by default: responses counted by their lengths
        assert b["attention_mask"] is None and b["input_ids"].shape[0] <= b["lengths"].shape[0]
        assert b["lengths"].shape[0] == b["ends"].shape[0] == int(b["valid"].sum())
        # Every response belongs to exactly one slot.
        assert sorted(b["index"][b["valid"]].tolist()) == list(range(b["lengths"].shape[0]))
    pairwise_ex = [
        ex for ex in dm.train_examples if len(ex["ranks"]) == 2 and ex["ranks"] == [0, 1]
    ]
    assert any(ex["input_ids"][0] == _encode(tok, "P:", "yes good") for ex in pairwise_ex)
    stats = dm.stats()
    assert stats["rm/pairs_train"] == dm.train_pairs and stats["rm/dropped_all_tied"] == 1


def test_split_when_no_val_source(tmp_path, tok):
    recs = [dict(KWISE[0], prompt=f"p{i}") for i in range(20)]
    dm = ComparisonsDataModule(write_jsonl(tmp_path / "c.jsonl", recs), val_fraction=0.1)
    dm.connect(tok).setup()
    assert len(dm.train_examples) == 18 and len(dm.val_examples) == 2
    assert {r["prompt"] for r in dm.val_records}.isdisjoint(
        {tok.decode(ex["input_ids"][0]) for ex in dm.train_examples}
    )


def test_all_tied_records_are_counted_and_warned(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "c.jsonl", KWISE * 3)
    dm = ComparisonsDataModule(path, path, max_length=64).connect(tok)
    with caplog.at_level(logging.WARNING, logger="lit_rlhf"):
        dm.setup()
    assert dm.dropped_all_tied == 6
    assert "dropped 3 of 12" in caplog.text and "all tie" in caplog.text


def test_only_tied_records_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [KWISE[3]] * 4)
    dm = ComparisonsDataModule(path, path).connect(tok)
    with pytest.raises(DataFormatError, match="tie"):
        dm.setup()


def test_truncation_cuts_prompt_from_left_and_keeps_eos(tok):
    rec = {"prompt": "a" * 50, "completions": ["good", "bad"], "ranks": [0, 1]}
    examples, stats, _ = encode_comparisons(tok, [rec], max_length=20)
    assert stats.prompts_cut == 2
    ids = examples[0]["input_ids"][0]
    assert len(ids) == 20 and ids[-1] == tok.eos_token_id
    good = tok("good", add_special_tokens=False)["input_ids"]
    assert ids[-len(good) - 1 : -1] == good


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 1]}, "one rank per"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 0.5]}, "non-negative integers"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, "1"]}, "non-negative integers"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": "01"}, "one rank per"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1], "gold": [1.0]}, "gold"),
    ],
)
def test_malformed_ranking_names_file_and_line(tmp_path, tok, bad, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [KWISE[0], KWISE[1], bad])
    dm = ComparisonsDataModule(path, path).connect(tok)
    with pytest.raises(DataFormatError, match=match) as err:
        dm.setup()
    assert f"{path}, line 3" in str(err.value)


def test_gold_scores_are_read_and_collated(tmp_path, tok):
    recs = [dict(KWISE[0], gold=[0.9, -0.5, 0.1]), KWISE[2]]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    read = read_comparisons_with_gold(path)
    assert read[0]["gold"] == [0.9, -0.5, 0.1] and "gold" not in read[1]
    examples, _, _ = encode_comparisons(tok, read, 64)
    batch = ComparisonCollator(tok.pad_token_id)(examples)
    assert batch["has_gold"].tolist() == [True, False]
    torch.testing.assert_close(batch["gold"][0], torch.tensor([0.9, -0.5, 0.1]))
    assert batch["gold"][1].tolist() == [0.0, 0.0, 0.0]
