"""Per-token KL estimators and the KL-penalty coefficient controllers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "kl_estimate"]

#: Accepted values of ``kl_estimate(..., estimator=...)``.
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``logr = logprobs - ref_logprobs = log(pi(y) / pi_ref(y))`` (Schulman, "Approximating
    KL divergence", 2020, writes ``r = pi_ref / pi = exp(-logr)``):

    - ``"k1"``: ``logr``. Unbiased, high variance, negative on some tokens. This is the
      InstructGPT per-token penalty ``log(pi / pi_SFT)``.
    - ``"k2"``: ``0.5 * logr**2``. Non-negative, low variance, biased (exact to second order).
    - ``"k3"``: ``(exp(-logr) - 1) + logr`` = ``(r - 1) - log r``. Non-negative (since
      ``e^x >= 1 + x``) and unbiased: ``E_pi[r] = 1``, so ``E_pi[k3] = E_pi[logr] = KL``.
      Note the sign inside the exponential: ``(exp(logr) - 1) - logr`` would estimate
      ``KL(pi_ref || pi)`` instead and is biased under samples from ``pi``.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference.
        estimator: One of :data:`KL_ESTIMATORS`.

    Returns:
        ``(B, T)`` per-token estimates (mask padding yourself).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
    logr = logprobs - ref_logprobs
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr.square()
    # expm1 keeps k3 accurate (and >= 0 after rounding) when logr is tiny.
    return torch.expm1(-logr) + logr


def _to_float(x: float | Tensor) -> float:
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


class FixedKLController:
    """A constant KL coefficient (InstructGPT uses beta = 0.02).

    Args:
        kl_coef: The coefficient beta; must be >= 0.
    """

    def __init__(self, kl_coef: float) -> None:
        kl_coef = float(kl_coef)
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Do nothing (same signature as :meth:`AdaptiveKLController.update`)."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), steering the KL towards a target.

    After each rollout of ``n_steps`` episodes with mean KL ``current_kl``::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so the coefficient grows when the KL is above target and shrinks below it, by at most
    20 % per ``horizon`` episodes.

    Args:
        init_kl_coef: Starting coefficient; must be >= 0.
        target: Target KL (nats per sequence, as the caller measures it); must be > 0.
        horizon: Episodes over which the coefficient may change by the clipped error; > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        init_kl_coef, target, horizon = float(init_kl_coef), float(target), float(horizon)
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target (KL) must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Move the coefficient towards keeping ``current_kl`` at ``target``.

        Args:
            current_kl: Mean KL of the last rollout (a float or a 0-dim tensor).
            n_steps: Episodes in that rollout (summed over ranks under DDP).
        """
        error = min(max(_to_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        # Only a rollout longer than 5 horizons could flip the sign; keep the coefficient >= 0.
        self.value *= max(0.0, 1.0 + error * float(n_steps) / self.horizon)

    def state_dict(self) -> dict[str, Any]:
        """The current coefficient; ``target`` and ``horizon`` stay with the configuration."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(value={self.value}, target={self.target}, "
            f"horizon={self.horizon})"
        )
