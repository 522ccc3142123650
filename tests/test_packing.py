"""Packing: dataset-level rows, padding-free batches, and the packed-attention probe."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from test_reward_model import RECORDS, classifier
from torch import nn

from lit_rlhf.data.comparisons import ComparisonCollator, encode_comparisons
from lit_rlhf.data.lm_tokenize import (
    LMCollator,
    encode_demonstrations,
    encode_texts,
    first_fit_decreasing,
    pack_batch,
    pack_examples,
)
from lit_rlhf.models.packing import (
    PackedAttentionError,
    packed_attention_leak,
    require_packed_attention,
)
from lit_rlhf.modules.reward import RewardModule
from lit_rlhf.modules.sft import SFTModule
from lit_rlhf.ops.lm_loss import lm_loss
from lit_rlhf.ops.ranking import kwise_ranking_loss
from lit_rlhf.stages.context import ConfigError
from lit_rlhf.stages.lm import _module_kwargs

PROMPTS = ["first prompt ", "b", "a third, longer prompt: ", "x", "", "Review:"]
COMPLETIONS = ["one", "second answer here", "3", "yy", "a long completion text", "ok"]


def test_first_fit_decreasing_known_case_and_invariants():
    assert first_fit_decreasing([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 30))]
        cap = max(lengths) + rng.randint(0, 10)
        bins = first_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # No two bins could be merged: first fit leaves every pair of bins over capacity.
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert all(a + b > cap for j, a in enumerate(loads) for b in loads[j + 1 :])
    with pytest.raises(ValueError, match="exceeds the capacity"):
        first_fit_decreasing([3, 9], 8)


def _width(rows):
    return max(len(r["input_ids"]) for r in rows)


def test_pack_batch_row_width_rule():
    def exs(*lengths):
        return [{"input_ids": [7] * n, "loss_mask": [1] * n} for n in lengths]

    # Short examples fit beside long ones: rows as wide as the longest (never more compute).
    rows, _ = pack_batch(exs(10, 2, 3, 9, 1, 8))  # [10] [9 1] [8 2] [3]
    assert len(rows) == 4 and _width(rows) == 10
    # Equal lengths: wider rows would save nothing, so one example per row.
    rows, _ = pack_batch(exs(*[8] * 6))
    assert len(rows) == 6 and _width(rows) == 8
    # Most longer than half the longest: 7 x 10 = 70 slots, twice as wide 3 x 18 = 54.
    rows, _ = pack_batch(exs(10, 6, 6, 6, 6, 6, 6))
    assert len(rows) == 3 and _width(rows) == 18
    # 4 x 10 = 40 slots vs 2 x 19 = 38 (5 % saved): stays narrow.
    assert _width(pack_batch(exs(10, 9, 9, 8))[0]) == 10
    assert _width(pack_batch(exs(10, 9, 9, 8), capacity=30)[0]) == 28  # [10 9 9] [8]


def test_pack_batch_rows_hold_the_batch_examples(tok):
    exs, _ = encode_demonstrations(tok, PROMPTS, COMPLETIONS, max_length=64)
    rows, bins = pack_batch(exs)
    assert len(rows) < len(exs)  # short examples share rows
    for row, members in zip(rows, bins):
        assert row["input_ids"] == sum((exs[i]["input_ids"] for i in members), [])
        # An example's first token is never a target (nothing of its own precedes it).
        assert row["loss_mask"] == sum(([0] + exs[i]["loss_mask"][1:] for i in members), [])
        want_pos = sum((list(range(len(exs[i]["input_ids"]))) for i in members), [])
        assert row["position_ids"] == want_pos


def test_sft_padding_free_batch_gives_the_padded_loss_and_gradient(tok, tiny_lm):
    exs, _ = encode_demonstrations(tok, PROMPTS, COMPLETIONS, max_length=64)
    padded = LMCollator(pad_token_id=tok.pad_token_id)(exs)
    free = LMCollator(pad_token_id=tok.pad_token_id, padding_free=True)(exs)
    assert free["attention_mask"] is None
    assert free["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert tok.pad_token_id not in free["input_ids"][:, -1].tolist()  # no transformers warning
    # Positions never exceed the longest example's (the position table), however wide a row.
    assert free["position_ids"].max() < padded["input_ids"].shape[1]
    # The same targets (a row's first token is never one; the empty prompt makes one such).
    targets = int(padded["loss_mask"][:, 1:].sum())
    assert int(free["loss_mask"][:, 1:].sum()) == targets < int(padded["loss_mask"].sum())
    module = SFTModule(tiny_lm())
    grads, losses = [], []
    for batch in (padded, free):
        module.zero_grad()
        loss = lm_loss(module(batch), batch["input_ids"], batch["loss_mask"])
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rm_padding_free_scores_and_loss_equal_padded(tok, arch):
    examples, _, _ = encode_comparisons(tok, RECORDS, max_length=64)
    padded = ComparisonCollator(tok.pad_token_id)(examples)
    free = ComparisonCollator(tok.pad_token_id, padding_free=True)(examples)
    n = padded["input_ids"].shape[0]
    assert free["attention_mask"] is None and free["ends"].shape == (n,)
    assert free["input_ids"].shape[0] < n
    # ends point at each response's last token (EOS) and lengths count its tokens.
    assert (free["input_ids"].flatten()[free["ends"]] == tok.eos_token_id).all()
    torch.testing.assert_close(free["lengths"], padded["attention_mask"].sum(-1))
    for key in ("ranks", "valid", "index"):
        torch.testing.assert_close(free[key], padded[key])
    module = RewardModule(classifier(tok, arch))
    outs = []
    for batch in (padded, free):
        module.zero_grad()
        rewards = module.rewards(batch)
        loss, _ = kwise_ranking_loss(rewards, batch["ranks"], batch["valid"])
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        outs.append((rewards.detach(), loss.detach(), grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=1e-4, atol=1e-6)


class _LeakyLM(nn.Module):
    """Attends to everything before a token whatever the positions say (cumulative mean)."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return SimpleNamespace(logits=self.head(h.cumsum(1) / steps))


