"""bf16: every module trains under ``bf16-mixed`` with clipping (PPO also ``bf16-true``).

A fused AdamW declares that it unscales gradients itself, and Lightning's mixed-precision
plugin refuses to clip gradients for such an optimizer (for bf16 too), so these fits once
stopped at the first clipping step. CPU autocast runs the same plugin code as CUDA's.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from test_ppo import data_files, fit, make_module  # noqa: F401 (data_files: fixture)
from test_reward_model import classifier
from test_sft import _trainer as sft_trainer

from lit_rlhf.data.comparisons import ComparisonsDataModule
from lit_rlhf.data.lm_datamodule import DemonstrationsDataModule
from lit_rlhf.models.heads import Float32Linear, apply_score_head, fp32_output_head
from lit_rlhf.modules.base import adamw
from lit_rlhf.modules.reward import RewardModule
from lit_rlhf.modules.sft import SFTModule
from lit_rlhf.ops.lm_loss import lm_loss


def _bf16_trainer(tmp_path, max_steps):
    return sft_trainer(
        tmp_path,
        max_steps=max_steps,
        limit_val_batches=0,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
    )


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sft_trains_in_bf16_mixed_with_clipping(tmp_path, tok, tiny_gpt2):
    demos = [{"prompt": f"Say {w}: ", "completion": w} for w in ("yes", "no", "maybe", "ok")]
    path = _jsonl(tmp_path / "d.jsonl", demos * 4)
    dm = DemonstrationsDataModule(path, val_fraction=0.0, batch_size=4).connect(tok)
    module = SFTModule(tiny_gpt2(), lr=1e-2, schedule="constant")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def loss():
        with torch.no_grad():
            return float(lm_loss(module(batch), batch["input_ids"], batch["loss_mask"]))

    before = loss()
    trainer = _bf16_trainer(tmp_path, 16)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 16
    opt = trainer.optimizers[0]
    assert opt.defaults["fused"] is True  # the fused kernel is kept, clipping still works
    # Weights stay fp32 (autocast computes in bf16); the loss fell.
    assert next(module.model.parameters()).dtype == torch.float32
    assert loss() < 0.7 * before


def test_reward_model_trains_in_bf16_mixed_with_clipping(tmp_path, tok):
    recs = [{"prompt": "Rate:", "completions": ["great", "awful", "fine"], "ranks": [0, 2, 1]}] * 8
    dm = ComparisonsDataModule(_jsonl(tmp_path / "c.jsonl", recs), batch_size=4).connect(tok)
    module = RewardModule(classifier(tok), lr=1e-2, schedule="constant")
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = _bf16_trainer(tmp_path, 4)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_ppo_trains_in_bf16_with_clipping(tok, data_files, precision):  # noqa: F811
    module = make_module(tok, max_grad_norm=1.0)
    before = [p.detach().float().clone() for p in module.policy.parameters()]
    fit(module, tok, data_files, precision=precision)
    assert module.rollouts_done == 2
    weights = next(module.policy.parameters())
    assert weights.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert any(not torch.equal(a, b.float()) for a, b in zip(before, module.policy.parameters()))
    for h in module.history:
        # Scoring and the first update see the same weights; bf16 rounding differs with the
        # micro-batch shapes, so the first ratio is 1 only up to bf16 precision.
        assert h["policy/ratio_first"] == pytest.approx(1.0, abs=0.05)
        assert all(v == v for v in h.values())  # no NaN


def test_fp16_mixed_keeps_the_foreach_kernel():
    # fp16's GradScaler must unscale before clipping: that needs the non-fused optimizer.
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw(p, "16-mixed").defaults["fused"] is None
    assert adamw(p, "bf16-mixed").defaults["fused"] is True
    assert adamw(p, None).defaults["fused"] is True


def test_score_head_is_float32_under_autocast(tok):
    model = classifier(tok)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    plain = apply_score_head(model, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = apply_score_head(model, hidden)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)  # no bf16 rounding of the scores


def test_fp32_output_head_keeps_weights_and_survives_copies(tok, tiny_gpt2):
    model = tiny_gpt2()
    keys = list(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    fp32_output_head(model)
    assert isinstance(model.get_output_embeddings(), Float32Linear)
    assert list(model.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.base_model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert before.dtype == torch.bfloat16 and logits.dtype == torch.float32
    head = model.get_output_embeddings()
    expected = hidden.float() @ head.weight.float().T
    assert torch.allclose(logits, expected, atol=1e-5)
    # Without autocast nothing changes; copies and pickles keep the fp32 head.
    assert torch.equal(model(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone.get_output_embeddings(), Float32Linear)
