"""Rules applied to the reward model's score of a whole response."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_missing_eos_rule(
    scores: Tensor,
    has_eos: Tensor,
    missing_eos_score: float | None = None,
    missing_eos_penalty: float | None = None,
) -> Tensor:
    """Score responses that never produced EOS (the "EOS trick" of Huang et al. 2024).

    A response cut by the length limit has no natural end for the RM to judge; either give it
    a fixed score (e.g. -1) or subtract a penalty from its RM score. At most one rule applies.

    Args:
        scores: (B,) RM scores.
        has_eos: (B,) bool, True when the response contains EOS.
        missing_eos_score: Replace the score of EOS-less responses by this value.
        missing_eos_penalty: Subtract this from the score of EOS-less responses.

    Returns:
        (B,) adjusted scores (a new tensor).
    """
    if missing_eos_score is not None and missing_eos_penalty is not None:
        raise ValueError("set missing_eos_score or missing_eos_penalty, not both")
    if missing_eos_score is not None:
        return torch.where(has_eos, scores, torch.full_like(scores, float(missing_eos_score)))
    if missing_eos_penalty is not None:
        return scores - (~has_eos).to(scores.dtype) * float(missing_eos_penalty)
    return scores.clone()


def scale_and_clip(scores: Tensor, std: float | None = None, clip: float | None = None) -> Tensor:
    """Divide scores by a running std (when given) and clip them to ``[-clip, clip]``.

    Args:
        scores: (B,) scores.
        std: Running standard deviation of past scores; None leaves the scale alone.
        clip: Symmetric clip bound; None disables clipping.
    """
    out = scores / max(float(std), 1e-8) if std is not None else scores
    return out.clamp(-clip, clip) if clip is not None else out
