"""A simulated human labeler: noisy rankings of K responses derived from a gold score.

Noise model (Plackett-Luce): each response gets ``gold + tau * Gumbel(0, 1)`` and responses
are ranked by that noisy score. The difference of two Gumbels is logistic, so for any pair
``P(labeler prefers i over j) = sigmoid((gold_i - gold_j) / tau)`` -- the Bradley-Terry model
with temperature ``tau``. ``tau`` is calibrated so the labeler agrees with the gold ordering on
a chosen fraction of pairs (InstructGPT reports ~73 % inter-labeler agreement).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger("lit_rlhf")


def _untied_gaps(score_groups: Sequence[Sequence[float]]) -> list[float]:
    return [
        abs(g[i] - g[j])
        for g in score_groups
        for i in range(len(g))
        for j in range(i + 1, len(g))
        if g[i] != g[j]
    ]


def expected_agreement(gaps: Sequence[float], tau: float) -> float:
    """The labeler's expected agreement with gold on pairs whose scores differ by ``gaps``.

    That is the mean of ``sigmoid(|gap| / tau)`` (1.0 for ``tau == 0``).
    """
    if not gaps:
        raise ValueError("expected_agreement needs at least one untied pair")
    if tau == 0:
        return 1.0
    # sigmoid(x) for x >= 0 written as 1 / (1 + exp(-x)): no overflow.
    return float(np.mean(1.0 / (1.0 + np.exp(-np.abs(np.asarray(gaps, dtype=np.float64)) / tau))))


class SimulatedLabeler:
    """Ranks responses by gold score plus Gumbel noise of scale ``tau``.

    Args:
        target_agreement: Fraction of untied gold pairs the labeler should order like gold,
            in ``(0.5, 1]``; 1.0 means noiseless (``tau = 0``).
        tie_margin: Responses whose noisy scores lie within this distance of the best
            noisy score of their tie group share a rank.
        seed: Seeds the noise; rankings depend on the sequence of :meth:`rank` calls.
        tau: Noise scale; when given, :meth:`calibrate` is not needed.
    """

    def __init__(
        self,
        target_agreement: float = 0.75,
        tie_margin: float = 0.0,
        seed: int = 0,
        tau: float | None = None,
    ) -> None:
        if not 0.5 < target_agreement <= 1.0:
            raise ValueError(
                f"target_agreement must be in (0.5, 1] (0.5 = random labels), "
                f"got {target_agreement}"
            )
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        if tau is not None and tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.target_agreement = float(target_agreement)
        self.tie_margin = float(tie_margin)
        self.tau: float | None = 0.0 if target_agreement == 1.0 else tau
        self._rng = random.Random(seed)

    def calibrate(self, score_groups: Sequence[Sequence[float]], tol: float = 1e-6) -> float:
        """Set ``tau`` so the expected agreement with gold equals ``target_agreement``.

        Solves ``mean(sigmoid(|gap| / tau)) = target_agreement`` over the untied pairs within
        each group by bisection on ``log tau``.

        Args:
            score_groups: Gold scores of the responses to one prompt, per prompt.
            tol: Tolerance on the agreement.

        Returns:
            The calibrated ``tau``.
        """
        if self.target_agreement == 1.0:
            self.tau = 0.0
            return self.tau
        gaps = _untied_gaps(score_groups)
        if not gaps:
            raise ValueError("calibrate needs at least one pair of responses with different scores")
        # Agreement falls monotonically from 1 (tau -> 0) to 0.5 (tau -> inf).
        lo, hi = math.log(min(gaps) * 1e-3), math.log(max(gaps) * 1e3)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            agreement = expected_agreement(gaps, math.exp(mid))
            if abs(agreement - self.target_agreement) < tol:
                break
            if agreement > self.target_agreement:
                lo = mid
            else:
                hi = mid
        self.tau = math.exp(mid)
        log.info(
            "labeler calibrated on %d gold pairs: tau %.4f for agreement %.3f",
            len(gaps),
            self.tau,
            self.target_agreement,
        )
        return self.tau

    def _gumbel(self) -> float:
        u = self._rng.random()
        while u == 0.0:
            u = self._rng.random()
        return -math.log(-math.log(u))

    def noisy_scores(self, scores: Sequence[float], completions: Sequence[str] | None = None):
        """``scores + tau * Gumbel(0, 1)`` per response.

        Identical completions share one noise draw (and the mean of their scores), so they
        always tie.
        """
        if self.tau is None:
            raise ValueError("the labeler is not calibrated: call calibrate(...) or pass tau=")
        if completions is not None and len(completions) != len(scores):
            raise ValueError(f"{len(scores)} scores but {len(completions)} completions")
        keys = list(completions) if completions is not None else list(range(len(scores)))
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        noisy = [0.0] * len(scores)
        for members in groups.values():  # insertion order: deterministic draws
            base = sum(scores[i] for i in members) / len(members)
            value = base + (self.tau * self._gumbel() if self.tau > 0 else 0.0)
            for i in members:
                noisy[i] = value
        return noisy

    def rank(self, scores: Sequence[float], completions: Sequence[str] | None = None) -> list[int]:
        """Dense ranks (0 = best) of one prompt's responses.

        Args:
            scores: Gold scores of the K responses.
            completions: The responses; identical strings always share a rank.

        Returns:
            ``ranks[i]`` for each response; equal ranks are ties.
        """
        noisy = self.noisy_scores(scores, completions)
        order = sorted(range(len(noisy)), key=lambda i: -noisy[i])
        ranks = [0] * len(noisy)
        rank, group_top = -1, math.inf
        for i in order:
            if rank < 0 or group_top - noisy[i] > self.tie_margin:
                rank, group_top = rank + 1, noisy[i]
            ranks[i] = rank
        return ranks


def pairwise_agreement(
    ranks: Sequence[float], reference: Sequence[float], reference_is_ranks: bool = False
) -> tuple[float, int]:
    """How often a ranking orders pairs like a reference, over the reference's untied pairs.

    Args:
        ranks: Ranks to check (0 = best; lower is better).
        reference: Scores (higher is better), or ranks when ``reference_is_ranks``.
        reference_is_ranks: Read ``reference`` as ranks.

    Returns:
        ``(agreements, pairs)``: pairs untied in the reference, and how many of them
        ``ranks`` orders the same way (a tie in ``ranks`` counts one half).
    """
    if len(ranks) != len(reference):
        raise ValueError(f"{len(ranks)} ranks but {len(reference)} reference values")
    sign = -1.0 if reference_is_ranks else 1.0
    agree, pairs = 0.0, 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            ref = sign * (reference[i] - reference[j])  # > 0: i is better in the reference
            if ref == 0:
                continue
            pairs += 1
            got = ranks[j] - ranks[i]  # > 0: i is better in `ranks`
            agree += 0.5 if got == 0 else float((got > 0) == (ref > 0))
    return agree, pairs


def build_comparisons(
    prompts: Sequence[str],
    sample_fn: Callable[[list[str], list[int]], list[list[str]]],
    score_fn: Callable[[list[str], list[str]], list[float]],
    labeler: SimulatedLabeler,
    k_min: int = 4,
    k_max: int = 9,
    seed: int = 0,
) -> list[dict]:
    """K-wise comparison records: sample K responses per prompt, score them, rank them.

    Args:
        prompts: Prompts to label.
        sample_fn: ``sample_fn(prompts, ks) -> responses`` with ``len(responses[i]) == ks[i]``;
            called once for all prompts (batch it).
        score_fn: ``score_fn(prompts, responses) -> scores`` on flat aligned lists.
        labeler: Ranks each group; calibrated on these groups when ``labeler.tau is None``.
        k_min: Fewest responses per prompt (>= 2).
        k_max: Most responses per prompt; K is uniform on ``[k_min, k_max]``.
        seed: Seeds the draw of K.

    Returns:
        ``{"prompt", "completions", "ranks", "gold"}`` per prompt, in prompt order. ``gold``
        holds the scores behind the ranks for evaluation only: the RM data readers drop it.
        Prompts whose responses all tie (no preference to learn) are left out and counted
        in the log.
    """
    if not 2 <= k_min <= k_max:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    prompts = list(prompts)
    rng = random.Random(seed)
    ks = [rng.randint(k_min, k_max) for _ in prompts]
    responses = sample_fn(prompts, ks)
    if len(responses) != len(prompts) or any(len(r) != k for r, k in zip(responses, ks)):
        raise ValueError("sample_fn must return one list of ks[i] responses per prompt")
    flat_prompts = [p for p, k in zip(prompts, ks) for _ in range(k)]
    flat_scores = list(score_fn(flat_prompts, [c for group in responses for c in group]))
    if len(flat_scores) != len(flat_prompts):
        raise ValueError(f"score_fn returned {len(flat_scores)} scores for {len(flat_prompts)}")
    groups, start = [], 0
    for k in ks:
        groups.append([float(s) for s in flat_scores[start : start + k]])
        start += k
    if labeler.tau is None:
        labeler.calibrate(groups)
    records, all_tied = [], 0
    for prompt, comps, gold in zip(prompts, responses, groups):
        ranks = labeler.rank(gold, comps)
        if len(set(ranks)) < 2:
            all_tied += 1
            continue
        records.append({"prompt": prompt, "completions": list(comps), "ranks": ranks, "gold": gold})
    if all_tied:
        log.info("left out %d of %d prompts whose responses all tied", all_tied, len(prompts))
    return records
