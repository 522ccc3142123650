"""The benchmark report's arithmetic: speed-ups over TRL and the bare-PyTorch ceiling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402


def _run(framework: str, bench: str, step_s: float, rnd: int = 0) -> dict:
    r = {
        "framework": framework,
        "bench": bench,
        "size": "1m",
        "precision": "fp32",
        "round": rnd,
        "peak_rss_mib": 500.0,
        "rss_after_import_mib": 400.0,
        "rss_after_setup_mib": 410.0,
        "checks": {},
    }
    if bench == "ppo":
        r["iter_s"] = [step_s] * 3
        r["split_s"] = {p: [step_s / 4] * 3 for p in report.PHASES}
    else:
        r["step_s"] = [step_s] * 3
        r["tokens_per_s"] = 1024 / step_s
        r["flops_per_s"] = 1e9 / step_s
    return r


def _summary(runs: list[dict], benches: list[str]) -> dict:
    peaks = [{"fp32_gflops": 200.0, "bf16_gflops": 900.0}]
    return report.summarize(runs, peaks, ["1m"], benches, ["fp32"])


def test_ceiling_is_trl_over_bare_and_judged_against_the_target():
    runs = [
        _run("lit_rlhf", "ppo", 0.30),
        _run("trl", "ppo", 0.80),
        _run("bare", "ppo", 0.25),
        _run("lit_rlhf", "sft", 0.05),
        _run("trl", "sft", 0.06),
        _run("bare", "sft", 0.04),
    ]
    res = _summary(runs, ["ppo", "sft"])["results"]
    ppo, sft = res["ppo/1m/fp32"], res["sft/1m/fp32"]
    assert ppo["compare"]["speedup"] == pytest.approx(0.80 / 0.30)
    assert ppo["ceiling"]["max_speedup"] == pytest.approx(0.80 / 0.25)
    assert ppo["ceiling"]["ours_over_bare"] == pytest.approx(0.30 / 0.25)
    assert ppo["ceiling"]["target_reachable"]  # 3.2x >= 3.0x
    assert sft["ceiling"]["max_speedup"] == pytest.approx(0.06 / 0.04)
    assert not sft["ceiling"]["target_reachable"]  # 1.5x < 2.0x


def test_markdown_shows_the_ceiling_table_and_bare_rows():
    runs = [
        _run("lit_rlhf", "sft", 0.05),
        _run("trl", "sft", 0.06),
        _run("bare", "sft", 0.04),
    ]
    data = {
        "summary": _summary(runs, ["sft"]),
        "machine": {"cpu": "test", "cpus": 2},
        "settings": {"threads": 2},
        "quick": True,
        "rounds": 1,
        "total_s": 60.0,
        "created": "now",
    }
    md = report.markdown(data)
    assert "## Ceiling at equal arithmetic (bare PyTorch)" in md
    assert "| SFT | 1m | fp32 | 0.040 s/step | 1.25× | 1.50× | ≥ 2.0× | no |" in md
    assert "| 1m | fp32 | bare | 0.040 |" in md


def test_no_ceiling_without_a_bare_measurement():
    runs = [_run("lit_rlhf", "sft", 0.05), _run("trl", "sft", 0.06)]
    res = _summary(runs, ["sft"])["results"]["sft/1m/fp32"]
    assert "ceiling" not in res
    assert "compare" in res
