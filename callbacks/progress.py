"""Progress that suits where it goes: a live bar on a terminal, a few plain lines in a log file."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("lit_rlhf")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar on a terminal; in a non-TTY log, a line per tenth of an epoch.

    A redrawn bar in a log file (``nohup``, SLURM, CI) is thousands of carriage-return updates
    nobody can read. When stderr is not a terminal the bars stay off and rank 0 logs
    ``lines_per_epoch`` lines per training epoch instead, each with the bar's metrics.

    Args:
        refresh_rate: Batches between bar redraws (terminal only).
        process_position: Passed to :class:`TQDMProgressBar`.
        leave: Keep finished bars on screen (terminal only).
        lines_per_epoch: Log lines per training epoch when stderr is not a terminal; 0 for none.
        tty: Force terminal (True) or log (False) behaviour; None: ask ``sys.stderr``.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        lines_per_epoch: int = 10,
        tty: bool | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if lines_per_epoch < 0:
            raise ValueError(f"lines_per_epoch must be >= 0, got {lines_per_epoch}")
        self.lines_per_epoch = lines_per_epoch
        self.tty = sys.stderr.isatty() if tty is None else tty
        if not self.tty:
            self.disable()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        """Redraw the bar (terminal) or log a line at each tenth of the epoch (log file)."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.tty or not self.lines_per_epoch or not trainer.is_global_zero:
            return
        total = self.total_train_batches
        done = batch_idx + 1
        finite = isinstance(total, (int, float)) and math.isfinite(total) and total > 0
        # An iterable without a length gets a line every 50 batches.
        every = max(1, math.ceil(total / self.lines_per_epoch)) if finite else 50
        if done % every and done != total:
            return
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        of = f"/{int(total)}" if finite else ""
        log.info("[progress] epoch %d batch %d%s %s", trainer.current_epoch, done, of, shown)
