"""Rollouts: the episode record, the sampling engines, scoring and the padding-free layout.

- :mod:`~lit_rlhf.rollout.record`: :class:`Rollout`, filled in phase by phase.
- :mod:`~lit_rlhf.rollout.engine`: :class:`RolloutEngine` (the interface a faster sampler
  implements) and :class:`HFGenerateEngine` (the default, transformers' ``generate``).
- :mod:`~lit_rlhf.rollout.scoring`: log-probs, values and RM scores of sampled responses.
- :mod:`~lit_rlhf.rollout.packed`: the padding-free layout of a rollout's forwards.
- :mod:`~lit_rlhf.rollout.sampling`: batched sampling from text prompts (label, eval).
"""

from lit_rlhf.rollout.engine import (
    HFGenerateEngine,
    NonFiniteSamplingError,
    RolloutEngine,
    generate,
)
from lit_rlhf.rollout.packed import PackedRollout, pack_rollout
from lit_rlhf.rollout.record import Rollout
from lit_rlhf.rollout.sampling import sample_responses, sample_rollouts
from lit_rlhf.rollout.scoring import response_logprobs, response_values, score

__all__ = [
    "HFGenerateEngine",
    "NonFiniteSamplingError",
    "PackedRollout",
    "Rollout",
    "RolloutEngine",
    "generate",
    "pack_rollout",
    "response_logprobs",
    "response_values",
    "sample_responses",
    "sample_rollouts",
    "score",
]
