"""Score each PPO rollout with a gold judge the reward model never saw, and log it."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch


class GoldTrackingCallback(L.Callback):
    """Logs ``gold/train_score``: the gold judge's mean score of the latest rollout.

    In the embedded world the judge is the "human" behind the labels; watching it beside
    ``objective/scores`` (the RM's view) shows reward over-optimization as it happens.

    Args:
        score_fn: ``score_fn(prompts, responses) -> list[float]``.
        tokenizer: Decodes prompts and responses.
        every_n_rollouts: Score every n-th rollout.
    """

    def __init__(
        self,
        score_fn: Callable[[list[str], list[str]], list[float]],
        tokenizer,
        every_n_rollouts: int = 1,
    ) -> None:
        self.score_fn, self.tokenizer, self.every = score_fn, tokenizer, max(1, every_n_rollouts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # PPOModule.training_step returns {"rollout", "metrics"}: the rollout to judge and the
        # row of the module's history that the score joins.
        if not isinstance(outputs, dict) or "rollout" not in outputs:
            return
        ro = outputs["rollout"]
        if pl_module.rollouts_done % self.every:
            return
        tok = self.tokenizer
        prompts = tok.batch_decode(
            ro.query_ids.masked_fill(ro.query_mask == 0, tok.pad_token_id), skip_special_tokens=True
        )
        responses = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
        gold = torch.tensor(self.score_fn(prompts, responses), dtype=torch.float32)
        if "metrics" in outputs:
            outputs["metrics"]["gold/train_score"] = float(gold.mean())
        pl_module.log(
            "gold/train_score",
            gold.mean().to(pl_module.device),
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            sync_dist=trainer.world_size > 1,
            batch_size=len(responses),
        )
