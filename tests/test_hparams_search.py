"""Optuna searches through Hydra's sweeper: the objective reaches the sweeper (``sweep`` extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_optimized_metric_is_read_from_the_run(tmp_path):
    from lit_rlhf.run import read_run_metric

    (tmp_path / "rm").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"eval/ppo/gold": 0.25}))
    (tmp_path / "rm" / "metrics.json").write_text(json.dumps({"val/acc": 0.75}))
    assert read_run_metric(str(tmp_path), "eval/ppo/gold") == 0.25
    assert read_run_metric(str(tmp_path), "val/acc") == 0.75  # a pipeline stage's folder
    with pytest.raises(SystemExit, match="val/nothing"):
        read_run_metric(str(tmp_path), "val/nothing")


@pytest.mark.slow
def test_rm_learning_rate_search_runs_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "LIT_RLHF_HOME": str(tmp_path)}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hparams_search=rm_lr",
        "debug=fast",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = {}
    for job in ("0", "1"):
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o.split("=", 1)[1] for o in overrides if o.startswith("rm.lr=")))
        assert 1e-5 <= lr <= 1e-2
        trials[lr] = json.loads((sweep / job / "metrics.json").read_text())["val/acc"]
    assert len(trials) == 2  # two different learning rates were tried
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # The sweeper saw each job's return value: its best is the better trial's val/acc.
    assert best["best_value"] == pytest.approx(max(trials.values()))
    assert best["best_params"]["rm.lr"] == pytest.approx(max(trials, key=trials.get))
