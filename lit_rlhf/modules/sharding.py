"""FSDP2 (``fully_shard``) for the kit's modules under Lightning's ModelParallelStrategy.

Lightning's FSDP1 strategy cannot run PPO's manual optimization (generate, manual_backward and
summon_full_params fail inside training_step), so sharding means FSDP2: each sub-model's
transformer blocks, then the sub-model itself, are wrapped with ``fully_shard`` on the
strategy's data-parallel mesh in ``configure_model`` (:class:`ShardedModelsMixin`).

``conf/strategy/fsdp.yaml`` selects :class:`FSDP2Strategy`, a ModelParallelStrategy whose
data-parallel dimension spans every rank and which carries the block class names.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.fsdp import FSDPModule, fully_shard

from lit_rlhf.models.heads import has_score_head, score_head


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy used for FSDP2 alone (no tensor parallelism).

    ModelParallelStrategy's ``"auto"`` sizes give tensor parallelism inside a node; here the
    data-parallel (sharding) dimension spans all ranks. The strategy also carries the names of
    the transformer-block classes that the modules shard one by one, so one Hydra override
    (``strategy=fsdp``) configures everything, and it turns FSDP2's gradient reduce-scatter off
    inside ``block_backward_sync`` (Lightning's automatic gradient accumulation and PPO's
    hand-made accumulation both go through it).

    Processes are launched like ``strategy=ddp``: the script is re-run once per extra rank (or
    the ranks come from torchrun/SLURM), so it cannot run inside pytest or a Hydra multirun.

    Args:
        block_classes: Class names of the blocks to shard individually, e.g.
            ``["GPT2Block", "LlamaDecoderLayer"]``; None: each model's ``_no_split_modules``.
        data_parallel_size: Ranks in the sharding dimension; ``"auto"``: all of them.
        tensor_parallel_size: Must stay 1 (the kit applies no tensor parallelism).
        save_distributed_checkpoint: True: one checkpoint file per rank; False: rank 0 writes one
            full checkpoint (loads with ``torch.load(weights_only=True)``, costs rank-0 memory).
        process_group_backend: ``gloo`` on CPU, ``nccl`` on GPU (None: chosen by device).
        timeout: Collective timeout.
    """

    def __init__(
        self,
        block_classes: Iterable[str] | None = None,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("FSDP2Strategy shards only; use ModelParallelStrategy for TP")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.block_classes = list(block_classes) if block_classes else None

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Accumulate unreduced gradients: the next backward skips the reduce-scatter."""
        with no_gradient_sync([self.lightning_module]):
            yield


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` or one of its sub-modules was ``fully_shard``-ed."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _block_names(model: nn.Module, block_classes: Iterable[str] | None) -> set[str]:
    if block_classes:
        return set(block_classes)
    return set(getattr(model, "_no_split_modules", None) or ())


def shard_models(
    models: Iterable[nn.Module],
    mesh,
    block_classes: Iterable[str] | None,
    frozen: Iterable[nn.Module] = (),
) -> int:
    """``fully_shard`` every block whose class name is in ``block_classes``, then each model.

    Sequence classifiers (reward and value models) are scored through their backbone and head
    separately (:mod:`lit_rlhf.models.heads`), which would bypass a root wrapper's hooks and
    meet still-sharded parameters, so there the backbone and the head become the two roots.

    Args:
        models: The sub-models to shard (trained and frozen alike).
        mesh: Lightning's ``device_mesh`` (its ``"data_parallel"`` dimension is used).
        block_classes: Class names of transformer blocks, e.g. ``["GPT2Block"]``; None or empty:
            each model's own ``_no_split_modules``.
        frozen: The models among ``models`` that only run forwards: their roots free the
            gathered weights after every forward (no backward would do it).

    Returns:
        The number of blocks sharded.

    Raises:
        ValueError: When the names match no block of a model (a config error).
    """
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    frozen_ids = {id(m) for m in frozen}
    count = 0
    for model in models:
        names = _block_names(model, block_classes)
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise ValueError(
                f"none of the block classes {sorted(names)} occur in {type(model).__name__}; set "
                "the strategy's block_classes to its transformer block class names (its "
                "_no_split_modules, e.g. GPT2Block, LlamaDecoderLayer)"
            )
        for block in blocks:
            fully_shard(block, mesh=dp_mesh)
        count += len(blocks)
        reshard = True if id(model) in frozen_ids else None
        base = getattr(model, "base_model", model)
        if has_score_head(model) and base is not model:
            fully_shard(base, mesh=dp_mesh, reshard_after_forward=reshard)
            fully_shard(score_head(model), mesh=dp_mesh, reshard_after_forward=reshard)
        else:
            fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    return count


@contextlib.contextmanager
def no_gradient_sync(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Turn FSDP2's gradient reduce-scatter off for every sharded unit inside ``modules``.

    A no-op for unsharded modules. Gradients then accumulate unreduced until a backward
    outside the block, which reduces the sum (gradient accumulation without extra traffic).
    """
    units = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of a ``fully_shard``-ed model, on CPU, on rank 0.

    Every rank must call it (it gathers). Returns None when ``model`` is not sharded; under
    sharding, rank 0 gets the full dict and the other ranks an empty one.
    """
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _plain_class(model: nn.Module) -> type[nn.Module]:
    # fully_shard swaps a module's class for a generated ``FSDP<Class>(FSDPModule, Class)``.
    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__bases__ if not issubclass(c, FSDPModule))
    return cls


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """The model with full weights, for exports: every rank must call it.

    Returns ``model`` itself when it is not sharded. Under FSDP2 (or DeepSpeed ZeRO-3, whose
    partitioned parameters are empty outside a forward) it gathers the weights and returns, on
    rank 0, a new plain (unsharded, CPU) model of the same Hugging Face class and config
    carrying them; the other ranks get None.
    """
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return _plain_copy(model, state) if rank == 0 else None
    state = full_state_dict(model)
    if state is None:
        return model
    return _plain_copy(model, state) if state else None  # empty: not rank 0


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    plain = _plain_class(model)(copy.deepcopy(model.config)).to(dtype)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    plain.load_state_dict(state, strict=True)
    return plain.train(model.training)


class ShardedModelsMixin:
    """``configure_model`` for LightningModules whose sub-models FSDP2 shards.

    Subclasses list the attribute names of their sub-models in ``sharded_attrs`` (and the
    frozen ones in ``frozen_attrs``). Under any ModelParallelStrategy the sub-models are
    sharded once; under every other strategy nothing happens.
    """

    sharded_attrs: tuple[str, ...] = ("model",)
    frozen_attrs: tuple[str, ...] = ()

    def configure_model(self) -> None:
        """Shard the sub-models on the strategy's device mesh (idempotent)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        models = [getattr(self, name) for name in self.sharded_attrs]
        if any(is_sharded(m) for m in models):
            return  # configure_model runs again for every fit/validate/test call
        shard_models(
            models,
            self.device_mesh,
            getattr(trainer.strategy, "block_classes", None),
            frozen=[getattr(self, name) for name in self.frozen_attrs],
        )
        self.on_models_sharded()

    def on_models_sharded(self) -> None:
        """Hook run right after sharding (e.g. to rebuild state that mirrors the weights)."""

    def gathered_export_model(self) -> nn.Module | None:
        """The model to export with full weights: every rank calls, rank 0 gets it.

        Without sharding this is ``export_model()`` on every rank; under FSDP2 an unsharded
        copy on rank 0 and None elsewhere (see :func:`unsharded_copy`).
        """
        return unsharded_copy(self.export_model())
