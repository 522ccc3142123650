"""PPO (and PPO-ptx) fine-tuning of a policy against a reward model: InstructGPT step 3.

One ``training_step`` = one rollout + ``ppo_epochs`` passes of minibatch updates, with manual
optimization. The four models: the trained policy and value model (ONE optimizer, two
parameter groups), the frozen reference (SFT) and reward models (registered so they move and
shard with the module, but left out of checkpoints: they are rebuilt from their exports).
"""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch

from lit_rlhf.models.heads import fp32_output_head
from lit_rlhf.modules.base import (
    ModelOrFactory,
    OptimizerFactory,
    freeze,
    materialize,
)
from lit_rlhf.modules.ema import WeightEMA
from lit_rlhf.modules.ppo_hooks import PPOHooksMixin
from lit_rlhf.modules.sharding import ShardedModelsMixin
from lit_rlhf.ops.critic_free import check_estimator, critic_free_advantages, returns_to_go
from lit_rlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate
from lit_rlhf.ops.masking import masked_mean, masked_whiten
from lit_rlhf.ops.ppo import (
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    per_token_rewards,
)
from lit_rlhf.ops.scores import apply_missing_eos_rule, scale_and_clip
from lit_rlhf.rollout import (
    HFGenerateEngine,
    Rollout,
    RolloutEngine,
    response_logprobs,
    response_values,
    score,
)
from lit_rlhf.rollout.record import split_episodes


