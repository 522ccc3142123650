"""Exponential moving average of a model's weights (InstructGPT: decay 0.992 on the policy)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class WeightEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` for every floating-point tensor.

    Args:
        model: The model whose parameters/buffers are averaged.
        decay: Weight of the past (0.992 in InstructGPT).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().to(self.shadow[k].dtype), 1.0 - self.decay)

    def copy_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` carrying the averaged weights."""
        clone = copy.deepcopy(model)
        clone.load_state_dict(self.shadow, strict=False)
        return clone

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, unsharded (every rank must call it under FSDP2: it gathers)."""
        return {k: _full(v) for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        # Full tensors, so a checkpoint holds the whole average whatever the sharding.
        return {"decay": self.decay, "shadow": self.full_state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                target = self.shadow[k]
                if isinstance(target, DTensor) and not isinstance(v, DTensor):
                    # A full tensor from a checkpoint into a sharded average: keep this
                    # rank's shard.
                    v = distribute_tensor(
                        v.to(target.device, target.dtype), target.device_mesh, target.placements
                    )
                target.copy_(v)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
