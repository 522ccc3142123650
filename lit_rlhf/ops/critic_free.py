"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO and REINFORCE++.

None of them trains a value model. The K responses sampled for one prompt sit in K
consecutive rows (``group_size = K``), and the advantage compares a response with the others:

- **GRPO** (Shao et al. 2024, DeepSeekMath): ``(R_i - mean_g R) / (std_g R + eps)``, the std
  of the group's K returns with Bessel's correction;
- **Dr. GRPO** (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``R_i - mean_g R``,
  without the std, which over-weights prompts whose responses barely differ;
- **RLOO** (Ahmadian et al. 2024): ``R_i - mean_{j != i} R_j``, the leave-one-out baseline,
  equal to ``K / (K - 1) * (R_i - mean_g R)``;
- **REINFORCE++** (Hu 2025): per-token returns-to-go of the KL-penalized reward, whitened over
  every response token of the batch; its ``baseline`` variant first subtracts the group mean.

The sequence-level estimators give every token of a response the same advantage. The policy
loss is the kit's clipped surrogate averaged over every response token of the minibatch
(``clipped_policy_loss``), so no estimator divides by a response's own length (the length
normalization Dr. GRPO removes from GRPO's loss is not there to begin with).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.ops.masking import masked_whiten

#: The estimators :func:`critic_free_advantages` knows (``gae`` is the critic's, in ops.ppo).
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
#: Those whose baseline comes from the other samples of a prompt: a group of one would give
#: every response advantage 0 (nothing learned, nothing said), so they need group_size >= 2.
GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def check_estimator(kind: str, group_size: int) -> None:
    """Raise ValueError unless ``kind`` (or ``gae``) can run with ``group_size`` samples."""
    if kind not in ("gae", *CRITIC_FREE):
        raise ValueError(f"advantage_estimator must be gae or one of {CRITIC_FREE}, got {kind!r}")
    if kind in GROUP_BASELINES and group_size < 2:
        raise ValueError(
            f"{kind} compares each response with the other samples of its prompt: it needs "
            f"group_size >= 2 (e.g. 4), not {group_size}"
        )


def _groups(returns: Tensor, group_size: int) -> Tensor:
    if returns.dim() != 1:
        raise ValueError(f"returns must be (B,), got shape {tuple(returns.shape)}")
    if group_size < 1 or returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} rows do not split into groups of {group_size}")
    return returns.reshape(-1, group_size)


def returns_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted return from each response token on: ``G_t = sum_{s >= t} r_s``.

    Args:
        rewards: ``(B, T)`` per-token rewards (``ops.ppo.per_token_rewards``).
        mask: ``(B, T)`` bool or 0/1 response mask.

    Returns:
        ``(B, T)``, 0 where ``mask`` is false; ``G_0`` is the sequence's return.
    """
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} differ")
    r = torch.where(mask != 0, rewards.detach(), torch.zeros((), dtype=rewards.dtype))
    # A reversed cumulative sum; positions after the response add 0.
    return torch.where(mask != 0, r.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(r))


def group_advantages(returns: Tensor, group_size: int, kind: str, eps: float = 1e-6) -> Tensor:
    """Sequence-level advantages with a baseline from the prompt's own group.

    Args:
        returns: ``(B,)`` sequence returns, rows ``[g*K, (g+1)*K)`` sampled for one prompt.
        group_size: K (>= 2 for ``rloo`` and ``grpo``: one sample has no peers).
        kind: ``grpo``, ``dr_grpo`` or ``rloo``.
        eps: Added to GRPO's std (a group whose K returns are equal gets advantage 0).

    Returns:
        ``(B,)`` advantages, in the rows' order.
    """
    g = _groups(returns.detach(), group_size)
    if group_size < 2:
        raise ValueError(f"{kind} needs group_size >= 2 (a baseline from the other samples)")
    centered = g - g.mean(dim=1, keepdim=True)
    if kind == "dr_grpo":
        out = centered
    elif kind in ("grpo", "rloo"):
        if kind == "grpo":
            out = centered / (g.std(dim=1, keepdim=True) + eps)
        else:
            out = centered * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group estimator {kind!r}; use grpo, dr_grpo or rloo")
    return out.reshape(-1)


def critic_free_advantages(rewards: Tensor, mask: Tensor, kind: str, group_size: int = 1) -> Tensor:
    """Per-token advantages ``(B, T)`` of a critic-free estimator (see the module docstring).

    Args:
        rewards: ``(B, T)`` per-token rewards: ``-beta * KL_t``, plus the score at the end.
        mask: ``(B, T)`` response mask.
        kind: One of :data:`CRITIC_FREE`.
        group_size: Samples per prompt K (consecutive rows).

    Returns:
        ``(B, T)`` advantages, 0 where ``mask`` is false.
    """
    mask = mask != 0
    g = returns_to_go(rewards, mask)
    if kind in ("grpo", "dr_grpo", "rloo"):
        adv = group_advantages(g[:, 0], group_size, kind).unsqueeze(-1).expand_as(g)
    elif kind in ("reinforce_pp", "reinforce_pp_baseline"):
        if kind == "reinforce_pp_baseline":
            if group_size < 2:
                raise ValueError(f"{kind} needs group_size >= 2 (a baseline from the group)")
            base = _groups(g[:, 0], group_size).mean(dim=1).repeat_interleave(group_size)
            g = g - base.unsqueeze(-1)
        adv = masked_whiten(g, mask)
    else:
        raise ValueError(f"unknown advantage estimator {kind!r}; use one of {CRITIC_FREE}")
    return torch.where(mask, adv, torch.zeros_like(adv))
