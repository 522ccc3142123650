"""Critic-free advantage estimators against naive per-row / per-group loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from test_ppo import data_files, fit, make_module  # noqa: F401 (data_files: a fixture)

from lit_rlhf.ops.critic_free import (
    CRITIC_FREE,
    critic_free_advantages,
    group_advantages,
    returns_to_go,
)


def _batch(b=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t) < lengths.unsqueeze(-1)
    return rewards, mask


def test_returns_to_go_matches_a_loop():
    rewards, mask = _batch()
    out = returns_to_go(rewards, mask)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            want = sum(float(rewards[b, s]) for s in range(t, rewards.shape[1]) if mask[b, s])
            assert float(out[b, t]) == pytest.approx(want if mask[b, t] else 0.0)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_the_definitions(kind):
    k = 4
    returns = torch.randn(3 * k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = group_advantages(returns, k, kind)
    for i in range(returns.shape[0]):
        group = [float(x) for x in returns[(i // k) * k : (i // k + 1) * k]]
        r = float(returns[i])
        if kind == "dr_grpo":
            want = r - statistics.mean(group)
        elif kind == "grpo":
            want = (r - statistics.mean(group)) / (statistics.stdev(group) + 1e-6)
        else:  # leave one out: the mean of the other K - 1
            others = list(group)
            others.remove(r)
            want = r - statistics.mean(others)
        assert float(out[i]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_grpo_gives_a_group_of_equal_returns_no_advantage():
    out = group_advantages(torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 1.0]), 3, "grpo")
    assert out[:3].abs().max() == 0 and out[3] > 0 > out[4]


@pytest.mark.parametrize("kind", CRITIC_FREE)
def test_every_token_of_a_response_gets_its_advantage_and_padding_none(kind):
    rewards, mask = _batch(b=8, t=6, seed=2)
    adv = critic_free_advantages(rewards, mask, kind, group_size=4)
    assert adv.shape == rewards.shape and bool((adv[~mask] == 0).all())
    g = returns_to_go(rewards, mask)
    if kind in ("grpo", "dr_grpo", "rloo"):
        seq = group_advantages(g[:, 0], 4, kind)
        for b in range(8):
            assert torch.allclose(adv[b][mask[b]], seq[b].expand(int(mask[b].sum())))
    else:  # REINFORCE++: whitened over every response token of the batch
        if kind == "reinforce_pp_baseline":
            base = [statistics.mean(float(x) for x in g[i * 4 : i * 4 + 4, 0]) for i in (0, 1)]
            g = g - torch.tensor(base, dtype=g.dtype).repeat_interleave(4).unsqueeze(-1)
        vals = [float(g[b, t]) for b in range(8) for t in range(6) if mask[b, t]]
        mean, sd = statistics.mean(vals), statistics.stdev(vals)
        for b in range(8):
            for t in range(6):
                if mask[b, t]:
                    want = (float(g[b, t]) - mean) / math.sqrt(sd**2 + 1e-8)
                    assert float(adv[b, t]) == pytest.approx(want, rel=1e-6)


def test_bad_groups_and_names_are_refused():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4, "grpo")
    for kind in ("grpo", "dr_grpo", "rloo"):
        with pytest.raises(ValueError, match="group_size >= 2"):
            group_advantages(torch.zeros(3), 1, kind)
    with pytest.raises(ValueError, match="group_size >= 2"):
        critic_free_advantages(torch.zeros(2, 3), torch.ones(2, 3), "reinforce_pp_baseline")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        critic_free_advantages(torch.zeros(2, 3), torch.ones(2, 3), "ppo")


@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_ppo_with_a_critic_free_estimator_trains_no_value_model(tok, data_files, kind):  # noqa: F811
    module = make_module(tok, advantage_estimator=kind, group_size=4, whiten_advantages=False)
    value_before = [p.detach().clone() for p in module.value_model.parameters()]
    policy_before = [p.detach().clone() for p in module.policy.parameters()]
    fit(module, tok, data_files, group_size=4)
    ro = module.last_rollout
    # Rows come in groups of 4 samples of one prompt, and the groups differ.
    q = ro.query_ids
    assert all(torch.equal(q[i], q[i - i % 4]) for i in range(q.shape[0]))
    assert not torch.equal(q[0], q[4])
    assert all(torch.equal(a, b) for a, b in zip(value_before, module.value_model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, module.policy.parameters()))
    for h in module.history:
        assert h["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
        assert "value/loss" not in h and "value/explained_variance" not in h
    if kind != "reinforce_pp_baseline":  # group baselines: a group's advantages sum to 0
        seq = ro.advantages[:, 0].reshape(-1, 4)
        assert torch.allclose(seq.sum(-1), torch.zeros(seq.shape[0]), atol=1e-5)
