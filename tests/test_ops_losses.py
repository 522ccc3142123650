import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf.ops.lm_loss import lm_loss, next_token_nll
from lit_rlhf.ops.ppo import (
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    per_token_rewards,
)
from lit_rlhf.ops.ranking import kwise_ranking_loss, pairwise_accuracy

# ---------------------------------------------------------------- LM loss


@pytest.fixture
def lm_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 10, (3, 6), generator=g)
    loss_mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],  # prompt, 3 response tokens, padding
            [0, 1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0, 0],  # only position 0: no target at all
        ]
    )
    return logits, ids, loss_mask


def _naive_seq_nll(logits, ids, loss_mask):
    """Per sequence: list of NLLs of its target tokens."""
    out = []
    for b in range(ids.shape[0]):
        row = []
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t]:
                row.append(F.cross_entropy(logits[b, t - 1], ids[b, t]).item())
        out.append(row)
    return out


def test_next_token_nll_matches_loop(lm_batch):
    logits, ids, loss_mask = lm_batch
    nll, mask = next_token_nll(logits, ids, loss_mask)
    assert nll.shape == mask.shape == (3, 5) and mask.dtype == torch.bool
    assert torch.equal(mask, loss_mask[:, 1:].bool())
    assert (nll[~mask] == 0).all()
    for b, row in enumerate(_naive_seq_nll(logits, ids, loss_mask)):
        assert nll[b][mask[b]].tolist() == pytest.approx(row)


def test_lm_loss_reductions_match_loop(lm_batch):
    logits, ids, loss_mask = lm_batch
    rows = [r for r in _naive_seq_nll(logits, ids, loss_mask) if r]
    flat = [v for r in rows for v in r]
    expected = {
        "token_mean": sum(flat) / len(flat),
        "sequence_mean": sum(sum(r) / len(r) for r in rows) / len(rows),
        "sequence_sum": sum(sum(r) for r in rows) / len(rows),
    }
    for reduction, value in expected.items():
        assert lm_loss(logits, ids, loss_mask, reduction).item() == pytest.approx(value)


def test_lm_loss_zero_grad_on_non_target_positions(lm_batch):
    logits, ids, loss_mask = lm_batch
    logits = logits.clone().requires_grad_()
    for reduction in ("token_mean", "sequence_mean", "sequence_sum"):
        (grad,) = torch.autograd.grad(lm_loss(logits, ids, loss_mask, reduction), logits)
        predicts_target = torch.zeros(3, 6, dtype=torch.bool)
        predicts_target[:, :-1] = loss_mask[:, 1:].bool()
        assert (grad[~predicts_target] == 0).all()
        assert (grad[predicts_target].abs().sum(-1) > 0).all()


def test_lm_loss_without_targets_is_zero_and_attached():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    ids = torch.zeros(2, 4, dtype=torch.long)
    for reduction in ("token_mean", "sequence_mean", "sequence_sum"):
        loss = lm_loss(logits, ids, torch.zeros(2, 4), reduction)
        assert loss.item() == 0.0
        loss.backward()
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, ids, torch.ones(2, 4), "mean")
    with pytest.raises(ValueError, match="loss_mask"):
        next_token_nll(logits, ids, torch.ones(2, 3))


# ---------------------------------------------------------------- ranking


def _naive_kwise(rewards, ranks, valid, margin):
    losses, n_total, n_correct = [], 0, 0
    for p in range(rewards.shape[0]):
        terms = []
        for i, j in itertools.permutations(range(rewards.shape[1]), 2):
            if valid[p, i] and valid[p, j] and ranks[p, i] < ranks[p, j]:
                m = margin[p] if isinstance(margin, list) else margin
                d = rewards[p, i].item() - rewards[p, j].item()
                terms.append(-math.log(1 / (1 + math.exp(-(d - m)))))
                n_correct += rewards[p, i].item() > rewards[p, j].item()
        n_total += len(terms)
        if terms:
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses), n_total, n_correct


