"""Pure tensor functions of the RLHF recipe, one equation each (no Lightning, no Hydra)."""

from lit_rlhf.ops.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
)
from lit_rlhf.ops.lm_loss import LM_LOSS_REDUCTIONS, lm_loss, next_token_nll
from lit_rlhf.ops.logprobs import entropy_from_logits, selective_log_softmax, token_logprobs
from lit_rlhf.ops.masking import (
    first_true_index,
    last_true_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    truncate_after_eos,
)
from lit_rlhf.ops.ppo import (
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    per_token_rewards,
)
from lit_rlhf.ops.ranking import kwise_ranking_loss, pairwise_accuracy, ranking_pair_mask
from lit_rlhf.ops.schedules import lr_multiplier

__all__ = [
    "KL_ESTIMATORS",
    "LM_LOSS_REDUCTIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "first_true_index",
    "gae_advantages",
    "kl_estimate",
    "kwise_ranking_loss",
    "last_true_index",
    "lm_loss",
    "lr_multiplier",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_nll",
    "pairwise_accuracy",
    "per_token_rewards",
    "position_ids_from_mask",
    "ranking_pair_mask",
    "selective_log_softmax",
    "token_logprobs",
    "truncate_after_eos",
]
