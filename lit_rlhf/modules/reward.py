"""The reward model: an LM backbone with a scalar head, trained on K-wise comparisons.

One training step scores every response of the batch's P prompts in ONE forward (N rows,
or fewer packed rows when the batch is padding-free),
regroups the scores per prompt as (P, Kmax) and applies InstructGPT's loss over all untied
pairs of each prompt (:func:`~lit_rlhf.ops.ranking.kwise_ranking_loss`). The score is read at
the last real token by the attention mask (:func:`~lit_rlhf.models.heads.sequence_scores`).
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.data.lm_tokenize import encode_demonstrations
from lit_rlhf.models.heads import packed_sequence_scores, sequence_scores
from lit_rlhf.modules.base import (
    ModelOrFactory,
    OptimizerFactory,
    check_packed_once,
    materialize,
    single_model_optimizers,
)
from lit_rlhf.modules.sharding import ShardedModelsMixin
from lit_rlhf.ops.ranking import kwise_ranking_loss, pairwise_accuracy


def grouped_rewards(scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Regroup flat response scores per prompt.

    Args:
        scores: (N,) one score per response row.
        index: (P, Kmax) long row of each slot in ``scores``.
        valid: (P, Kmax) bool; padded slots are set to 0.

    Returns:
        (P, Kmax) rewards, ``scores[index]`` where valid and 0 elsewhere.
    """
    return torch.where(
        valid, scores[index], torch.zeros((), dtype=scores.dtype, device=scores.device)
    )


class RewardModule(ShardedModelsMixin, L.LightningModule):
    """Trains a one-label ``*ForSequenceClassification`` model with the K-wise ranking loss.

    Batches come from :class:`~lit_rlhf.data.comparisons.ComparisonCollator`.
    Under FSDP2 (``strategy=fsdp``) ``configure_model`` shards the model's transformer blocks
    (:class:`~lit_rlhf.modules.sharding.ShardedModelsMixin`).

    Args:
        model: HF sequence classifier with ``num_labels=1`` (or a zero-argument factory).
        optimizer: Optional optimizer factory ``params -> Optimizer``; AdamW otherwise.
        lr: Peak learning rate of the default AdamW (InstructGPT 6B RM: 9e-6).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        schedule: ``cosine`` (InstructGPT: decay to 10 %), ``linear`` or ``constant``.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final LR as a fraction of the peak.
        margin: Required reward gap between the better and the worse response of each pair
            (TRL's margin term; 0 = InstructGPT's loss).

    Logged: ``train/loss``, ``train/acc``, ``train/pairs``, ``train/reward_mean``;
    ``val/loss`` (mean over validation prompts of the per-prompt loss), ``val/acc``
    (correct / all untied validation pairs) and, when the batches carry gold scores,
    ``val/acc_gold`` (agreement with the gold ordering on untied gold pairs).
    """

    def __init__(
        self,
        model: ModelOrFactory,
        optimizer: OptimizerFactory | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        schedule: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        margin: float = 0.0,
    ) -> None:
        super().__init__()
        # Plain Python only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.hparams["betas"] = [float(b) for b in betas]
        self.model = materialize(model, "reward model")
        self.optimizer_factory = optimizer
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.val_acc_gold = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) scores of (B, T) sequences, read at each one's last real token."""
        return sequence_scores(self.model, input_ids, attention_mask)

    def rewards(self, batch: dict) -> torch.Tensor:
        """(P, Kmax) rewards of a collated batch: one forward over all N responses.

        Padding-free batches (``attention_mask`` None) are scored from their packed rows.
        """
        if batch.get("attention_mask") is None:
            check_packed_once(self, self.model, batch)
            scores = packed_sequence_scores(
                self.model, batch["input_ids"], batch["position_ids"], batch["ends"]
            )
        else:
            scores = self(batch["input_ids"], batch["attention_mask"])
        return grouped_rewards(scores, batch["index"], batch["valid"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # 1. score every response once, 2. loss over each prompt's untied pairs, 3. log.
        rewards = self.rewards(batch)
        loss, n_pairs = kwise_ranking_loss(
            rewards, batch["ranks"], batch["valid"], self.hparams.margin
        )
        correct, _ = pairwise_accuracy(rewards, batch["ranks"], batch["valid"])
        p = rewards.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=p)
        self.log("train/acc", correct.float() / n_pairs.clamp(min=1), batch_size=p)
        self.log(
            "train/pairs",
            n_pairs.float(),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # an epoch total over all ranks
            batch_size=p,
        )
        reward_mean = rewards[batch["valid"]].mean()
        self.log("train/reward_mean", reward_mean.detach(), batch_size=p)
        return loss

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps modes as it finds them;
        # rm.dropout > 0 must act while training.
        self.model.train()

    def on_validation_epoch_start(self) -> None:
        # States reset inside trainer.validate() are inference tensors, which a later
        # fit's (no_grad) validation could not update in place: start from fresh ones.
        for metric in (self.val_loss, self.val_acc, self.val_acc_gold):
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rewards = self.rewards(batch)
        ranks, valid = batch["ranks"], batch["valid"]
        loss, n_pairs = kwise_ranking_loss(rewards, ranks, valid, self.hparams.margin)
        correct, _ = pairwise_accuracy(rewards, ranks, valid)
        # The loss is a mean over prompts that have pairs: weight it by their count.
        n_prompts = _prompts_with_pairs(ranks, valid)
        if n_pairs > 0:
            self.val_loss.update(loss.detach(), weight=n_prompts)
            self.val_acc.update(correct.float() / n_pairs, weight=n_pairs)
            self.log("val/loss", self.val_loss, prog_bar=True, on_epoch=True)
            self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)
        if "gold" in batch and batch["has_gold"].any():
            # Higher gold = better, so -gold works as a rank (strict order: gold ties give no pair).
            has = batch["has_gold"].unsqueeze(-1) & valid
            ok, n = pairwise_accuracy(rewards, -batch["gold"], has)
            if n > 0:
                self.val_acc_gold.update(ok.float() / n, weight=n)
                self.log("val/acc_gold", self.val_acc_gold, on_epoch=True)

    def configure_optimizers(self):
        return single_model_optimizers(self)

    def export_model(self) -> PreTrainedModel:
        """The sequence classifier to save as the stage's Hugging Face export."""
        return self.model


