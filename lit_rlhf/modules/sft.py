"""Supervised fine-tuning (and pretraining) of a causal LM: next-token loss on target tokens."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lit_rlhf.modules.base import (
    ModelOrFactory,
    OptimizerFactory,
    check_packed_once,
    materialize,
    single_model_optimizers,
)
from lit_rlhf.modules.sharding import ShardedModelsMixin
from lit_rlhf.ops.lm_loss import lm_loss, next_token_nll


class SFTModule(ShardedModelsMixin, L.LightningModule):
    """Next-token cross-entropy on the tokens the batch's ``loss_mask`` marks.

    Demonstrations mark only response tokens (the prompt gets no gradient); pretraining
    text marks every token, so the same module trains the ``pretrain`` stage.
    Under FSDP2 (``strategy=fsdp``) ``configure_model`` shards the model's transformer blocks
    (:class:`~lit_rlhf.modules.sharding.ShardedModelsMixin`).

    Args:
        model: A Hugging Face causal LM, or a zero-argument factory building one.
        optimizer: Optional optimizer factory ``params -> Optimizer``; AdamW otherwise.
        lr: Peak learning rate of the default AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        schedule: ``cosine`` (InstructGPT: decay to 10 %), ``linear`` or ``constant``.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final LR as a fraction of the peak.
        loss_reduction: ``token_mean``, ``sequence_mean`` or ``sequence_sum``
            (see :func:`~lit_rlhf.ops.lm_loss.lm_loss`).
    """

    def __init__(
        self,
        model: ModelOrFactory,
        optimizer: OptimizerFactory | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        loss_reduction: str = "token_mean",
    ) -> None:
        super().__init__()
        # Plain Python only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.hparams["betas"] = [float(b) for b in betas]
        self.model = materialize(model, "policy")
        self.optimizer_factory = optimizer
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=-100)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B, T, V) of a collated batch (packed batches carry no attention mask)."""
        check_packed_once(self, self.model, batch)
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = lm_loss(logits, batch["input_ids"], batch["loss_mask"], self.hparams.loss_reduction)
        n_tokens = batch["loss_mask"][:, 1:].sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        # An epoch total over all ranks (synced once, at the epoch's end).
        self.log(
            "train/tokens",
            n_tokens.float(),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        return loss

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps the mode it finds:
        # switch to train mode so sft.dropout acts while training.
        self.model.train()

    def on_validation_epoch_start(self) -> None:
        # A standalone trainer.validate() runs under inference_mode, so the states its epoch-end
        # reset leaves are inference tensors that fit's (no_grad) validation cannot update in
        # place; re-create them in the current mode.
        self.val_loss.reset()
        self.val_ppl.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch)
        nll, mask = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
        n = mask.sum()
        if n == 0:
            return
        self.val_loss.update((nll * mask).sum() / n, weight=n)
        targets = batch["input_ids"][:, 1:].masked_fill(~mask.bool(), -100)
        self.val_ppl.update(logits[:, :-1].float(), targets)
        self.log("val/loss", self.val_loss, prog_bar=True, on_epoch=True)
        self.log("val/ppl", self.val_ppl, on_epoch=True)

    def configure_optimizers(self):
        return single_model_optimizers(self)

    def export_model(self) -> torch.nn.Module:
        """The model to save as the stage's Hugging Face export."""
        return self.model