@pytest.fixture
def ranked():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64)
    rewards[4, 0] = rewards[4, 1]  # equal rewards: not a correct pair
    ranks = torch.tensor(
        [
            [0, 1, 2, 3],  # full ranking: C(4, 2) = 6 pairs
            [2, 0, 0, 1],  # one tie
            [1, 0, 9, 9],  # K = 2 via padding
            [0, 0, 0, 0],  # all tied: no pair
            [0, 1, 1, 9],  # tie + padding
        ]
    )
    valid = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool
    )
    return rewards, ranks, valid


@pytest.mark.parametrize("margin", [0.0, 0.5, [0.1, 0.2, 0.3, 0.4, 0.5]])
def test_kwise_loss_matches_loop(ranked, margin):
    rewards, ranks, valid = ranked
    m = torch.tensor(margin, dtype=torch.float64) if isinstance(margin, list) else margin
    loss, n_pairs = kwise_ranking_loss(rewards, ranks, valid, margin=m)
    ref_loss, ref_pairs, _ = _naive_kwise(rewards, ranks, valid, margin)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert n_pairs.item() == ref_pairs == 6 + 5 + 1 + 0 + 2


def test_kwise_loss_pairwise_case():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    rewards = torch.stack([chosen, rejected], dim=1)
    ranks = torch.tensor([[0, 1]] * 3)
    loss, n = kwise_ranking_loss(rewards, ranks, torch.ones(3, 2, dtype=torch.bool))
    expected = -F.logsigmoid(chosen - rejected).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert n.item() == 3


def test_kwise_loss_gradient_finite_with_garbage_padding(ranked):
    rewards, ranks, valid = ranked
    rewards = rewards.masked_fill(~valid, float("nan")).requires_grad_()
    loss, _ = kwise_ranking_loss(rewards, ranks, valid, margin=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()
    assert (rewards.grad[~valid] == 0).all()
    assert (rewards.grad[3] == 0).all()  # all-tied prompt contributes nothing
    # Gradient pushes the better response up: reward 0 (rank 0) of prompt 0 gets negative grad.
    assert rewards.grad[0, 0] < 0 < rewards.grad[0, 3]


def test_kwise_loss_no_pairs_and_shape_errors():
    rewards = torch.randn(2, 3, requires_grad=True)
    loss, n = kwise_ranking_loss(rewards, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    assert loss.item() == 0.0 and n.item() == 0
    loss.backward()
    with pytest.raises(ValueError, match="ranks"):
        kwise_ranking_loss(rewards, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3))


def test_pairwise_accuracy_matches_loop(ranked):
    rewards, ranks, valid = ranked
    n_correct, n_pairs = pairwise_accuracy(rewards, ranks, valid)
    _, ref_pairs, ref_correct = _naive_kwise(rewards, ranks, valid, 0.0)
    assert (n_correct.item(), n_pairs.item()) == (ref_correct, ref_pairs)
    constant = torch.zeros(5, 4)
    assert pairwise_accuracy(constant, ranks, valid)[0].item() == 0  # strict >


# ---------------------------------------------------------------- PPO


@pytest.fixture
def rollout():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 0, 1]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    return {
        "mask": mask,
        "lengths": lengths,
        "rewards": torch.randn(4, 5, generator=g, dtype=torch.float64),
        "values": torch.randn(4, 5, generator=g, dtype=torch.float64),
        "scores": torch.randn(4, generator=g, dtype=torch.float64),
        "kl": torch.randn(4, 5, generator=g, dtype=torch.float64),
    }


def test_per_token_rewards_matches_loop(rollout):
    r = rollout
    rewards, non_score = per_token_rewards(r["scores"], r["kl"], r["mask"], kl_coef=0.1)
    for b, n in enumerate(r["lengths"]):
        for t in range(5):
            pen = -0.1 * r["kl"][b, t].item() if t < n else 0.0
            assert non_score[b, t].item() == pytest.approx(pen)
            bonus = r["scores"][b].item() if t == n - 1 else 0.0
            assert rewards[b, t].item() == pytest.approx(pen + bonus)
    with pytest.raises(ValueError, match="scores"):
        per_token_rewards(r["scores"][:2], r["kl"], r["mask"], 0.1)


