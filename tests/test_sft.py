"""SFTModule end to end on CPU: masking, learning, export, checkpoints, resume, metrics.json."""

from __future__ import annotations

import json
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lit_rlhf.callbacks.hf_export import (
    MARKER,
    HFExportCallback,
    is_complete_export,
    save_hf_folder,
)
from lit_rlhf.callbacks.metrics_json import MetricsJSONCallback, update_metrics_json
from lit_rlhf.data.lm_datamodule import DemonstrationsDataModule
from lit_rlhf.data.lm_tokenize import LMCollator, encode_demonstrations
from lit_rlhf.modules.sft import SFTModule

PROMPTS = ["Rate: good food. ", "Rate: bad service. ", "Say hi: ", "Q: 2+2? "]
ANSWERS = ["positive", "negative", "hi", "4"]


def _demo_file(tmp_path, n=8):
    path = tmp_path / "demos.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": PROMPTS[i % 4], "completion": ANSWERS[i % 4]}) + "\n")
    return str(path)


def _trainer(tmp_path, **kwargs):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    base.update(kwargs)
    return L.Trainer(**base)


def _batch(tok, n=4):
    exs, _ = encode_demonstrations(tok, PROMPTS[:n], ANSWERS[:n], max_length=64)
    return LMCollator(pad_token_id=tok.pad_token_id)(exs)


def test_prompt_tokens_get_no_gradient(tok, tiny_lm):
    module = SFTModule(tiny_lm())
    batch = _batch(tok)
    logits = module(batch)
    logits.retain_grad()
    from lit_rlhf.ops.lm_loss import lm_loss

    lm_loss(logits, batch["input_ids"], batch["loss_mask"]).backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    # Position t predicts token t + 1: its logits get gradient iff token t + 1 is a target.
    predicts_target = torch.zeros_like(batch["loss_mask"])
    predicts_target[:, :-1] = batch["loss_mask"][:, 1:]
    assert (grad_norm[~predicts_target] == 0).all()  # prompt, pad and last positions: exactly 0
    assert (grad_norm[predicts_target] > 0).all()
    # The position before the first response token does get gradient (it predicts it).
    n_prompt = (~batch["loss_mask"][0]).long().argmin()
    assert grad_norm[0, n_prompt - 1] > 0 and grad_norm[0, n_prompt - 2] == 0


def test_training_step_loss_matches_naive(tok, tiny_gpt2):
    module = SFTModule(tiny_gpt2())
    batch = _batch(tok)
    loss = module.training_step(batch, 0)  # self.log without a trainer only warns
    logits = module(batch).detach()
    total, count = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["loss_mask"][b, t]:
                logp = torch.log_softmax(logits[b, t - 1].double(), -1)
                total -= float(logp[batch["input_ids"][b, t]])
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_loss_falls_and_val_metrics(tmp_path, tok, tiny_gpt2):
    path = _demo_file(tmp_path, 16)
    dm = DemonstrationsDataModule(path, val_source=path, batch_size=4, max_length=64).connect(tok)
    module = SFTModule(tiny_gpt2(), lr=1e-2, schedule="constant")
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=dm, verbose=False)
    before = float(trainer.callback_metrics["val/loss"])
    # validate() then fit() on one module: fit's validation must cope with metric states left
    # by validate's inference mode (it once crashed with "Inplace update to inference tensor").
    trainer = _trainer(tmp_path, max_steps=24, check_val_every_n_epoch=6)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 24
    trainer.validate(module, datamodule=dm, verbose=False)
    after = float(trainer.callback_metrics["val/loss"])
    assert after < 0.5 * before, (before, after)

    # val/loss is the token-weighted mean NLL of the completion tokens; val/ppl = exp of it.
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module(batch)
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            mask = batch["loss_mask"][:, 1:]
            total += float(nll[mask].sum())
            count += int(mask.sum())
    assert after == pytest.approx(total / count, rel=1e-4)
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(math.exp(after), rel=1e-4)


