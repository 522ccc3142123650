"""FSDP2 (``fully_shard``) for the kit's modules under Lightning's ModelParallelStrategy.

Lightning's FSDP1 strategy cannot run PPO's manual optimization (generate, manual_backward and
summon_full_params fail inside training_step), so sharding means FSDP2: each sub-model's
transformer blocks, then the sub-model itself, are wrapped with ``fully_shard`` on the
strategy's data-parallel mesh in ``configure_model``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def shard_models(models: Iterable[nn.Module], mesh, block_classes: Iterable[str]) -> int:
    """``fully_shard`` every block whose class name is in ``block_classes``, then each model.

    Args:
        models: The sub-models to shard (trained and frozen alike: frozen ones shard too).
        mesh: Lightning's ``device_mesh`` (its ``"data_parallel"`` dimension is used).
        block_classes: Class names of transformer blocks, e.g. ``["GPT2Block"]``.

    Returns:
        The number of blocks sharded (0 means the names matched nothing: a config error).
    """
    from torch.distributed.fsdp import fully_shard

    names = set(block_classes)
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    count = 0
    for model in models:
        for module in list(model.modules()):
            if type(module).__name__ in names:
                fully_shard(module, mesh=dp_mesh)
                count += 1
        fully_shard(model, mesh=dp_mesh)
    if count == 0:
        raise ValueError(
            f"none of the block classes {sorted(names)} occur in the models; set "
            "sharding.block_classes to the transformer block class names (e.g. GPT2Block, "
            "LlamaDecoderLayer)"
        )
    return count


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of a possibly ``fully_shard``-ed model, on CPU.

    Every rank must call it (it gathers); returns the dict on every rank.
    """
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
