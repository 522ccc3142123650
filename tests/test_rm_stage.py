"""The ``rm`` stage runner: user comparisons, the label stage's files, missing inputs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from test_reward_model import (
    DEMOS,
    SMALL,
    classifier,
    plain_demo_scores,
    synthetic_records,
    write_jsonl,
)
from test_sft import _trainer as bare_trainer
from transformers import AutoModelForSequenceClassification

from lit_rlhf.callbacks.hf_export import MARKER, atomic_output_dir, is_complete_export
from lit_rlhf.models.heads import BIAS_ATTR, MLPScoreHead, install_score_head, score_head
from lit_rlhf.models.loading import load_sequence_classifier
from lit_rlhf.models.tiny import build_tiny_causal_lm
from lit_rlhf.stages.context import ConfigError, MissingInputError, StageContext
from lit_rlhf.stages.rm import comparison_sources, run_rm, warn_if_near_chance


def make_ctx(tmp_path, tok, data, **rm):
    sft = tmp_path / "sft"
    build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL).save_pretrained(sft)
    tok.save_pretrained(sft)
    rcfg = dict(
        init_from=str(sft),
        max_length=48,
        batch_size=8,
        eval_batch_size=None,
        max_epochs=2,
        lr=3e-3,
        weight_decay=0.0,
        schedule="cosine",
        warmup_steps=0,
        min_lr_ratio=0.1,
        margin=0.0,
        dropout=0.0,
        val_fraction=0.1,
        bias_samples=None,
        limit=None,
        export_dir=None,
        resume_from=None,
    )
    rcfg.update(rm)
    cfg = {
        "seed": 0,
        "stage": {"name": "rm"},
        "model": {"dtype": "float32", "name_or_path": None},
        "data": {"fields": {}, **data},
        "rm": rcfg,
        "paths": {"exports_dir": str(tmp_path / "exports"), "data_dir": str(tmp_path / "data")},
    }

    def make_trainer(stage_dir, stage_cfg, callbacks):
        return bare_trainer(stage_dir, max_epochs=stage_cfg["max_epochs"], callbacks=callbacks)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return StageContext(cfg=cfg, run_dir=str(run_dir), make_trainer=make_trainer)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_run_rm_on_user_comparisons_exports_a_centred_reward_model(tmp_path, tok, head):
    val_recs = synthetic_records(12, 1)
    for r in val_recs:
        r["gold"] = [float(-x) for x in r["ranks"]]
    demos = [{"prompt": p, "completion": c} for p, c in DEMOS]
    data = {
        "comparisons": write_jsonl(tmp_path / "c.jsonl", synthetic_records(48, 0)),
        "comparisons_val": write_jsonl(tmp_path / "v.jsonl", val_recs),
        "demonstrations": write_jsonl(tmp_path / "d.jsonl", demos),
    }
    ctx = make_ctx(tmp_path, tok, data, head=head, head_hidden=16)
    out = run_rm(ctx)
    assert out == ctx.export_dir("rm") and is_complete_export(out)
    assert out.startswith(str(tmp_path / "exports" / "rm-"))
    stage_metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    export_metrics = json.load(open(f"{out}/metrics.json"))
    for key in (
        "val/acc",
        "val/loss",
        "val/acc_gold",
        "val/acc_labels",
        "rm/bias",
        "rm/seconds",
        "rm/pairs_train",
    ):
        assert key in stage_metrics and key in export_metrics, key
    assert stage_metrics["val/acc_labels"] == stage_metrics["val/acc"] > 0.7
    assert json.load(open(f"{out}/{MARKER}"))["bias"] == pytest.approx(stage_metrics["rm/bias"])
    # PPO's view: the demonstrations score mean 0. A linear head loads in plain transformers;
    # an MLP head is rebuilt by the kit's loader (plain transformers would make a random one).
    if head == "linear":
        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    else:
        plain = load_sequence_classifier(out, "float32", 0.0, tok).eval()
        assert isinstance(score_head(plain), MLPScoreHead)
    scores = plain_demo_scores(plain, tok, [d[0] for d in DEMOS], [d[1] for d in DEMOS])
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert plain.config.num_labels == 1


def test_run_rm_reads_label_stage_files(tmp_path, tok):
    demos = [{"prompt": p, "completion": c} for p, c in DEMOS]
    ctx = make_ctx(
        tmp_path,
        tok,
        {"comparisons": None, "demonstrations": write_jsonl(tmp_path / "d.jsonl", demos)},
        max_epochs=1,
        bias_samples=0,
        export_dir=str(tmp_path / "my_rm"),
    )
    label_dir = ctx.export_dir("label")
    with atomic_output_dir(label_dir, {"stage": "label"}) as tmp:
        write_jsonl(Path(tmp) / "comparisons_train.jsonl", synthetic_records(16, 0))
        write_jsonl(Path(tmp) / "comparisons_val.jsonl", synthetic_records(4, 1))
    assert comparison_sources(ctx) == (
        f"{label_dir}/comparisons_train.jsonl",
        f"{label_dir}/comparisons_val.jsonl",
    )
    out = run_rm(ctx)
    assert out == str(tmp_path / "my_rm")
    loaded = load_sequence_classifier(out, "float32", 0.0, tok)
    assert getattr(loaded.config, BIAS_ATTR, 0.0) in (0.0, None)


def test_run_rm_missing_init_from_names_the_override(tmp_path, tok):
    ctx = make_ctx(tmp_path, tok, {"comparisons": "x.jsonl"}, init_from=str(tmp_path / "nope"))
    with pytest.raises(MissingInputError, match="rm.init_from"):
        run_rm(ctx)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"head": "attention"}, "rm.head='attention'"), ({"head_hidden": 0}, "rm.head_hidden")],
)
def test_bad_head_settings_stop_before_loading(tmp_path, tok, override, message):
    ctx = make_ctx(tmp_path, tok, {"comparisons": None}, **override)
    with pytest.raises(ConfigError, match=message):
        run_rm(ctx)


def test_a_near_chance_rm_is_reported_not_passed_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="lit_rlhf"):
        assert not warn_if_near_chance(0.79)
        assert not warn_if_near_chance(None)  # no validation set: nothing to judge
        assert caplog.text == ""
        assert warn_if_near_chance(0.516)
    assert "near chance" in caplog.text and "rm.lr" in caplog.text


def test_feature_diagnostic_sees_a_collapsed_backbone(tmp_path, tok):
    """benchmarks/rm_features.py: alive features spread; a constant last state does not."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from rm_features import describe

    model = classifier(tok)
    install_score_head(model, "mlp", 16)
    alive, dead = tmp_path / "alive", tmp_path / "dead"
    model.save_pretrained(alive)
    tok.save_pretrained(alive)
    with torch.no_grad():  # the final norm's output no longer depends on the input
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn_like(model.transformer.ln_f.bias))
    model.save_pretrained(dead)
    tok.save_pretrained(dead)
    records = synthetic_records(8, 0)
    ok, collapsed = describe(str(alive), records, 48), describe(str(dead), records, 48)
    assert ok["feature sd"] > 0.1 and ok["units ever on"] > ok["units on"]
    assert collapsed["feature sd"] < 1e-5 and collapsed["score sd"] < 1e-5
    assert collapsed["units ever on"] == collapsed["units on"]
