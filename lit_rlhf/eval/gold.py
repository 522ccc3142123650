"""The gold judge of the embedded review world: the "human" whose preferences the RM learns.

The reward model never sees these scores directly, only rankings a simulated labeler derives
from them with noise (:mod:`lit_rlhf.eval.labeler`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from lit_rlhf.data.review_world import mentions_aspect, parse_instruction

# A label or eval batch repeats each prompt K times; parsing once per distinct prompt.
_parse = functools.lru_cache(maxsize=8192)(parse_instruction)


@functools.lru_cache(maxsize=1)
def _analyzer():
    # Building the analyzer parses the lexicon files (~tens of ms): do it once per process.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.lru_cache(maxsize=65536)  # converged policies repeat responses verbatim
def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, in ``[-1, 1]`` (0 for empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"])


class GoldJudge:
    """Scores how well a response follows a review instruction.

    For a prompt asking for sentiment ``s`` (+1 positive, -1 negative) about aspect ``a``
    (parsed with :func:`~lit_rlhf.data.review_world.parse_instruction`)::

        gold(prompt, response) = s * vader_compound(response)
                                 + aspect_weight * 1[response mentions a]

    ``vader_compound`` is VADER's normalised compound score of the whole response
    (``vaderSentiment``, offline). "Mentions ``a``" means one of the terms
    ``ASPECTS[a]`` occurs as a whole word, case-insensitively (e.g. for ``acting``: acting,
    actors, performances, cast); see :data:`lit_rlhf.data.review_world.ASPECTS`. The score
    lies in ``[-1, 1 + aspect_weight]``: a random-sentiment review scores ~0 on average,
    an on-sentiment review of the right aspect approaches ``1 + aspect_weight``.

    Args:
        aspect_weight: Bonus for mentioning the requested aspect.
        unparsable: Score for a prompt that is not a review instruction; None raises
            ``ValueError`` instead.
    """

    def __init__(self, aspect_weight: float = 0.25, unparsable: float | None = None) -> None:
        if aspect_weight < 0:
            raise ValueError(f"aspect_weight must be >= 0, got {aspect_weight}")
        self.aspect_weight = float(aspect_weight)
        self.unparsable = unparsable

    def score(self, prompt: str, response: str) -> float:
        """Gold score of one response (formula in the class docstring)."""
        try:
            sign, aspect = _parse(prompt)
        except ValueError:
            if self.unparsable is None:
                raise
            return float(self.unparsable)
        mention = self.aspect_weight if mentions_aspect(response, aspect) else 0.0
        return sign * vader_compound(response) + mention

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Gold scores of aligned ``prompts`` and ``responses`` (same length)."""
        if len(prompts) != len(responses):
            raise ValueError(
                f"prompts and responses must align: {len(prompts)} prompts, "
                f"{len(responses)} responses"
            )
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.score_batch(prompts, responses)
