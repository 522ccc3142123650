"""Confidence intervals for gold-judge evaluations: means and paired win rates.

No SciPy: Student-t quantiles come from the exact closed-form t distribution function for
integer degrees of freedom (Abramowitz & Stegun 26.7.3-4) inverted by bisection, and from a
Cornish-Fisher expansion beyond 200 degrees of freedom (error < 1e-6 there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def _t_central_prob(t: float, dof: int) -> float:
    """``P(|T| < t)`` for Student's t with integer ``dof`` (A&S 26.7.3/26.7.4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:
        term = total = math.cos(theta) if dof > 1 else 0.0
        for k in range(3, dof - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(2, dof - 1, 2):
        term *= (k - 1) / k * c2
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, dof: int) -> float:
    """The ``p``-quantile of Student's t distribution with ``dof`` degrees of freedom.

    Args:
        p: Probability in ``(0, 1)``.
        dof: Degrees of freedom (integer >= 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    dof = int(dof)
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    if dof > 200:
        z = NormalDist().inv_cdf(p)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        return z + g1 / dof + g2 / dof**2 + g3 / dof**3
    target = 2.0 * p - 1.0  # P(|T| < q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while _t_central_prob(hi, dof) < target:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _t_central_prob(mid, dof) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check(values: Sequence[float], confidence: float, what: str) -> list[float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what} is empty")
    if any(math.isnan(v) for v in out):
        raise ValueError(f"{what} contains NaN")
    return out


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided Student-t confidence interval.

    ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``n - 1`` in the denominator).

    Returns:
        ``(mean, lo, hi)``; ``lo`` and ``hi`` are NaN for a single value.
    """
    xs = _check(values, confidence, "values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def win_rate(
    scores_a: Sequence[float], scores_b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Paired win rate of A over B: per prompt 1 if ``a > b``, 1/2 if equal, 0 otherwise.

    The interval is Wilson's score interval for the tie-adjusted proportion over ``n``
    prompts. Ties have less variance than a coin flip, so with ties it is conservative.

    Args:
        scores_a: Scores of policy A, one per prompt.
        scores_b: Scores of policy B on the same prompts (same order).
        confidence: Two-sided confidence level.

    Returns:
        ``(rate, lo, hi)`` in ``[0, 1]``.
    """
    a = _check(scores_a, confidence, "scores_a")
    b = _check(scores_b, confidence, "scores_b")
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores: {len(a)} vs {len(b)}")
    n = len(a)
    rate = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    denom = 1.0 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1.0 - rate) / n + z * z / (4 * n * n)) / denom
    return rate, max(0.0, centre - half), min(1.0, centre + half)
