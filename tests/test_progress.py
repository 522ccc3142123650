"""The progress callback: live bars on a terminal, a few plain log lines elsewhere."""

import logging

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_rlhf.callbacks.progress import ProgressBar


def _fit(bar: ProgressBar, batches: int = 20) -> None:
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=batches,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())


def test_log_file_gets_a_line_per_tenth_of_an_epoch(caplog):
    caplog.set_level(logging.INFO, logger="lit_rlhf")
    bar = ProgressBar(refresh_rate=1, tty=False)
    assert bar.is_disabled  # no carriage-return redraws in a log file
    _fit(bar, batches=20)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[progress]")]
    assert len(lines) == 20  # 10 per epoch, 2 epochs
    assert lines[0].startswith("[progress] epoch 0 batch 2/20")
    assert lines[-1].startswith("[progress] epoch 1 batch 20/20")


def test_terminal_keeps_the_bar_and_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="lit_rlhf")
    bar = ProgressBar(refresh_rate=5, tty=True)
    assert bar.is_enabled
    _fit(bar, batches=7)
    assert not [r for r in caplog.records if r.getMessage().startswith("[progress]")]


def test_epoch_shorter_than_ten_batches_logs_every_batch(caplog):
    caplog.set_level(logging.INFO, logger="lit_rlhf")
    _fit(ProgressBar(tty=False, lines_per_epoch=10), batches=3)
    lines = [r for r in caplog.records if r.getMessage().startswith("[progress]")]
    assert len(lines) == 6


def test_negative_lines_per_epoch_is_refused():
    with pytest.raises(ValueError, match="lines_per_epoch"):
        ProgressBar(lines_per_epoch=-1)
