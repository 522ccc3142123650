"""Exports are complete or absent (marker file lists, damaged exports, stale tmp, locks), and
wrong kinds of model are refused."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from lit_rlhf.callbacks.hf_export import (
    MARKER,
    ExportError,
    atomic_output_dir,
    export_lock,
    export_problem,
    is_complete_export,
    save_hf_folder,
)
from lit_rlhf.models.loading import ModelLoadError, load_causal_lm
from lit_rlhf.stages.context import StageContext


def _ctx(tmp_path, built: list) -> StageContext:
    """A context whose only runner "builds" sft by writing a marked folder and counting."""
    cfg = {
        "seed": 0,
        "stage": {"name": "eval"},
        "model": {"name_or_path": None},
        "pretrain": {},
        "sft": {},
        "data": {"fields": {}},
        "paths": {"exports_dir": str(tmp_path / "exports"), "data_dir": str(tmp_path / "d")},
    }

    def build_sft(ctx, stage):
        built.append(stage)
        with atomic_output_dir(ctx.export_dir(stage), {"stage": stage}) as tmp:
            with open(os.path.join(tmp, "model.safetensors"), "wb") as fh:
                fh.write(b"x" * 1000)
        return ctx.export_dir(stage)

    return StageContext(
        cfg=cfg, run_dir=str(tmp_path), make_trainer=None, runners={"sft": build_sft}
    )


def test_marker_lists_every_file_with_its_size_and_extras_are_inside(tmp_path, tok, tiny_gpt2):
    out = tmp_path / "sft"
    save_hf_folder(tiny_gpt2(), tok, str(out), {"stage": "sft"}, extras=lambda: {"h.json": [1]})
    marker = json.loads((out / MARKER).read_text())
    assert marker["stage"] == "sft"
    assert marker["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert "h.json" in marker["files"] and json.loads((out / "h.json").read_text()) == [1]
    assert export_problem(str(out)) is None


def test_kill_during_export_leaves_no_complete_export(tmp_path, tok, tiny_gpt2):
    # A crash while the metrics/history are written (after the weights) must not leave a
    # folder with a marker: they are written inside the tmp folder, before the rename.
    def dies():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_hf_folder(tiny_gpt2(), tok, str(tmp_path / "sft"), {"stage": "sft"}, extras=dies)
    assert not is_complete_export(str(tmp_path / "sft"))
    assert os.listdir(tmp_path) == []


def test_truncated_weights_in_a_marked_export_are_rebuilt(tmp_path):
    built: list = []
    ctx = _ctx(tmp_path, built)
    path = ctx.require("sft")
    assert built == ["sft"] and ctx.require("sft") == path and built == ["sft"]  # reused
    with open(os.path.join(path, "model.safetensors"), "r+b") as fh:
        fh.truncate(10)
    assert "model.safetensors is 10 bytes, but 1,000 were written" in export_problem(path)
    assert ctx.require("sft") == path and built == ["sft", "sft"]  # rebuilt, not reused
    assert export_problem(path) is None


def test_damaged_user_given_export_is_one_clear_line(tmp_path):
    ctx = _ctx(tmp_path, [])
    path = ctx.require("sft")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ExportError, match=r"ppo.policy_path='.*' is damaged: model.safetensors"):
        ctx.require("sft", path, "ppo.policy_path")


def test_stale_tmp_folders_of_killed_runs_are_removed(tmp_path):
    ctx = _ctx(tmp_path, [])
    exports = tmp_path / "exports"
    stale = exports / f".sft-{ctx.fingerprint('sft')}.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    ctx.require("sft")
    assert not stale.exists()
    assert sorted(p.name for p in exports.iterdir() if not p.name.startswith(".")) == [
        f"sft-{ctx.fingerprint('sft')}"
    ]


def test_concurrent_runs_same_home_build_once(tmp_path):
    # Two runs that need the same export: the second waits for the first's lock, then
    # reuses its folder instead of training it again (flock: separate opens conflict, even
    # in one process).
    built: list = []
    slow = _ctx(tmp_path, built)
    inner = slow.runners["sft"]

    def slow_build(ctx, stage):
        time.sleep(1.0)
        return inner(ctx, stage)

    slow.runners["sft"] = slow_build
    other = _ctx(tmp_path, built)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("a", slow.require("sft")))
    first.start()
    time.sleep(0.3)
    results["b"] = other.require("sft")
    first.join()
    assert results["a"] == results["b"] and built == ["sft"]


def test_unwritable_exports_folder_is_one_line_before_training(tmp_path):
    # A regular file where the exports folder should be cannot hold folders, even for root
    # (a read-only mount behaves the same); the lock is taken before anything trains.
    blocked = tmp_path / "exports"
    blocked.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write to the exports folder"):
        with export_lock(str(blocked / "sft-x"), "sft"):
            pass


def test_exports_are_readable_by_other_users(tmp_path, tok, tiny_gpt2):
    old = os.umask(0o022)
    try:
        out = save_hf_folder(tiny_gpt2(), tok, str(tmp_path / "sft"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(out, "model.safetensors")).st_mode) == 0o644


def test_reward_model_folder_is_refused_as_a_causal_lm(tmp_path, tok, tiny_gpt2):
    from transformers import GPT2ForSequenceClassification

    model = tiny_gpt2()
    rm = GPT2ForSequenceClassification(
        model.config.__class__(**{**model.config.to_dict(), "num_labels": 1})
    )
    rm.save_pretrained(tmp_path / "rm")
    with pytest.raises(ModelLoadError, match="is a reward/value model .* not a causal LM"):
        load_causal_lm(str(tmp_path / "rm"))


def test_truncated_safetensors_without_marker_names_the_folder(tmp_path, tok, tiny_gpt2):
    tiny_gpt2().save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=str(tmp_path / "lm")):
        load_causal_lm(str(tmp_path / "lm"))


def test_reference_model_with_another_vocabulary_is_refused(tmp_path, tok, byte_tok):
    from lit_rlhf.stages.context import ConfigError
    from lit_rlhf.stages.ppo import check_same_vocabulary

    tok.save_pretrained(tmp_path / "same")
    byte_tok.save_pretrained(tmp_path / "other")
    paths = {"value model": str(tmp_path / "same"), "reward model": str(tmp_path / "same")}
    check_same_vocabulary(tok, "policy", paths)
    with pytest.raises(ConfigError, match=r"the policy \('policy'.*and the reference model"):
        check_same_vocabulary(tok, "policy", {**paths, "reference model": str(tmp_path / "other")})


def test_missing_truncated_or_misplaced_resume_from_is_one_line(tmp_path):
    from lit_rlhf.stages.context import ConfigError, MissingInputError

    ctx = _ctx(tmp_path, [])
    ctx.cfg["ppo"] = {"resume_from": "last"}
    with pytest.raises(MissingInputError, match="no checkpoint of this config was saved yet"):
        ctx.resume_path("ppo", "ppo")
    junk = tmp_path / "last.ckpt"
    junk.write_bytes(b"PK\x03\x04 cut short")
    ctx.cfg["sft"] = {"resume_from": str(junk)}
    with pytest.raises(ConfigError, match="is not a PyTorch checkpoint"):
        ctx.resume_path("sft", "sft")
    ctx.cfg["sft"] = {"resume_from": str(tmp_path / "nope.ckpt")}
    with pytest.raises(MissingInputError, match="no file at"):
        ctx.resume_path("sft", "sft")
    ctx.cfg["sft"] = {"resume_from": "last"}
    with pytest.raises(ConfigError, match="`last` finds PPO's periodic checkpoints"):
        ctx.resume_path("sft", "sft")
    ctx.cfg["sft"] = {"resume_from": None}
    assert ctx.resume_path("sft", "sft") is None
