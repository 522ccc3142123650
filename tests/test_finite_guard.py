"""The training-loop guard: non-finite losses and gradients, divergence, overflowed sampling."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_rlhf.callbacks.finite_guard import FiniteGuard, TrainingGuardError, loss_diverged
from lit_rlhf.rollout import NonFiniteSamplingError, generate


class _Toy(L.LightningModule):
    """A linear model whose loss is replaced by ``losses[step]`` when that entry is given.

    ``manual=True`` optimizes by hand, as PPO does, and names the loss terms in ``loss_parts``.
    """

    def __init__(self, losses: dict[int, float] | None = None, manual: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.forced = losses or {}
        self.automatic_optimization = not manual
        self.loss_parts: dict[str, torch.Tensor] = {}

    def _loss(self, batch) -> torch.Tensor:
        loss = self.lin(batch[0]).pow(2).mean()
        forced = self.forced.get(self.trainer.global_step)
        if forced is not None:
            loss = loss * 0 + forced  # keeps the graph, so backward gives non-finite grads
        self.loss_parts = {"policy loss": loss, "value loss": torch.tensor(0.5)}
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(module: _Toy, guard: FiniteGuard, steps: int = 8, extra=()) -> L.Trainer:
    data = torch.utils.data.TensorDataset(torch.randn(steps, 4))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, *extra],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    return trainer


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


@pytest.mark.parametrize("manual", [False, True])
def test_nan_loss_stops_with_the_stage_the_step_and_the_term(manual):
    module = _Toy({3: math.nan}, manual=manual)
    with pytest.raises(TrainingGuardError) as err:
        _fit(module, FiniteGuard("toy", "toy.lr"))
    msg = str(err.value)
    assert msg.startswith("[toy] the training loss is nan") and "optimizer step 3" in msg
    assert "policy loss nan" in msg and "value loss" not in msg  # the finite term is not named
    assert "toy.lr" in msg and "\n" not in msg
    assert all(torch.isfinite(p).all() for p in module.parameters())  # never stepped on NaN


def test_skip_mode_drops_nonfinite_steps_and_counts_them():
    torch.manual_seed(0)
    module = _Toy({2: math.inf, 5: math.nan})
    guard = FiniteGuard("toy", nonfinite="skip", max_skipped_steps=2)
    seen: dict[int, torch.Tensor] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[batch_idx] = _weights(pl_module)

    trainer = _fit(module, guard, extra=[Record()])
    assert guard.skipped == 2
    assert trainer.callback_metrics["guard/skipped_steps"] == 2
    # A skipped step moves no parameter; the others do.
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[5], seen[6])
    assert not torch.equal(seen[3], seen[4])
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_more_skipped_steps_than_allowed_is_an_error():
    module = _Toy({1: math.nan, 2: math.nan, 3: math.nan})
    with pytest.raises(TrainingGuardError, match=r"3 optimizer steps skipped .*skipped_steps=2"):
        _fit(module, FiniteGuard("toy", nonfinite="skip", max_skipped_steps=2))


def test_nonfinite_gradient_with_a_finite_loss_is_caught():
    module = _Toy()
    module.lin.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(TrainingGuardError, match=r"\[toy\] a gradient is NaN or inf at .*step 0"):
        _fit(module, FiniteGuard("toy"))


def test_diverged_loss_is_an_error_or_a_flag_in_the_metrics():
    blown = {s: 1e7 for s in range(1, 8)}
    with pytest.raises(TrainingGuardError, match=r"\[toy\] the training loss diverged: its last 5"):
        _fit(_Toy(blown), FiniteGuard("toy", divergence_window=5))
    trainer = _fit(_Toy(blown), FiniteGuard("toy", divergence_window=5, on_divergence="warn"))
    assert trainer.callback_metrics["guard/diverged"] == 1
    trainer = _fit(_Toy(), FiniteGuard("toy", divergence_window=5))  # a normal run passes
    assert "guard/diverged" not in trainer.callback_metrics


def test_loss_diverged_against_a_naive_reference():
    def naive(losses, window, factor):
        if len(losses) < 2 or losses[0] <= 0:
            return None
        tail = losses[max(1, len(losses) - window) :]
        mean = sum(tail) / len(tail)
        return mean if mean > factor * losses[0] else None

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(0, 30, (1,), generator=g))
        losses = (torch.rand(n, generator=g) * 10 - 1).tolist()
        window = int(torch.randint(1, 12, (1,), generator=g))
        assert loss_diverged(losses, window, 3.0) == naive(losses, window, 3.0)
    # SFT at lr 1e3 blows up at its second step; a recovered spike passes.
    assert loss_diverged([4.2, 2.6e7, 2.0e7, 3.3e7], 20, 3.0) == pytest.approx(2.633e7, rel=1e-3)
    assert loss_diverged([4.2, 50.0, 3.0, 2.5, 2.4], 3, 3.0) is None


def test_overflowed_policy_is_one_line_before_sampling(tiny_gpt2, tok):
    model = tiny_gpt2(num_layers=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(math.inf)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(NonFiniteSamplingError, match="logits are NaN or inf"):
        generate(model, ids, torch.ones_like(ids), 4, 1.0, tok.eos_token_id, tok.pad_token_id)


def test_skipped_steps_and_divergence_open_the_report(tmp_path):
    import json

    from lit_rlhf.eval.report import training_warnings, write_report

    for name, record in {
        "sft": {"guard/skipped_steps": 3.0},
        "rm": {"guard/skipped_steps": 0.0, "guard/diverged": 1.0},
        "ppo": {"guard/skipped_steps": 0.0},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    exports = {n: str(tmp_path / n) for n in ("sft", "rm", "ppo", "missing")}
    lines = training_warnings(exports)
    assert lines == [
        "SFT: 3 optimizer steps skipped (NaN/inf)",
        "RM: the training loss diverged; exported only because guard.on_divergence=warn",
    ]
    metrics = {"eval/sft/gold": 0.5, "eval/sft/gold_lo": 0.4, "eval/sft/gold_hi": 0.6}
    metrics["eval/sft/kl_to_sft"] = 0.0
    report = write_report(str(tmp_path / "out"), metrics, {}, exports, exports["rm"], lines)
    text = open(report).read()
    assert "## Warnings" in text and "- ⚠ SFT: 3 optimizer steps skipped" in text
    healthy = write_report(str(tmp_path / "ok"), metrics, {}, exports, exports["rm"], [])
    assert "Warnings" not in open(healthy).read()
