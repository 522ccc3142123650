"""Training-loop guards: a NaN/inf loss or gradient, and a loss that diverges.

A stage whose loss turns NaN used to train on and be caught only at export, by its weights; a
run whose loss exploded to 1e7 with finite weights was exported as finished. This callback
sees every loss before its backward pass and every gradient before its optimizer step.
"""

from __future__ import annotations

import math

import lightning as L
import torch

#: What a non-finite loss or gradient does.
NONFINITE_ACTIONS = ("stop", "skip")
#: What a diverged loss does at the end of training.
DIVERGENCE_ACTIONS = ("error", "warn")


class TrainingGuardError(RuntimeError):
    """Training hit a non-finite loss or gradient, or diverged; nothing is exported."""


def loss_diverged(losses: list[float], window: int, factor: float) -> float | None:
    """The mean of the last ``window`` losses when it exceeds ``factor`` x the first loss.

    The first loss is the reference because a run can blow up at its second step (SFT at lr
    1e3: 4.2, then 2.6e7), before any window of "normal" losses exists; the last window is
    what the exported weights were trained to, so a spike the run recovered from passes.

    Args:
        losses: Training losses in step order, length ``n``.
        window: How many of the last losses to average (all of them when ``n < window``).
        factor: How many times the first loss that average may reach.

    Returns:
        The last window's mean when it diverged, else None (also for ``n < 2`` and when the
        first loss is not positive, where a ratio to it means nothing).
    """
    if len(losses) < 2 or not losses[0] > 0:
        return None
    tail = losses[1:][-window:]
    mean = sum(tail) / len(tail)
    return mean if mean > factor * losses[0] else None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard checks its part


class FiniteGuard(L.Callback):
    """Stop (or skip) on a non-finite loss or gradient; flag a loss that diverges.

    Args:
        stage: Stage name for messages (``sft``, ``ppo``, ...).
        lr_setting: The learning-rate setting the advice names (default ``<stage>.lr``).
        nonfinite: ``stop``: one error line naming the stage, the step and the loss term;
            ``skip``: drop that optimizer step (no parameter moves) and count it.
        max_skipped_steps: In ``skip`` mode, more skipped steps than this is an error.
        divergence_factor: Training whose last ``divergence_window`` losses average more than
            this many times its first loss has diverged (automatic-optimization stages, where
            the loss is one objective; PPO's sum of terms is not compared).
        divergence_window: How many of the last losses are averaged.
        on_divergence: ``error`` (nothing is exported) or ``warn`` (``guard/diverged`` = 1 in
            the stage's metrics).

    A module may expose ``loss_parts`` (name -> scalar tensor), the terms of the loss it is
    about to backpropagate, so a message can say which one is not finite.
    """

    def __init__(
        self,
        stage: str,
        lr_setting: str | None = None,
        nonfinite: str = "stop",
        max_skipped_steps: int = 10,
        divergence_factor: float = 3.0,
        divergence_window: int = 20,
        on_divergence: str = "error",
    ) -> None:
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"nonfinite={nonfinite!r}: use one of {NONFINITE_ACTIONS}")
        if on_divergence not in DIVERGENCE_ACTIONS:
            raise ValueError(f"on_divergence={on_divergence!r}: use one of {DIVERGENCE_ACTIONS}")
        self.stage, self.lr_setting = stage, lr_setting or f"{stage}.lr"
        self.nonfinite, self.max_skipped = nonfinite, max_skipped_steps
        self.factor, self.window, self.on_divergence = (
            divergence_factor,
            divergence_window,
            on_divergence,
        )
        self.skipped = 0
        self.losses: list[float] = []
        self._bad_loss: str | None = None

    # -- per step ---------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            parts = getattr(pl_module, "loss_parts", None) or {}
            bad = [f"{k} {float(v):g}" for k, v in parts.items() if not math.isfinite(float(v))]
            self._bad_loss = f"the training loss is {value:g}" + (
                f" ({', '.join(bad)})" if bad else ""
            )
        elif pl_module.automatic_optimization:
            self.losses.append(value)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        problem = self._bad_loss
        self._bad_loss = None
        # fp16 with a loss scaler overflows on purpose; the scaler skips those steps itself.
        if problem is None and not str(trainer.precision).startswith("16"):
            grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"]]
            flags = [torch.isfinite(g).all() for g in grads if g is not None]
            if flags and not bool(torch.stack(flags).all()):
                problem = "a gradient is NaN or inf"
        if not trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            return
        problem = problem or "another rank's loss or gradient is not finite"
        where = f"optimizer step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.nonfinite == "stop":
            raise TrainingGuardError(
                f"[{self.stage}] {problem} at {where}; nothing was exported. Lower "
                f"{self.lr_setting} or add warmup, or set guard.nonfinite=skip to drop such steps"
            )
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise TrainingGuardError(
                f"[{self.stage}] {self.skipped} optimizer steps skipped for non-finite losses "
                f"or gradients (guard.max_skipped_steps={self.max_skipped}), the last at "
                f"{where}: the run is diverging; lower {self.lr_setting}"
            )
        # No gradient, no update: AdamW leaves a parameter whose grad is None untouched.
        optimizer.zero_grad(set_to_none=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A finite step can still push weights to inf (lr 1e30); PPO would then sample from
        # NaN probabilities before any loss shows it.
        flags = [
            torch.isfinite(_local(p.detach())).all()
            for p in pl_module.parameters()
            if p.requires_grad
        ]
        bad = bool(flags) and not bool(torch.stack(flags).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise TrainingGuardError(
                f"[{self.stage}] weights are NaN or inf after optimizer step "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); nothing was exported. "
                f"Lower {self.lr_setting} or add warmup"
            )

    # -- at the end -------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        last = loss_diverged(self.losses, self.window, self.factor)
        # Ranks see different losses; all of them stop, or none waits for an export forever.
        stop = self.on_divergence == "error" and last is not None
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            where = (
                "on another rank"
                if last is None
                else (
                    f": its last {min(self.window, len(self.losses) - 1)} batches average "
                    f"{last:.4g}, above {self.factor:g} x its first loss {self.losses[0]:.4g}"
                )
            )
            raise TrainingGuardError(
                f"[{self.stage}] the training loss diverged{where}; nothing was exported. "
                f"Lower {self.lr_setting}, or set guard.on_divergence=warn to export anyway"
            )
        # Read by MetricsJSONCallback at fit end, so the stage's metrics.json has them.
        metrics = {"guard/skipped_steps": float(self.skipped)}
        if last is not None:  # diverged under on_divergence=warn
            metrics["guard/diverged"] = 1.0
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
