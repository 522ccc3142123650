"""PPOModule's hooks around the PPO step: optimizer, layout, distribution, checkpoints, export.

Kept apart from the step itself (``ppo.py``) so each file stays readable. Optimizer: one
AdamW with the policy and value parameter groups. Layout: when the
forwards run padding-free. Distribution: how a
micro-step skips the gradient reduction, when generation keeps ranks in step. Checkpoints:
the frozen reference and reward models are left out (they are rebuilt from their export
paths); the run state (rollout counter, KL controller, score moments, EMA, RNG) goes in.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_rlhf.modules.base import adamw, build_scheduler, check_packed_once, trainer_precision
from lit_rlhf.modules.ema import WeightEMA
from lit_rlhf.modules.sharding import is_sharded, no_gradient_sync, unsharded_copy
from lit_rlhf.ops.lm_loss import lm_loss
from lit_rlhf.rollout.packed import PackedRollout

#: State-dict prefixes of the frozen models (not checkpointed).
FROZEN_PREFIXES = ("ref_model.", "reward_model.")


class PPOHooksMixin:
    """Optimizer, layout, distribution, checkpoint and export hooks of PPOModule."""

    def configure_optimizers(self):
        """One AdamW over the policy and value groups; the schedule counts optimizer steps."""
        hp = self.hparams
        groups = [
            {
                "params": [p for p in self.policy.parameters() if p.requires_grad],
                "lr": hp.policy_lr,
                "name": "policy",
            },
            {
                "params": [p for p in self.value_model.parameters() if p.requires_grad],
                "lr": hp.value_lr,
                "name": "value",
            },
        ]
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        else:
            opt = adamw(
                groups, trainer_precision(self), weight_decay=hp.weight_decay, eps=hp.adam_eps
            )
        total = hp.n_rollouts * hp.ppo_epochs * hp.num_minibatches
        sched = build_scheduler(
            opt, total, hp.schedule, hp.warmup_steps, 1.0, hp.warmup_start_ratio
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def _ptx_loss(self, batch: dict) -> torch.Tensor:
        """LM loss of the policy on a pretraining micro-batch (``ptx_reduction``)."""
        check_packed_once(self, self.policy, batch)
        logits = self.policy(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        return lm_loss(logits, batch["input_ids"], batch["loss_mask"], self.hparams.ptx_reduction)

    def _log_rollout(self, stats: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log a rollout's metrics (reduced across ranks); RM score, KL and β on the bar."""
        shown = ("objective/scores", "objective/kl", "objective/kl_coef")
        for prog_bar in (True, False):
            self.log_dict(
                {k: v for k, v in stats.items() if (k in shown) == prog_bar},
                prog_bar=prog_bar,
                on_step=True,
                on_epoch=False,
                sync_dist=self.trainer.world_size > 1,
                batch_size=batch_size,
            )

    def _pack(self, rollout) -> PackedRollout | None:
        """The padding-free layout of ``rollout`` for the scoring/training forwards, or None.

        None when ``padding_free`` is off. Before the first packed forward every model is
        probed once (:func:`~lit_rlhf.modules.base.check_packed_once`): a model whose
        attention lets packed sequences see each other stops the run with the option to
        turn off.
        """
        if not self.hparams.padding_free:
            return None
        for name in self.sharded_attrs:
            check_packed_once(
                self, getattr(self, name), {"attention_mask": None}, "ppo.padding_free"
            )
        return rollout.pack()

    def _no_sync(self, skip: bool):
        """Accumulate a non-boundary micro-step's gradients without reducing them across ranks.

        DDP skips its all-reduce (``no_sync``), FSDP2 its reduce-scatter
        (``set_requires_gradient_sync``); DeepSpeed is told the step is no accumulation boundary.
        """
        if not skip:
            return contextlib.nullcontext()
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "set_gradient_accumulation_boundary"):  # a DeepSpeed engine
            return _not_a_boundary(wrapped)
        if self.trainer.world_size == 1:
            return contextlib.nullcontext()
        if isinstance(wrapped, DistributedDataParallel):
            return self.trainer.strategy.block_backward_sync()
        return no_gradient_sync([self])  # a no-op unless FSDP2 sharded the models

    @property
    def synced_generation(self) -> bool:
        """Whether ``generate`` keeps the ranks stepping together (see ``synced_gpus``)."""
        if self.trainer.world_size == 1:
            return False  # nothing to wait for (and no process group to ask)
        sharded = is_sharded(self.policy) or isinstance(self.trainer.strategy, DeepSpeedStrategy)
        return sharded or self.hparams.synced_gpus is not False

    def on_models_sharded(self) -> None:
        # The average must mirror the sharded weights (one shard per rank), not full copies.
        if self.ema is not None:
            self.ema = WeightEMA(self.policy, self.ema.decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(FROZEN_PREFIXES)]:
            del sd[key]
        checkpoint["ppo_state"] = {
            "rollouts_done": self.rollouts_done,
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state") or {}
        self.rollouts_done = int(state.get("rollouts_done", 0))
        if "kl_ctl" in state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if state.get("torch_rng") is not None:
            self._rng_to_restore = state["torch_rng"]
        # The report's curves must cover the whole run, not just the part after the resume.
        self.history = list(state.get("history") or [])

    def on_train_start(self) -> None:
        # Restored here, after Lightning's own seeding/setup, so sampling continues exactly.
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            torch.set_rng_state(rng)
            self._rng_to_restore = None
        if self.rollouts_done >= self.hparams.n_rollouts:
            # Resumed from a finished run: nothing left to do (not one more rollout).
            self.trainer.should_stop = True

    def export_model(self) -> nn.Module:
        """The policy to export: its EMA copy when EMA is on."""
        return self.ema.copy_model(self.policy) if self.ema is not None else self.policy

    def gathered_export_model(self) -> nn.Module | None:
        """The policy (or its EMA) with full weights: every rank calls, rank 0 gets it."""
        if self.ema is None or not is_sharded(self.policy):
            return unsharded_copy(self.export_model())
        plain = unsharded_copy(self.policy)  # gathers on every rank
        averaged = self.ema.full_state_dict()  # gathers on every rank
        if plain is not None:
            plain.load_state_dict(averaged, strict=False)
        return plain


@contextlib.contextmanager
def _not_a_boundary(engine):
    """DeepSpeed: a micro-step whose gradients accumulate until the boundary one reduces them."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)