def test_probe_passes_real_models_and_rejects_a_leaky_one(tok, tiny_lm):
    assert packed_attention_leak(tiny_lm()) < 1e-4
    assert packed_attention_leak(classifier(tok, "llama")) < 1e-4
    leaky = _LeakyLM()
    assert packed_attention_leak(leaky) > 0.5
    with pytest.raises(PackedAttentionError, match="padding_free"):
        require_packed_attention(leaky)
    # The module checks before the first packed batch reaches the model.
    exs = [{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1]}, {"input_ids": [4], "loss_mask": [1]}]
    batch = LMCollator(pad_token_id=0, padding_free=True)(exs)
    with pytest.raises(PackedAttentionError):
        SFTModule(leaky)(batch)
    padded = LMCollator(pad_token_id=0)(exs)
    assert SFTModule(leaky)(padded).shape == (2, 3, 16)  # padded batches are not probed


@pytest.mark.parametrize("key", ["packing", "padding_free"])
def test_sequence_mean_with_packed_rows_is_a_config_error(key):
    with pytest.raises(ConfigError, match=rf"sft\.{key}=false"):
        _module_kwargs({"loss_reduction": "sequence_mean", key: True}, "sft")
    assert _module_kwargs({"loss_reduction": "token_mean", key: True}, "sft") == {
        "loss_reduction": "token_mean"
    }


def test_pack_examples_naive(tok):
    exs, _ = encode_texts(tok, ["aaaa", "bb", "cccccc", "d", "eeeeeee"], max_length=16)
    rows = pack_examples(exs, max_length=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    # Naive reference: greedy first-fit in order.
    expected, cur = [], []
    for ex in exs:
        if cur and sum(len(e["input_ids"]) for e in cur) + len(ex["input_ids"]) > 10:
            expected.append(cur)
            cur = []
        cur.append(ex)
    expected.append(cur)
    assert len(rows) == len(expected)
    for row, group in zip(rows, expected):
        assert row["input_ids"] == [t for e in group for t in e["input_ids"]]
        # Each text's first token is not a target: not predicted from the text before it.
        assert row["loss_mask"] == [
            int(i > 0) * m for e in group for i, m in enumerate(e["loss_mask"])
        ]
        assert row["position_ids"] == [p for e in group for p in range(len(e["input_ids"]))]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packing_has_no_cross_sample_attention(tok, arch):
    from lit_rlhf.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(
        arch, tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, seed=0
    ).eval()
    exs, _ = encode_demonstrations(
        tok,
        ["first prompt ", "b", "a third, longer prompt: ", "x"],
        ["one", "second answer", "3", "yy"],
        max_length=64,
    )
    rows = pack_examples(exs, max_length=40)
    assert len(rows) == 2 and len(rows[0]["position_ids"]) != len(rows[1]["position_ids"])
    batch = LMCollator(pad_token_id=tok.pad_token_id, packed=True)(rows)
    assert batch["attention_mask"] is None
    module = SFTModule(model)
    with torch.no_grad():
        packed = module(batch)  # the module's own forward (it passes use_cache=False)
        remaining = iter(exs)
        for r, row in enumerate(rows):
            offset = 0
            while offset < len(row["input_ids"]):
                ids = next(remaining)["input_ids"]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                got = packed[r, offset : offset + len(ids)]
                torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
                offset += len(ids)
        assert next(remaining, None) is None
        # The check has power: with the default use_cache=True transformers builds a cache,
        # skips packed-sequence detection and the second example attends to the first.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        assert (leaky[0] - packed[0]).abs().max() > 1e-3
