"""Summaries of a recipe run on several seeds: a per-seed table, mean ± sd, min, and a plot.

Results of learning code are distributions. ``python train.py -m experiment=seeds`` runs the
whole recipe once per seed (every stage's RNG changes; the embedded world stays fixed), and
:func:`write_seeds_summary` turns the jobs' ``metrics.json`` files into
``seeds_summary.{md,json,png}``, checking each target on every seed, not on the average.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from lit_rlhf.eval.report import plt


@dataclass(frozen=True)
class Target:
    """A metric the recipe should reach on every seed.

    Attributes:
        key: The ``metrics.json`` key.
        label: Short name for tables and plots.
        bound: The threshold.
        at_least: True for ``value >= bound``, False for ``value <= bound``.
    """

    key: str
    label: str
    bound: float
    at_least: bool = True

    def met(self, value: float | None) -> bool:
        """Whether ``value`` satisfies the target (a missing or NaN value does not)."""
        if value is None or math.isnan(value):
            return False
        return value >= self.bound if self.at_least else value <= self.bound

    def describe(self) -> str:
        """``≥ 0.85``-style text of the bound."""
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}"


#: The robust-recipe targets (RM, PPO, PPO-ptx), each checked on every seed.
TARGETS: tuple[Target, ...] = (
    Target("eval/rm/acc_gold", "RM acc vs gold", 0.85),
    Target("eval/ppo/win_rate_vs_sft", "PPO win rate", 0.85),
    Target("eval/ppo/win_rate_vs_sft_heldout_frames", "PPO win, held-out frames", 0.80),
    Target("eval/ppo/kl_to_sft", "PPO KL to SFT", 10.0, at_least=False),
    Target("eval/ptx/gain_kept", "PPO-ptx gain kept", 0.90),
    Target("eval/ptx/regression_recovered", "PPO-ptx regression recovered", 0.50),
)

#: Further metrics shown per seed (no target).
EXTRA: tuple[tuple[str, str], ...] = (
    ("eval/rm/acc_labels", "RM acc vs labels"),
    ("eval/rm/acc_heldout_labeler", "RM vs held-out labeler"),
    ("eval/sft/gold", "SFT gold"),
    ("eval/ppo/gold", "PPO gold"),
    ("eval/ppo_ptx/gold", "PPO-ptx gold"),
    ("eval/ppo/win_rate_vs_sft_heldout_aspects", "PPO win, held-out aspects"),
    ("eval/ppo_ptx/win_rate_vs_sft", "PPO-ptx win rate"),
    ("eval/ppo/aspect_mention", "PPO mentions aspect"),
    ("pipeline/seconds_total", "seconds this run (reused stages ~0)"),
)


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def summarize_seeds(jobs: list[tuple[str, dict]]) -> dict:
    """Per-metric statistics and per-target verdicts over ``(seed label, metrics)`` jobs."""
    keys = [(t.key, t.label) for t in TARGETS] + list(EXTRA)
    stats = {}
    for key, _ in keys:
        values = [m[key] for _, m in jobs if key in m and not math.isnan(m[key])]
        if values:
            stats[key] = _stats(values)
    verdicts = {
        t.key: {
            "bound": t.describe(),
            "met_on": sum(t.met(m.get(t.key)) for _, m in jobs),
            "of": len(jobs),
        }
        for t in TARGETS
    }
    per_seed = [{"seed": seed, **{k: m[k] for k, _ in keys if k in m}} for seed, m in jobs]
    return {"per_seed": per_seed, "stats": stats, "targets": verdicts}


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key.startswith("pipeline/seconds"):
        return f"{value:.0f}"
    if "win_rate" in key or "mention" in key or "gain_kept" in key or "recovered" in key:
        return f"{value:.1%}"
    return f"{value:.3f}"


def seeds_markdown(summary: dict, command: str, commit: str | None) -> str:
    """The summary as markdown: targets table (every seed), then every metric per seed.

    Both ends of each metric's range are shown: for a ``≤`` target (KL) the worst seed is the
    max.
    """
    seeds = [row["seed"] for row in summary["per_seed"]]
    lines = [
        "# Seeds summary",
        "",
        f"Command: `{command}`" + (f" at commit `{commit}`" if commit else ""),
        f"Seeds: {', '.join(str(s) for s in seeds)} (every stage's RNG; the world is fixed).",
        "",
        "| metric | target | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | min "
        "| max | met on |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    rows = [(t.key, t.label, t) for t in TARGETS] + [(k, lab, None) for k, lab in EXTRA]
    for key, label, target in rows:
        if key not in summary["stats"]:
            continue
        st = summary["stats"][key]
        vals = [_cell(key, row.get(key)) for row in summary["per_seed"]]
        verdict = "–"
        if target is not None:
            v = summary["targets"][key]
            verdict = f"{v['met_on']}/{v['of']} {'✅' if v['met_on'] == v['of'] else '❌'}"
        lines.append(
            f"| {label} | {target.describe() if target else ''} | "
            + " | ".join(vals)
            + f" | {_cell(key, st['mean'])} ± {_cell(key, st['sd'])} | {_cell(key, st['min'])}"
            f" | {_cell(key, st['max'])} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def plot_seeds(summary: dict, path: str) -> str:
    """One panel per target: each seed's value as a dot, the mean as a bar, the bound dashed."""
    targets = [t for t in TARGETS if t.key in summary["stats"]]
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(2.3 * max(1, len(targets)), 3.4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, t in zip(axes, targets):
        vals = [row[t.key] for row in summary["per_seed"] if t.key in row]
        ax.bar([0], [summary["stats"][t.key]["mean"]], color="C0", alpha=0.3, width=0.6)
        ax.scatter([0] * len(vals), vals, color=["C2" if t.met(v) else "C3" for v in vals])
        ax.axhline(t.bound, ls="--", color="grey")
        ax.set(title=f"{t.label}\n{t.describe()}", xticks=[])
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_seeds_summary(
    jobs: list[tuple[str, dict]], out_dir: str, command: str, commit: str | None = None
) -> dict:
    """Write ``seeds_summary.{json,md,png}`` into ``out_dir``; returns the summary."""
    if not jobs:
        raise ValueError("no finished job to summarize")
    summary = summarize_seeds(jobs)
    summary["command"], summary["commit"] = command, commit
    with open(os.path.join(out_dir, "seeds_summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(out_dir, "seeds_summary.md"), "w", encoding="utf-8") as fh:
        fh.write(seeds_markdown(summary, command, commit))
    plot_seeds(summary, os.path.join(out_dir, "seeds_summary.png"))
    return summary


def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when files changed), or None outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
