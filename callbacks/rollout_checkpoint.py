"""Periodic checkpoints for PPO, whose single Lightning "epoch" is the whole run."""

from __future__ import annotations

import os
import shutil

import lightning as L


class RolloutCheckpoint(L.Callback):
    """Save ``<dirpath>/last.ckpt`` every ``every`` rollouts and after the last one.

    Lightning's ``ModelCheckpoint`` saves at epoch ends, and a PPO run is one epoch, so a
    crash would leave nothing to resume from. The file is written beside the old one and then
    renamed over it, so a kill while saving keeps the previous checkpoint usable.

    Args:
        dirpath: Folder of ``last.ckpt`` (one per stage and config fingerprint).
        every: Rollouts between checkpoints; 0 turns them off.
    """

    def __init__(self, dirpath: str, every: int) -> None:
        self.dirpath, self.every = dirpath, every

    @property
    def path(self) -> str:
        """Where the newest checkpoint lives."""
        return os.path.join(self.dirpath, "last.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = pl_module.rollouts_done
        if not self.every or (done % self.every and done < pl_module.hparams.n_rollouts):
            return
        os.makedirs(self.dirpath, exist_ok=True)
        tmp = os.path.join(self.dirpath, ".last.ckpt.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            if os.path.isdir(self.path):  # a sharded (distributed) checkpoint is a folder
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        trainer.strategy.barrier("rollout_checkpoint")