def test_export_reloads_with_plain_transformers(tmp_path, tok, tiny_lm):
    path = _demo_file(tmp_path, 8)
    dm = DemonstrationsDataModule(path, val_fraction=0.25, batch_size=4).connect(tok)
    module = SFTModule(tiny_lm())
    export = tmp_path / "export"
    cb = HFExportCallback(str(export), tokenizer=tok, info={"stage": "sft"})
    _trainer(tmp_path, max_steps=2, callbacks=[cb], limit_val_batches=0).fit(module, datamodule=dm)

    assert is_complete_export(str(export))
    assert json.loads((export / MARKER).read_text())["stage"] == "sft"
    reloaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    batch = _batch(tok)
    module.eval()
    with torch.no_grad():
        expected = module(batch)
        got = reloaded(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(export)).pad_token_id == tok.pad_token_id
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _plain(obj):
    """True when obj is built from plain Python containers and scalars only."""
    if isinstance(obj, dict):
        return type(obj) is dict and all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj) in (list, tuple) and all(_plain(v) for v in obj)
    return obj is None or type(obj) in (str, int, float, bool)


def test_checkpoint_weights_only_and_resume(tmp_path, tok, tiny_gpt2):
    path = _demo_file(tmp_path, 8)
    # One batch = the whole set, so the data order cannot differ between runs.
    dm = DemonstrationsDataModule(path, val_source=path, batch_size=8).connect(tok)

    L.seed_everything(0, verbose=False)
    straight = SFTModule(tiny_gpt2(), lr=5e-3, warmup_steps=2)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_cb = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=3, save_top_k=-1)
    _trainer(
        tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[ckpt_cb], limit_val_batches=0
    ).fit(straight, datamodule=dm)
    mid = [p for p in os.listdir(ckpt_dir) if "step=3" in p]
    assert len(mid) == 1, os.listdir(ckpt_dir)
    mid = str(ckpt_dir / mid[0])

    ckpt = torch.load(mid, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert _plain(dict(hp)), hp
    assert hp["lr"] == 5e-3 and hp["warmup_steps"] == 2 and hp["betas"] == [0.9, 0.95]
    assert "model" not in hp and "optimizer" not in hp
    assert ckpt["global_step"] == 3

    restored = SFTModule.load_from_checkpoint(mid, model=tiny_gpt2(seed=123))
    assert restored.hparams.lr == 5e-3
    key = "model.transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(restored.state_dict()[key], ckpt["state_dict"][key])

    L.seed_everything(0, verbose=False)
    resumed = SFTModule(tiny_gpt2(seed=7), lr=5e-3, warmup_steps=2)
    trainer = _trainer(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(resumed, datamodule=dm, ckpt_path=mid)
    assert trainer.global_step == 6
    # Optimizer, scheduler and weights were restored: the result equals the straight run.
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


class _ExplodingModel(torch.nn.Module):
    """Writes a partial file, then fails, like a disk-full during save_pretrained."""

    def save_pretrained(self, path):
        with open(os.path.join(path, "model.safetensors"), "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")


def test_save_hf_folder_is_atomic(tmp_path, tok, tiny_gpt2):
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(_ExplodingModel(), tok, str(fresh))
    assert not fresh.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dirs left

    existing = tmp_path / "existing"
    save_hf_folder(tiny_gpt2(), tok, str(existing), info={"v": 1})
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(_ExplodingModel(), tok, str(existing))
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]

    # A successful save over an existing export replaces it and leaves nothing else behind.
    save_hf_folder(tiny_gpt2(seed=1), tok, str(existing), info={"v": 2})
    assert json.loads((existing / MARKER).read_text())["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert not is_complete_export(str(fresh)) and not is_complete_export(None)


def test_metrics_json_flat(tmp_path, tok, tiny_gpt2):
    path = _demo_file(tmp_path, 8)
    dm = DemonstrationsDataModule(path, val_fraction=0.25, batch_size=4).connect(tok)
    run_dir = tmp_path / "run"
    cb = MetricsJSONCallback(str(run_dir))
    _trainer(tmp_path, max_steps=3, callbacks=[cb], log_every_n_steps=1).fit(
        SFTModule(tiny_gpt2()), datamodule=dm
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train/loss", "val/loss", "val/ppl", "trainer/global_step"} <= set(metrics)
    assert metrics["trainer/global_step"] == 3.0
    for key, value in metrics.items():
        assert key.count("/") >= 1 and type(value) is float, (key, value)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    assert not (run_dir / "metrics.json.tmp").exists()


def test_update_metrics_json_merges_scalars_only(tmp_path):
    path = str(tmp_path / "m" / "metrics.json")
    update_metrics_json(path, {"a/x": 1, "a/y": torch.tensor(2.5)})
    merged = update_metrics_json(
        path,
        {"a/x": 3.0, "b/nan": float("nan"), "b/vec": torch.ones(2), "b/s": "text", "b/t": True},
    )
    assert merged == {"a/x": 3.0, "a/y": 2.5}
    assert json.loads(open(path).read()) == {"a/x": 3.0, "a/y": 2.5}


# -- LR schedules and module plumbing -----------------------------------------------------


def _naive_multiplier(step, total, schedule, warmup, min_ratio, start):
    if step < warmup:
        return start + (1 - start) * step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1 - (1 - min_ratio) * progress
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup", "start"), [(0, 0.0), (3, 0.0), (4, 0.1)])
def test_lr_multiplier_matches_naive(schedule, warmup, start):
    from lit_rlhf.ops.schedules import lr_multiplier

    total = 10
    for step in range(14):  # past the end keeps the final value
        got = lr_multiplier(step, total, schedule, warmup, 0.1, start)
        assert got == pytest.approx(_naive_multiplier(step, total, schedule, warmup, 0.1, start))
    if schedule == "cosine":
        assert lr_multiplier(total, total, schedule, warmup) == pytest.approx(0.1)
    if warmup:
        assert lr_multiplier(0, total, schedule, warmup, 0.1, start) == start
        assert lr_multiplier(warmup, total, schedule, warmup, 0.1, start) == pytest.approx(1.0)


def test_lr_multiplier_unknown_schedule():
    from lit_rlhf.ops.schedules import lr_multiplier

    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        lr_multiplier(0, 10, "step")


def test_sft_lr_follows_schedule(tmp_path, tok, tiny_gpt2):
    path = _demo_file(tmp_path, 8)
    dm = DemonstrationsDataModule(path, val_source=path, batch_size=4).connect(tok)
    module = SFTModule(tiny_gpt2(), lr=1e-2, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_steps=6, callbacks=[Record()], limit_val_batches=0).fit(
        module, datamodule=dm
    )
    expected = [1e-2 * _naive_multiplier(s, 6, "cosine", 2, 0.1, 0.0) for s in range(6)]
    assert seen == pytest.approx(expected)


def test_module_plumbing(tiny_gpt2):
    from functools import partial

    from lit_rlhf.modules.base import build_optimizer, freeze, materialize

    model = tiny_gpt2()
    assert materialize(model) is model
    built = materialize(lambda: model)
    assert built is model
    sgd = build_optimizer(model.parameters(), partial(torch.optim.SGD, lr=0.5), 1e-3, 0.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.5
    adamw = build_optimizer(model.parameters(), None, 1e-3, 0.01, betas=[0.8, 0.9])
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9)
    assert adamw.param_groups[0]["weight_decay"] == 0.01
    frozen = freeze(tiny_gpt2())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    # A factory is materialized by the module, and the optimizer factory is used.
    module = SFTModule(lambda: tiny_gpt2(), optimizer=partial(torch.optim.SGD, lr=0.1))
    assert isinstance(module.model, torch.nn.Module)
    assert "optimizer" not in module.hparams and "model" not in module.hparams
