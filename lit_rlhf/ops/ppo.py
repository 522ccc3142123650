"""PPO's equations for bandit-style RLHF: rewards, GAE, clipped losses, diagnostics.

Tensors are ``(B, T)`` over *response* tokens; ``mask`` is true on real response tokens
(up to and including the first EOS) and false on padding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lit_rlhf.ops.masking import last_true_index, masked_mean, masked_var

__all__ = [
    "RunningMoments",
    "clipped_policy_loss",
    "clipped_value_loss",
    "explained_variance",
    "gae_advantages",
    "per_token_rewards",
]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def per_token_rewards(
    scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float | Tensor
) -> tuple[Tensor, Tensor]:
    """InstructGPT's per-token reward: a KL penalty on every token, the RM score at the end.

    ``non_score[b, t] = -kl_coef * kl[b, t]`` on response tokens (0 on padding), and
    ``rewards = non_score`` plus ``scores[b]`` on the last true position of
    ``response_mask[b]`` (the EOS token when the response has one). Rows with an empty mask
    get no score.

    Args:
        scores: ``(B,)`` reward-model scores (after any EOS penalty / scaling).
        kl: ``(B, T)`` per-token KL estimates (see :func:`~lit_rlhf.ops.kl.kl_estimate`).
        response_mask: ``(B, T)`` bool or 0/1.
        kl_coef: The KL coefficient beta.

    Returns:
        ``(rewards, non_score)``, both ``(B, T)``.
    """
    _check_same_shape(kl=kl, response_mask=response_mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    mask = response_mask != 0
    non_score = torch.where(mask, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_true_index(mask)
    at_last = torch.arange(kl.shape[1], device=kl.device) == last.unsqueeze(-1)
    rewards = non_score + at_last.to(non_score.dtype) * scores.to(non_score.dtype).unsqueeze(-1)
    return rewards, non_score


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    For each row, with ``V(t+1) = 0`` after the last valid token (the episode ends there)::

        delta_t = r_t + gamma * V(t+1) - V(t)
        A_t     = delta_t + gamma * lam * A_{t+1}

    A false ``mask`` entry acts as a terminal state: nothing flows back across it. The loop
    runs backwards over ``T`` and is vectorised over ``B``. Inputs are detached: advantages
    and returns are targets, never differentiated through.

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`per_token_rewards`).
        values: ``(B, T)`` value estimates of the rollout.
        mask: ``(B, T)`` bool or 0/1 response mask.
        gamma: Discount (1.0 in the RLHF recipe: no discount within a response).
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``; ``returns = advantages + values``, and both
        are 0 where ``mask`` is false.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = mask != 0
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards.detach(), zero)
    values = torch.where(mask, values.detach().to(rewards.dtype), zero)
    steps = rewards.shape[1]
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    advantages = [next_adv] * steps
    for t in range(steps - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, zero)
        advantages[t] = adv
        # A masked position zeroes both, so the previous token sees a terminal state.
        next_value, next_adv = values[:, t], adv
    adv_out = torch.stack(advantages, dim=1) if steps else rewards.clone()
    return adv_out, torch.where(mask, adv_out + values, zero)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate loss, averaged over response tokens.

    With ``ratio = exp(logprobs - old_logprobs)``::

        loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))

    ``old_logprobs`` and ``advantages`` are treated as constants (detached).

    Stats (detached 0-dim tensors, masked means over tokens):

    - ``"clipfrac"``: fraction of tokens where the clipped term is the larger one, i.e. the
      token's gradient is cut off.
    - ``"approx_kl"``: ``mean((ratio - 1) - log ratio)``, the k3 estimator of
      ``KL(pi_old || pi)`` (non-negative, unbiased under samples from ``pi_old``).
    - ``"ratio_mean"``, ``"ratio_var"``: mean and (unbiased) variance of the ratio; with
      dropout off the first minibatch of each rollout has ratio exactly 1.

    Args:
        logprobs: ``(B, T)`` log-probs under the current policy (requires grad).
        old_logprobs: ``(B, T)`` log-probs recorded at rollout time.
        advantages: ``(B, T)`` (usually whitened) advantages.
        mask: ``(B, T)`` bool or 0/1 response mask.
        clip_range: ``c``; must be > 0.

    Returns:
        ``(loss, stats)``.
    """
    _check_same_shape(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    mask = mask != 0
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, averaged over response tokens.

    With ``v_clip = old_values + clip(values - old_values, -c, c)``::

        loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))

    ``old_values`` and ``returns`` are treated as constants (detached).

    Args:
        values: ``(B, T)`` current value predictions (requires grad).
        old_values: ``(B, T)`` values recorded at rollout time.
        returns: ``(B, T)`` GAE returns.
        mask: ``(B, T)`` bool or 0/1 response mask.
        clip_range: ``c``; must be > 0.

    Returns:
        ``(loss, {"clipfrac": ...})``; ``clipfrac`` is the fraction of tokens where the
        clipped error is the larger one.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    mask = mask != 0
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"clipfrac": clipfrac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked entries.

    1 is a perfect value function, 0 one that predicts the mean, negative one that is worse
    than the mean. ``NaN`` when the returns have no variance (undefined).

    Args:
        values: ``(B, T)`` value predictions.
        returns: ``(B, T)`` returns.
        mask: ``(B, T)`` bool or 0/1.

    Returns:
        A detached 0-dim float tensor.
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    values, returns = values.float(), returns.float()
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full((), math.nan, device=values.device)
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan)


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (e.g. RM scores).

    Batches are merged with the parallel-variance formula of Chan et al., so the result is
    that of the whole stream regardless of how it was split. Under DDP gather the batch from
    all ranks before :meth:`update` so every rank keeps the same moments.

    Attributes:
        mean: Mean of everything seen (0.0 before the first update).
        var: Population variance of everything seen.
        count: Number of values seen.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        """Sample standard deviation of everything seen; 1.0 until two values were seen."""
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[float, float]:
        """Fold a batch into the running moments.

        Args:
            x: ``(N,)`` values (any shape is flattened); must not be empty.

        Returns:
            ``(batch_mean, batch_std)`` of ``x`` itself (sample std; 0.0 when ``N == 1``).
        """
        x = x.detach().reshape(-1).double()
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        # Chan et al.: merge the sums of squared deviations of the two parts.
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, Any]:
        return {"mean": float(self.mean), "var": float(self.var), "count": int(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std}, count={self.count})"
