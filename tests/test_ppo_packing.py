"""Padding-free PPO forwards: the packed layout, equal numbers, the cost rule, a whole run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_packing import _LeakyLM
from test_ppo import SMALL, _classifier, fit, make_module
from transformers import ByT5Tokenizer

from lit_rlhf.models.packing import PackedAttentionError
from lit_rlhf.models.tiny import build_tiny_causal_lm
from lit_rlhf.ops.masking import truncate_after_eos
from lit_rlhf.rollout import Rollout, response_logprobs, response_values, score
from lit_rlhf.rollout.packed import PackedRollout


@pytest.fixture
def tok():
    return ByT5Tokenizer()


def _rollout(tok, b=8, q=6, r=10, seed=0) -> Rollout:
    """Left-padded prompts of 1..q tokens, responses of 1..r tokens (EOS on most)."""
    g = torch.Generator().manual_seed(seed)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    plen = torch.randint(1, q + 1, (b,), generator=g)
    query_mask = (torch.arange(q)[None] >= q - plen[:, None]).long()
    query = torch.randint(10, 200, (b, q), generator=g).masked_fill(~query_mask.bool(), pad)
    resp = torch.randint(10, 200, (b, r), generator=g)
    rlen = torch.randint(1, r + 1, (b,), generator=g)
    resp[torch.arange(b), rlen - 1] = eos
    resp[0, -1] = 11  # one response without EOS, as long as the limit
    resp, mask, has_eos = truncate_after_eos(resp, eos, pad)
    return Rollout(query, query_mask, resp, mask, has_eos)


def _always_pack(monkeypatch):
    monkeypatch.setattr(PackedRollout, "pays", lambda self, model, lm_head: True)


def test_packed_layout_holds_each_sequence_once_in_order(tok):
    ro = _rollout(tok)
    pk = ro.pack()
    flat_ids, flat_pos = pk.input_ids.flatten(), pk.position_ids.flatten()
    lp, lr = ro.query_mask.sum(1), ro.response_mask.sum(1)
    covered = torch.zeros_like(flat_ids, dtype=torch.bool)
    for i in range(ro.query_ids.shape[0]):
        real = ro.input_ids[i][ro.attention_mask[i].bool()]  # prompt + response, no padding
        start = int(pk.ends[i]) - len(real) + 1
        assert flat_ids[start : start + len(real)].tolist() == real.tolist()
        assert flat_pos[start : start + len(real)].tolist() == list(range(len(real)))
        assert not covered[start : start + len(real)].any()  # no two sequences overlap
        covered[start : start + len(real)] = True
        # The state before response token t is followed by token t in the same sequence.
        t = torch.arange(int(lr[i]))
        assert (flat_ids[pk.states[i, t] + 1] == ro.response_ids[i, t]).all()
        assert int(pk.states[i, 0]) == start + int(lp[i]) - 1  # the last prompt token
        if ro.has_eos[i]:
            assert int(flat_ids[pk.ends[i]]) == tok.eos_token_id
    # Fewer computed slots than the padded batch; tails sit at position 0.
    assert pk.input_ids.numel() < ro.input_ids.numel()
    assert (flat_pos[~covered] == 0).all()


def test_empty_prompt_cannot_be_packed(tok):
    ro = _rollout(tok)
    ro.query_mask[2] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        ro.pack()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_forwards_equal_padded_ones(tok, arch, monkeypatch):
    _always_pack(monkeypatch)
    policy = build_tiny_causal_lm(arch, tokenizer=tok, seed=0, **SMALL)
    value = _classifier(tok, arch, 1)
    ro = _rollout(tok)
    pk, m = ro.pack(), ro.response_mask
    outs = {}
    for name, layout in (("padded", None), ("packed", pk)):
        policy.zero_grad()
        logp, ent = response_logprobs(policy, ro, 0.7, with_entropy=True, packed=layout)
        (logp * m).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        vals = response_values(value, ro, layout)
        outs[name] = (logp[m], ent[m], vals[m].detach(), score(value, ro, layout), grads)
    for a, b in zip(outs["padded"], outs["packed"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_packing_is_used_only_where_it_costs_less(tok):
    # Long prompts, short responses: the padded layout runs the LM head on 4 positions per
    # row, the packed one on every prompt position too.
    ro = _rollout(tok, b=8, q=30, r=3)
    pk = ro.pack()
    assert pk.input_ids.numel() < ro.input_ids.numel()

    def model(vocab, layers=2, d=32):
        cfg = SimpleNamespace(num_hidden_layers=layers, hidden_size=d, vocab_size=vocab)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: cfg))

    # Backbone-only forwards (value, RM) pay whenever packing saves token slots.
    assert pk.pays(model(vocab=100), lm_head=False)
    # A huge LM head: packed rows run it on prompt positions too; the padded layout does not.
    assert not pk.pays(model(vocab=10**7), lm_head=True)
    assert pk.pays(model(vocab=16), lm_head=True)
    # Without the sizes in its config (or without a config) a model is not packed.
    no_sizes = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace()))
    assert not pk.pays(no_sizes, lm_head=False)
    assert not pk.pays(SimpleNamespace(config=SimpleNamespace()), lm_head=False)
    assert not pk.pays(SimpleNamespace(), lm_head=True)
    plain = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, hidden_size=32))
    assert pk.pays(plain, lm_head=False)  # a plain config object with the sizes works too


@pytest.fixture
def ragged_prompts(tmp_path):
    """Prompts of 2..31 bytes (ByT5: one token per byte), so sequences share packed rows."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "R" + "x" * (i % 30)}) + "\n" for i in range(40)))
    return str(path), None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_free_run_equals_padded_run(tok, ragged_prompts, arch, monkeypatch):
    _always_pack(monkeypatch)
    runs = {}
    for padding_free in (False, True):
        module = make_module(tok, arch, padding_free=padding_free, max_new_tokens=12)
        fit(module, tok, ragged_prompts)
        runs[padding_free] = module
    (a, b) = runs[False], runs[True]
    assert len(a.history) == len(b.history) == 2
    for ha, hb in zip(a.history, b.history):
        for key in ("objective/kl", "objective/scores", "policy/loss", "value/loss"):
            assert ha[key] == pytest.approx(hb[key], rel=1e-3, abs=1e-5), key
    ro = b.last_rollout
    assert ro.pack().input_ids.shape[0] < ro.query_ids.shape[0]  # rows hold several sequences
    for (name, pa), pb in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_leaky_model_stops_a_padding_free_run(tok):
    module = make_module(tok)
    module.ref_model = _LeakyLM()
    with pytest.raises(PackedAttentionError, match="ppo.padding_free"):
        module._pack(_rollout(tok))
    module.hparams.padding_free = False
    assert module._pack(_rollout(tok)) is None
