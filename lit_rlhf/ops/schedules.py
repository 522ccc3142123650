"""Learning-rate multipliers (pure functions of the step)."""

from __future__ import annotations

import math

#: The names :func:`lr_multiplier` accepts.
SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(
    step: int,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_ratio: float = 0.1,
    warmup_start_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Schedules:
        - ``"cosine"``: linear warmup, then cosine decay from 1 to ``min_ratio`` at
          ``total_steps`` (InstructGPT SFT and RM: decay to 10 % of the initial LR).
        - ``"linear"``: warmup, then linear decay to ``min_ratio``.
        - ``"constant"``: warmup, then 1 (InstructGPT PPO: 10 warmup iterations from 1/10).

    Warmup rises linearly from ``warmup_start_ratio`` to 1 over ``warmup_steps`` steps.
    Steps past ``total_steps`` keep the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; use cosine, linear or constant")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
