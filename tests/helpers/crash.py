"""A callback that kills its process mid-run, the way kill -9 or a lost node would."""

from __future__ import annotations

import os

import lightning as L


class KillAtRollout(L.Callback):
    """``os._exit`` right after rollout ``at`` (no cleanup, no exception handlers)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.rollouts_done == self.at:
            os._exit(137)
