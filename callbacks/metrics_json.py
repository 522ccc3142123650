"""Write a run's final metrics as flat JSON (``{"namespace/name": number}``)."""

from __future__ import annotations

import json
import math
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lit_rlhf.fileio import atomic_write_text


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def update_metrics_json(path: str, metrics: dict) -> dict:
    """Merge ``metrics`` (scalars only) into the JSON file at ``path``; returns the merged dict."""
    current: dict = {}
    if os.path.isfile(path):
        with open(path) as fh:
            current = json.load(fh)
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            current[key] = number
    atomic_write_text(path, json.dumps(dict(sorted(current.items())), indent=2))
    return current


class MetricsJSONCallback(L.Callback):
    """Dump ``trainer.callback_metrics`` into ``<run_dir>/metrics.json`` after fit/validate/test."""

    def __init__(self, run_dir: str, filename: str = "metrics.json") -> None:
        self.path = os.path.join(run_dir, filename)

    @rank_zero_only
    def _dump(self, trainer: L.Trainer) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if "/" in k}
        metrics["trainer/global_step"] = trainer.global_step
        update_metrics_json(self.path, metrics)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._dump(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._dump(trainer)
