"""Pieces shared by the kit's LightningModules: optimizer/scheduler building, model factories."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lit_rlhf.models.packing import require_packed_attention
from lit_rlhf.ops.schedules import lr_multiplier

#: Builds an optimizer from parameters or parameter groups, e.g. ``partial(AdamW, lr=1e-4)``.
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
#: A model, or a zero-argument callable that builds it (lets ``configure_model`` build late).
ModelOrFactory = nn.Module | Callable[[], nn.Module]


def materialize(model: ModelOrFactory, role: str = "model") -> nn.Module:
    """Return ``model`` itself, or call it when it is a factory.

    Raises:
        ValueError: The model has no parameters. Devices are read from parameters, and
            without any the packing probe's ``StopIteration`` would end every epoch silently.
    """
    model = model if isinstance(model, nn.Module) else model()
    if next(iter(model.parameters()), None) is None:
        raise ValueError(
            f"the {role} ({type(model).__name__}) has no parameters; pass a model with at "
            "least one (a rule-based reward is a reward function, not a reward model)"
        )
    return model


def build_optimizer(
    params: Iterable[Any],
    factory: OptimizerFactory | None,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    precision: str | None = None,
) -> torch.optim.Optimizer:
    """Use ``factory(params)`` when given, else AdamW (``precision``: see :func:`adamw`)."""
    if factory is not None:
        return factory(params)
    return adamw(params, precision, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def trainer_precision(module: Any) -> str | None:
    """The precision string of the module's Trainer (``"bf16-mixed"``...), None without one."""
    trainer = getattr(module, "_trainer", None)
    return None if trainer is None else str(trainer.precision)


def adamw(params: Iterable[Any], precision: str | None = None, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where it applies (one kernel for all tensors).

    The fused implementation computes the same update as the default ``foreach`` one (up to
    float rounding) and is markedly faster on small models, where the optimizer step is
    overhead-bound. Sharded (DTensor) or exotic-device parameters keep the default.

    Args:
        params: Parameters or parameter groups.
        precision: The Trainer's precision. fp16 mixed precision keeps the ``foreach``
            kernel: its GradScaler must unscale gradients before they are clipped, which a
            fused optimizer would do only inside its own step.
        **kwargs: AdamW arguments.
    """
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fusable = (
        bool(tensors)
        and (precision is None or not precision.startswith("16"))
        and all(
            type(p) is torch.nn.Parameter
            and p.device.type in ("cpu", "cuda")
            and p.is_floating_point()
            for p in tensors
        )
    )
    opt = torch.optim.AdamW(params, fused=fusable or None, **kwargs)
    if fusable:
        # A fused AdamW declares that it unscales gradients itself; Lightning's mixed-precision
        # plugin then refuses to clip gradients, for bf16 too, although bf16 autocast has no
        # GradScaler and nothing is ever scaled. Without a scaler the flag has no other reader.
        opt._step_supports_amp_scaling = False
    return opt


def single_model_optimizers(module: Any) -> dict:
    """``configure_optimizers`` of a module that trains ``module.model`` alone (SFT, RM).

    Reads ``lr``, ``weight_decay``, ``betas``, ``schedule``, ``warmup_steps`` and
    ``min_lr_ratio`` from ``module.hparams`` and ``module.optimizer_factory``; the schedule
    runs over the Trainer's estimated optimizer steps and is stepped every step.
    """
    hp = module.hparams
    opt = build_optimizer(
        module.model.parameters(),
        module.optimizer_factory,
        hp.lr,
        hp.weight_decay,
        hp.betas,
        precision=trainer_precision(module),
    )
    sched = build_scheduler(
        opt,
        module.trainer.estimated_stepping_batches,
        hp.schedule,
        hp.warmup_steps,
        hp.min_lr_ratio,
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    schedule: str,
    warmup_steps: int,
    min_ratio: float,
    warmup_start_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`~lit_rlhf.ops.schedules.lr_multiplier` per step."""
    fn = partial(
        lr_multiplier,
        total_steps=max(1, int(total_steps)),
        schedule=schedule,
        warmup_steps=warmup_steps,
        min_ratio=min_ratio,
        warmup_start_ratio=warmup_start_ratio,
    )
    return LambdaLR(optimizer, fn)


def check_packed_once(
    module: Any, model: nn.Module, batch: dict, where: str = "padding_free/packing"
) -> None:
    """Before the first packed batch (no attention mask) reaches ``model``, probe it once.

    Raises :class:`~lit_rlhf.models.packing.PackedAttentionError` for a model that would let
    packed sequences attend to each other (see :mod:`lit_rlhf.models.packing`); ``where``
    names the options that turn packing off.
    """
    checked = module.__dict__.setdefault("_packed_attention_checked", set())
    if batch.get("attention_mask") is None and id(model) not in checked:
        require_packed_attention(model, where)
        checked.add(id(model))


def freeze(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with gradients off (reference / reward models)."""
    model.eval()
    model.requires_grad_(False)
    return model