def _naive_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    mask = torch.tensor([[t < n for t in range(rewards.shape[1])] for n in lengths])
    return adv, torch.where(mask, adv + values, torch.zeros_like(adv))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop(rollout, gamma, lam):
    r = rollout
    values = r["values"].clone().requires_grad_()
    adv, ret = gae_advantages(r["rewards"], values, r["mask"], gamma=gamma, lam=lam)
    ref_adv, ref_ret = _naive_gae(r["rewards"], r["values"], r["lengths"], gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value(rollout):
    r = rollout
    adv, ret = gae_advantages(r["rewards"], r["values"], r["mask"], gamma=1.0, lam=1.0)
    masked_rewards = torch.where(r["mask"], r["rewards"], 0.0)
    to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, torch.where(r["mask"], to_go, 0.0))


def test_clipped_policy_loss_ratio_one_is_minus_mean_advantage(rollout):
    r = rollout
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss, stats = clipped_policy_loss(logp, logp.detach(), r["rewards"], r["mask"])
    mask = r["mask"]
    assert loss.item() == pytest.approx(-r["rewards"][mask].mean().item())
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_var"].item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.where(mask, -r["rewards"] / mask.sum(), 0.0))


def test_clipped_policy_loss_matches_loop(rollout):
    r = rollout
    g = torch.Generator().manual_seed(5)
    old = torch.randn(4, 5, generator=g, dtype=torch.float64)
    new = old + 0.4 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv, mask, c = r["rewards"], r["mask"], 0.2
    loss, stats = clipped_policy_loss(new, old, adv, mask, clip_range=c)
    terms, clipped, kls, ratios = [], 0, [], []
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        ratio = math.exp(new[b, t].item() - old[b, t].item())
        a = adv[b, t].item()
        l1, l2 = -a * ratio, -a * min(max(ratio, 1 - c), 1 + c)
        terms.append(max(l1, l2))
        clipped += l2 > l1
        kls.append(ratio - 1 - math.log(ratio))
        ratios.append(ratio)
    n = len(terms)
    assert loss.item() == pytest.approx(sum(terms) / n)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n) and 0 < clipped < n
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / n)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / n)
    assert stats["ratio_var"].item() == pytest.approx(torch.tensor(ratios).var().item())
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_clipped_value_loss_matches_loop(rollout):
    r = rollout
    g = torch.Generator().manual_seed(6)
    old = r["values"]
    values = (old + 0.5 * torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    returns, mask, c = r["rewards"], r["mask"], 0.2
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range=c)
    terms, clipped = [], 0
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        v, o, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
        vc = o + min(max(v - o, -c), c)
        e1, e2 = (v - ret) ** 2, (vc - ret) ** 2
        terms.append(max(e1, e2))
        clipped += e2 > e1
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms))
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms))
    loss.backward()
    assert (values.grad[~mask] == 0).all()
    with pytest.raises(ValueError, match="clip_range"):
        clipped_value_loss(values, old, returns, mask, clip_range=0.0)


def test_explained_variance(rollout):
    r = rollout
    mask, ret = r["mask"], r["rewards"]
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    mean = ret[mask].mean()
    assert explained_variance(torch.full_like(ret, mean.item()), ret, mask).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    values = r["values"]
    sel_r, sel_v = ret[mask], values[mask]
    expected = 1 - (sel_r - sel_v).var() / sel_r.var()
    assert explained_variance(values, ret, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isnan(explained_variance(values, torch.ones_like(ret), mask).item())


def test_running_moments_matches_whole_stream():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (1, 7, 4, 16)]
    rm = RunningMoments()
    assert rm.std == 1.0
    for chunk in chunks:
        batch_mean, batch_std = rm.update(chunk)
        assert batch_mean == pytest.approx(chunk.mean().item(), rel=1e-5)
        expected_std = chunk.std().item() if chunk.numel() > 1 else 0.0
        assert batch_std == pytest.approx(expected_std, rel=1e-5)
    stream = torch.cat(chunks).double()
    assert rm.count == stream.numel()
    assert rm.mean == pytest.approx(stream.mean().item())
    assert rm.std == pytest.approx(stream.std().item())
    state = rm.state_dict()
    assert all(type(v) in (float, int) for v in state.values())
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert (restored.mean, restored.std, restored.count) == (rm.mean, rm.std, rm.count)
    with pytest.raises(ValueError, match="empty"):
        rm.update(torch.zeros(0))
