"""The stage registry is the one declaration of the stage graph; everything else agrees."""

from __future__ import annotations

from pathlib import Path

from lit_rlhf.run import runners
from lit_rlhf.stages import checks, context
from lit_rlhf.stages.registry import STAGES, pipeline_stages

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_every_stage_has_a_runner_and_a_conf_file():
    table = runners()
    assert set(table) == set(STAGES)
    for name, spec in STAGES.items():
        assert callable(table[name]) and table[name] is spec.load_runner()
        # ppo_ptx is `stage=ppo ppo.ptx.enabled=true`; every other stage is selectable.
        if name != "ppo_ptx":
            assert (CONF / "stage" / f"{name}.yaml").is_file(), name
        for section in spec.settings:
            assert section == "model" or (CONF / section / "default.yaml").is_file(), section


def test_upstream_stages_come_first_in_pipeline_order():
    order = pipeline_stages()
    assert "pipeline" not in order and order[-1] == "eval"
    for name in order:
        for up in STAGES[name].upstream:
            assert STAGES[up].exports and order.index(up) < order.index(name), (up, name)


def test_the_graph_views_are_read_from_the_registry():
    exporting = [n for n, s in STAGES.items() if s.exports]
    assert list(context.UPSTREAM) == list(context.STAGE_SETTINGS) == exporting
    assert context.TRAINED_STAGES == ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
    assert set(context.RUN_LENGTH) == set(context.TRAINED_STAGES)
    assert checks.SECTIONS == {n: s.checks for n, s in STAGES.items() if s.checks}
    # Every trained stage is guarded and names its own learning-rate key.
    assert all(STAGES[n].lr_setting and "guard" in STAGES[n].checks for n in context.RUN_LENGTH)
