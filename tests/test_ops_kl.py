import math

import pytest
import torch

from lit_rlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 6, generator=g, dtype=torch.float64) * 3,
        torch.randn(4, 6, generator=g, dtype=torch.float64) * 3,
    )


def test_estimators_match_formulas(logps):
    lp, ref = logps
    for b in range(4):
        for t in range(6):
            logr = lp[b, t].item() - ref[b, t].item()
            assert kl_estimate(lp, ref, "k1")[b, t].item() == pytest.approx(logr)
            assert kl_estimate(lp, ref, "k2")[b, t].item() == pytest.approx(0.5 * logr**2)
            k3 = (math.exp(-logr) - 1) + logr
            assert kl_estimate(lp, ref, "k3")[b, t].item() == pytest.approx(k3)


def test_k3_non_negative_including_tiny_differences(logps):
    lp, ref = logps
    assert (kl_estimate(lp, ref, "k3") >= 0).all()
    assert (kl_estimate(lp.float(), ref.float(), "k3") >= 0).all()
    tiny = torch.tensor([[-3.0, -3.0 + 1e-7, -3.0 - 1e-7]])
    assert (kl_estimate(tiny, torch.full_like(tiny, -3.0), "k3") >= 0).all()
    assert (kl_estimate(lp, ref, "k2") >= 0).all()


def test_k1_and_k3_are_unbiased_for_kl_pi_ref():
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    true_kl = (p * (logp - ref_logp)).sum()
    # Expectation over y ~ pi of each per-sample estimate, computed exactly.
    for estimator in ("k1", "k3"):
        expectation = (p * kl_estimate(logp, ref_logp, estimator)).sum()
        assert expectation.item() == pytest.approx(true_kl.item(), rel=1e-10)


def test_unknown_estimator_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(x, x, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(x, torch.zeros(2, 4))


def test_fixed_controller():
    ctl = FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.02
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.02
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-0.1)


def test_adaptive_controller_follows_ziegler():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=512)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    ctl2 = AdaptiveKLController(0.1, 6.0, 10000)
    ctl2.update(torch.tensor(3.0), 512)  # error -0.5 clipped to -0.2
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))
    ctl3 = AdaptiveKLController(0.1, 6.0, 10000)
    ctl3.update(6.6, 1000)  # error 0.1, within the clip
    assert ctl3.value == pytest.approx(0.1 * (1 + 0.1 * 1000 / 10000))
    ctl4 = AdaptiveKLController(0.1, 6.0, 10000)
    ctl4.update(6.0, 1000)
    assert ctl4.value == pytest.approx(0.1)


def test_adaptive_controller_moves_towards_target_and_restores():
    up = AdaptiveKLController(0.05, target=1.0, horizon=100)
    down = AdaptiveKLController(0.05, target=1.0, horizon=100)
    for _ in range(5):
        up.update(2.0, 10)
        down.update(0.5, 10)
    assert up.value > 0.05 > down.value > 0
    state = up.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    fresh = AdaptiveKLController(0.05, target=1.0, horizon=100)
    fresh.load_state_dict(state)
    assert fresh.value == up.value


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"init_kl_coef": -1.0, "target": 1.0, "horizon": 10}, "init_kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 10}, "target"),
        ({"init_kl_coef": 0.1, "target": 1.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_controller_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**kwargs)