class PPOModule(PPOHooksMixin, ShardedModelsMixin, L.LightningModule):
    """PPO with a per-token KL penalty to the reference policy, optionally with ptx.

    Use with :class:`~lit_rlhf.data.ppo_datamodule.PPODataModule` (the module fetches the
    batch of rollout ``k`` from it by its own checkpointed counter).

    Args:
        policy: Causal LM to train (or a factory).
        value_model: One-label sequence classifier used per token (init: the RM export).
        ref_model: Frozen reference causal LM (the SFT export).
        reward_model: Frozen one-label sequence classifier.
        eos_token_id: Ends responses.
        pad_token_id: Pads prompts/responses (must differ from EOS for RM pooling).
        optimizer: Factory ``param_groups -> Optimizer``; AdamW by default.
        n_rollouts: Run length in rollouts (the module stops the trainer after it).
        ppo_epochs: Passes over each rollout (InstructGPT 1, N+ 4).
        num_minibatches: Optimizer steps per pass.
        micro_batch_size: Episodes per backward (hand-made gradient accumulation); None = minibatch.
        temperature: Sampling temperature T; every log-prob uses logits / T.
        max_new_tokens: Response length limit.
        kl_coef: Initial beta of ``-beta * KL_t`` (InstructGPT 0.02).
        kl_estimator: ``k1`` (InstructGPT), ``k2`` or ``k3`` (non-negative, low variance).
        kl_target: When set, Ziegler's adaptive controller steers the KL toward it.
        kl_horizon: Horizon of the adaptive controller, in episodes.
        missing_eos_score: Fixed score for responses without EOS (e.g. -1).
        missing_eos_penalty: Or a penalty subtracted from their score.
        reward_scaling: Divide scores by their running std.
        score_clip: Clip (scaled) scores to ``[-score_clip, score_clip]``.
        gamma: GAE discount (1: no discount).
        lam: GAE lambda.
        whiten_advantages: Normalise GAE's advantages per rollout.
        advantage_estimator: ``gae`` (a value model, InstructGPT) or a critic-free one, which
            trains no value model: ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``,
            ``reinforce_pp_baseline`` (:mod:`lit_rlhf.ops.critic_free`).
        group_size: Samples per prompt K in consecutive rows (the datamodule's
            ``group_size``); the group baselines compare a response with the other K - 1.
        clip_range: PPO ratio clip.
        value_clip_range: Value clip.
        vf_coef: Weight of the value loss (N+: 0.1).
        policy_lr: Learning rate of the policy parameter group.
        value_lr: Learning rate of the value parameter group.
        weight_decay: AdamW weight decay.
        adam_eps: AdamW epsilon (N+: 1e-5).
        schedule: LR schedule after warmup (InstructGPT: constant).
        warmup_steps: Warmup optimizer steps.
        warmup_start_ratio: Warmup starts at this fraction of the LR (InstructGPT: 1/10).
        max_grad_norm: Gradient-norm clip (None: off).
        ptx_coef: gamma of PPO-ptx, multiplying the pretraining LM loss with ``ptx_reduction``.
        ptx_reduction: ``token_mean`` (per-token mean NLL over the ptx micro-batch) or
            ``sequence_sum``; gamma's meaning depends on it.
        ema_decay: EMA of the policy weights for evaluation/export (InstructGPT 0.992).
        padding_free: Run the scoring and training forwards on the rollout's real tokens
            packed into rows (:mod:`lit_rlhf.rollout.packed`) wherever that costs fewer FLOPs
            than the padded layout; same numbers up to float rounding.
        synced_gpus: Generate with ``synced_gpus``: every rank keeps running forwards until the
            longest response of all ranks ends. None: on whenever there are several ranks
            (sharded models gather weights in every forward, so a rank that stopped early would
            deadlock the others); under FSDP2/DeepSpeed it is always on.
        engine: The sampler of phase 1 (:class:`~lit_rlhf.rollout.RolloutEngine`; default
            :class:`~lit_rlhf.rollout.HFGenerateEngine`). One whose log-probs are not exact
            gets the old log-probs recomputed by a policy forward in phase 2.
    """

    sharded_attrs = ("policy", "value_model", "ref_model", "reward_model")
    frozen_attrs = ("ref_model", "reward_model")

    def __init__(
        self,
        policy: ModelOrFactory,
        value_model: ModelOrFactory,
        ref_model: ModelOrFactory,
        reward_model: ModelOrFactory,
        eos_token_id: int,
        pad_token_id: int,
        optimizer: OptimizerFactory | None = None,
        n_rollouts: int = 100,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        micro_batch_size: int | None = None,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        kl_target: float | None = None,
        kl_horizon: float = 10000.0,
        missing_eos_score: float | None = None,
        missing_eos_penalty: float | None = None,
        reward_scaling: bool = False,
        score_clip: float | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        advantage_estimator: str = "gae",
        group_size: int = 1,
        clip_range: float = 0.2,
        value_clip_range: float = 0.2,
        vf_coef: float = 0.1,
        policy_lr: float = 1e-5,
        value_lr: float = 1e-5,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-5,
        schedule: str = "constant",
        warmup_steps: int = 0,
        warmup_start_ratio: float = 0.1,
        max_grad_norm: float | None = 1.0,
        ptx_coef: float = 0.0,
        ptx_reduction: str = "token_mean",
        ema_decay: float | None = None,
        synced_gpus: bool | None = None,
        padding_free: bool = True,
        engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__()
        if kl_coef < 0:
            raise ValueError(f"kl_coef (beta) must be >= 0, got {kl_coef}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_estimator(advantage_estimator, group_size)
        if eos_token_id == pad_token_id:
            raise ValueError("pad_token_id must differ from eos_token_id (see load_tokenizer)")
        self.save_hyperparameters(
            ignore=["policy", "value_model", "ref_model", "reward_model", "optimizer", "engine"]
        )
        self.engine = engine or HFGenerateEngine()
        self.automatic_optimization = False
        self.strict_loading = False  # frozen models are not in checkpoints
        # float32 log-probs under bf16 autocast (a no-op in fp32 runs).
        self.policy = fp32_output_head(materialize(policy, "policy"))
        self.value_model = materialize(value_model, "value model")
        if advantage_estimator != "gae":  # no critic: no grads (DDP would wait for them)
            freeze(self.value_model)
        self.ref_model = freeze(fp32_output_head(materialize(ref_model, "reference model")))
        self.reward_model = freeze(materialize(reward_model, "reward model"))
        self.optimizer_factory = optimizer
        self.kl_ctl = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if kl_target
            else FixedKLController(kl_coef)
        )
        self.score_moments = RunningMoments()
        self.ema = WeightEMA(self.policy, ema_decay) if ema_decay else None
        self.rollouts_done = 0
        self.last_rollout: Rollout | None = None
        #: One dict of (this rank's) metrics per rollout, for plots and reports.
        self.history: list[dict[str, float]] = []
        self.loss_parts: dict[str, torch.Tensor] = {}  # the terms of the loss being optimized

    # ---------------------------------------------------------------- the PPO step
    def training_step(self, batch, batch_idx: int) -> dict:
        """One rollout and its PPO updates.

        Returns:
            What callbacks receive as ``outputs`` in ``on_train_batch_end``: ``{"rollout":
            the scored Rollout (advantages and returns filled in), "metrics": this rollout's
            row of ``history``}``; a callback may add keys to ``metrics`` (they go into
            ``history.json``).
        """
        hp = self.hparams
        data = self.trainer.datamodule.rollout_batch(self.rollouts_done)
        query_ids, query_mask = (
            data["query_ids"].to(self.device),
            data["query_mask"].to(self.device),
        )

        # 1. Rollout: sample one response per prompt, cut after the first EOS.
        t0 = time.perf_counter()
        self.engine.load_weights(self.policy)
        ro = self.engine.generate(
            self.policy,
            query_ids,
            query_mask,
            hp.max_new_tokens,
            hp.temperature,
            hp.eos_token_id,
            hp.pad_token_id,
            self.synced_generation,
        )
        mask = ro.response_mask

        # 2. Score: reference log-probs, values, RM score at the last token (the old
        # log-probs come from the sampling pass itself, when the engine's are exact).
        t1 = time.perf_counter()
        packed = self._pack(ro)
        with torch.no_grad():
            if not self.engine.exact_logprobs:
                ro.logprobs, _ = response_logprobs(self.policy, ro, hp.temperature, packed=packed)
                ro.logprobs = ro.logprobs.masked_fill(~mask, 0.0)
            ro.ref_logprobs, _ = response_logprobs(
                self.ref_model, ro, hp.temperature, packed=packed
            )
            critic = hp.advantage_estimator == "gae"
            ro.values = (
                response_values(self.value_model, ro, packed).masked_fill(~mask, 0.0)
                if critic
                else torch.zeros_like(ro.logprobs)  # critic-free: no value model forward
            )
            ro.raw_scores = score(self.reward_model, ro, packed)
            ro.scores = apply_missing_eos_rule(
                ro.raw_scores, ro.has_eos, hp.missing_eos_score, hp.missing_eos_penalty
            )

            # 3. Per-token reward: -beta * KL_t on every token, the score on the last one.
            kl = kl_estimate(ro.logprobs, ro.ref_logprobs, hp.kl_estimator).masked_fill(~mask, 0.0)
            if hp.reward_scaling:
                self.score_moments.update(self.all_gather(ro.scores).reshape(-1))
            scaled = scale_and_clip(
                ro.scores, self.score_moments.std if hp.reward_scaling else None, hp.score_clip
            )
            kl_coef = self.kl_ctl.value
            rewards, non_score = per_token_rewards(scaled, kl, mask, kl_coef)

            # 4. Advantages: GAE over response tokens, whitened per rollout; or a critic-free
            # estimator's, from the returns of the prompt's group (or of the batch).
            if critic:
                ro.advantages, ro.returns = gae_advantages(
                    rewards, ro.values, mask, hp.gamma, hp.lam
                )
                if hp.whiten_advantages:
                    ro.advantages = masked_whiten(ro.advantages, mask)
            else:
                ro.returns = returns_to_go(rewards, mask)
                ro.advantages = critic_free_advantages(
                    rewards, mask, hp.advantage_estimator, hp.group_size
                )

        # 5. Optimize: ppo_epochs x minibatches of clipped policy + value (+ ptx) loss.
        t2 = time.perf_counter()
        stats = self._optimize(ro, data.get("ptx"))
        t3 = time.perf_counter()
        stats.update(
            {"time/generation": t1 - t0, "time/scoring": t2 - t1, "time/optimization": t3 - t2}
        )

        # Bookkeeping: KL controller, EMA, run length.
        kl_per_seq = kl.sum(-1)
        mean_kl = self.all_gather(kl_per_seq.mean()).mean().item()
        self.kl_ctl.update(mean_kl, n_steps=query_ids.shape[0] * self.trainer.world_size)
        if self.ema is not None:
            self.ema.update(self.policy)
        self.rollouts_done += 1
        self.last_rollout = ro
        if self.rollouts_done >= hp.n_rollouts:
            self.trainer.should_stop = True

        # 6. Log (reduced across ranks).
        lengths = mask.sum(-1).float()
        stats.update(
            {
                "objective/kl": kl_per_seq.mean(),
                "objective/scores": ro.scores.mean(),
                "objective/raw_scores": ro.raw_scores.mean(),
                "objective/non_score_reward": non_score.sum(-1).mean(),
                "objective/rlhf_reward": (ro.scores - kl_coef * kl_per_seq).mean(),
                "objective/kl_coef": torch.tensor(kl_coef),
                "rollout/response_length": lengths.mean(),
                "rollout/eos_rate": ro.has_eos.float().mean(),
                "rollout/rollouts": torch.tensor(float(self.rollouts_done)),
            }
        )
        if critic:
            stats["value/explained_variance"] = explained_variance(ro.values, ro.returns, mask)
        stats = {
            k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in stats.items()
        }
        self._log_rollout(stats, query_ids.shape[0])
        self.history.append({k: float(v) for k, v in stats.items()})
        return {"rollout": ro, "metrics": self.history[-1]}

    def _optimize(self, ro: Rollout, ptx: dict | None) -> dict[str, torch.Tensor]:
        hp = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        b = ro.query_ids.shape[0]
        mb, micro = split_episodes(b, hp.num_minibatches, hp.micro_batch_size)
        critic = hp.advantage_estimator == "gae"
        n_micro = mb // micro
        if ptx is not None and hp.ptx_coef > 0:
            ptx = {k: (v.to(self.device) if v is not None else None) for k, v in ptx.items()}
            ptx_chunks = torch.arange(ptx["input_ids"].shape[0], device=self.device).tensor_split(
                hp.num_minibatches * n_micro
            )
        else:
            ptx = None
        sums: dict[str, float] = defaultdict(float)
        n = 0
        for epoch in range(hp.ppo_epochs):
            order = torch.randperm(b, device=self.device)
            for m in range(hp.num_minibatches):
                for u in range(n_micro):
                    idx = order[m * mb + u * micro : m * mb + (u + 1) * micro]
                    sub = ro.select(idx)
                    packed = self._pack(sub)
                    last = u == n_micro - 1
                    with self._no_sync(not last):
                        logp, entropy = response_logprobs(
                            self.policy, sub, hp.temperature, with_entropy=True, packed=packed
                        )
                        pg_loss, pg = clipped_policy_loss(
                            logp, sub.logprobs, sub.advantages, sub.response_mask, hp.clip_range
                        )
                        # Named terms, so a non-finite loss is reported by its term (FiniteGuard).
                        self.loss_parts = {"policy loss": pg_loss}
                        loss = pg_loss
                        if critic:
                            values = response_values(self.value_model, sub, packed)
                            vf_loss, vf = clipped_value_loss(
                                values,
                                sub.values,
                                sub.returns,
                                sub.response_mask,
                                hp.value_clip_range,
                            )
                            loss = loss + hp.vf_coef * vf_loss
                            self.loss_parts["value loss"] = vf_loss
                            sums["value/loss"] += float(vf_loss.detach())
                            sums["value/clipfrac"] += float(vf["clipfrac"])
                        if ptx is not None:
                            rows = ptx_chunks[m * n_micro + u]
                            ptx_loss = self._ptx_loss(
                                {k: None if v is None else v[rows] for k, v in ptx.items()}
                            )
                            loss = loss + hp.ptx_coef * ptx_loss
                            self.loss_parts["ptx loss"] = ptx_loss
                            sums["ptx/loss"] += ptx_loss.item()
                        self.manual_backward(loss / n_micro)
                    if epoch == 0 and m == 0 and u == 0:
                        sums["policy/ratio_first"] = pg["ratio_mean"].item()
                    for key, value in (
                        ("policy/approx_kl", pg["approx_kl"]),
                        ("policy/clipfrac", pg["clipfrac"]),
                        ("policy/ratio_mean", pg["ratio_mean"]),
                        ("policy/ratio_var", pg["ratio_var"]),
                        ("policy/entropy", masked_mean(entropy.detach(), sub.response_mask)),
                        ("policy/loss", pg_loss.detach()),
                    ):
                        sums[key] += float(value)
                    n += 1
                if hp.max_grad_norm:
                    self.clip_gradients(
                        opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
        out = {k: torch.tensor(v / n) for k, v in sums.items() if k != "policy/ratio_first"}
        out["policy/ratio_first"] = torch.tensor(sums["policy/ratio_first"])
        out["train/lr_policy"] = torch.tensor(opt.param_groups[0]["lr"])
        return out