def _prompts_with_pairs(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P, K) ranks/valid -> number of prompts with at least one untied valid pair."""
    big = torch.iinfo(ranks.dtype).max
    lo = torch.where(valid, ranks, torch.full_like(ranks, big)).min(-1).values
    hi = torch.where(valid, ranks, torch.full_like(ranks, -1)).max(-1).values
    return (hi > lo).sum()


def _max_positions(model: PreTrainedModel) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reward of each (prompt, completion), batched and without gradients.

    Sequences are encoded exactly like the comparisons the RM was trained on: prompt ids +
    completion ids + EOS, the prompt cut from the left to fit ``max_length``. Scores do not
    depend on the batching (sequences are grouped by length only to save padding).

    Args:
        model: One-label sequence classifier (its unfolded config bias is included).
        tokenizer: The RM's tokenizer (pad distinct from EOS).
        prompts: (N) prompt strings.
        completions: (N) completion strings, without EOS.
        batch_size: Sequences per forward.
        max_length: Longest sequence; None: the model's position limit.

    Returns:
        (N,) float32 scores on the CPU, in input order.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return torch.zeros(0)
    max_length = max_length or _max_positions(model) or 1024
    examples, _ = encode_demonstrations(tokenizer, prompts, completions, max_length)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(examples), dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = max(len(examples[i]["input_ids"]) for i in rows)
            ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for r, i in enumerate(rows):
                seq = examples[i]["input_ids"]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            scores = sequence_scores(model, ids.to(device), mask.to(device))
            out[torch.tensor(rows)] = scores.float().cpu()
    finally:
        model.train(was_training)
    return out


def demonstration_bias(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> float:
    """The bias that makes the demonstrations score mean 0 (InstructGPT): ``-mean(score)``.

    Args:
        model: One-label sequence classifier.
        tokenizer: The RM's tokenizer.
        prompts: Demonstration prompts.
        completions: Demonstration completions (the labelers' replies), without EOS.
        batch_size: Sequences per forward.
        max_length: Longest sequence (as in :func:`score_pairs`).

    Returns:
        ``-mean`` of the demonstrations' current scores (add it with
        :func:`~lit_rlhf.models.heads.fold_reward_bias`).
    """
    if not prompts:
        raise ValueError("demonstration_bias needs at least one demonstration")
    scores = score_pairs(model, tokenizer, prompts, completions, batch_size, max_length)
    return -float(scores.double().mean())
