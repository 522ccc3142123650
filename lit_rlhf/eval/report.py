"""The end-of-run report: a markdown file, PNG plots and a console table."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: no display here)

from lit_rlhf.stages.registry import STAGES  # noqa: E402

#: Policy -> its label (the stage registry's; the base policy is the pretrain stage's export).
NAMES = {
    p: STAGES["pretrain" if p == "base" else p].label for p in ("base", "sft", "ppo", "ppo_ptx")
}


def _policies(metrics: dict) -> list[str]:
    return [p for p in NAMES if f"eval/{p}/gold" in metrics]


def _fmt(metrics: dict, key: str, spec: str = ".3f") -> str:
    if key not in metrics:
        return "–"
    text = format(metrics[key], spec)
    # A rounding-noise -1e-9 (the SFT's KL to itself) must not print as "-0.00".
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def policy_table(metrics: dict) -> list[list[str]]:
    """Rows: policy, gold [95 % CI], win rate vs SFT, RM score, KL to SFT, LM loss, length."""
    rows = []
    for p in _policies(metrics):
        g = f"eval/{p}/gold"
        win = (
            f"{metrics[f'eval/{p}/win_rate_vs_sft']:.1%} [{metrics[f'eval/{p}/win_rate_lo']:.1%}, "
            f"{metrics[f'eval/{p}/win_rate_hi']:.1%}]"
            if f"eval/{p}/win_rate_vs_sft" in metrics
            else "–"
        )
        rows.append(
            [
                NAMES[p],
                f"{metrics[g]:.3f} [{metrics[g + '_lo']:.3f}, {metrics[g + '_hi']:.3f}]",
                win,
                _fmt(metrics, f"eval/{p}/rm_score"),
                _fmt(metrics, f"eval/{p}/kl_to_sft", ".2f"),
                _fmt(metrics, f"eval/{p}/lm_loss"),
                _fmt(metrics, f"eval/{p}/response_length", ".1f"),
            ]
        )
    return rows


SPLIT_NAMES = {
    "seen": "seen frames & aspects",
    "heldout_frames": "held-out frames",
    "heldout_aspects": "held-out aspects",
}
SPLIT_HEADER = ["policy", "split", "prompts", "gold score", "win rate vs SFT", "mentions aspect"]


def split_table(metrics: dict) -> list[list[str]]:
    """Rows: policy, split, prompts, gold, win rate vs SFT [95 % CI], aspect-mention share."""
    rows = []
    for p in _policies(metrics):
        for split, label in SPLIT_NAMES.items():
            if f"eval/{p}/gold_{split}" not in metrics:
                continue
            win = f"eval/{p}/win_rate_vs_sft_{split}"
            rows.append(
                [
                    NAMES[p],
                    label,
                    _fmt(metrics, f"eval/{p}/prompts_{split}", ".0f"),
                    _fmt(metrics, f"eval/{p}/gold_{split}"),
                    f"{metrics[win]:.1%} [{metrics[win + '_lo']:.1%}, {metrics[win + '_hi']:.1%}]"
                    if win in metrics
                    else "–",
                    _fmt(metrics, f"eval/{p}/aspect_mention_{split}", ".1%"),
                ]
            )
    return rows


HEADER = [
    "policy",
    "gold score [95% CI]",
    "win rate vs SFT (gold)",
    "RM score",
    "KL to SFT (nats)",
    "LM loss held-out text",
    "resp. length",
]


def plot_training(histories: dict[str, list[dict]], path: str) -> str | None:
    """Reward (RM and gold) and KL per rollout for each PPO run."""
    if not histories:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        x = range(1, len(hist) + 1)
        label = NAMES.get(name, name)
        axes[0].plot(
            x, [h.get("objective/scores", float("nan")) for h in hist], label=f"{label}: RM score"
        )
        if any("gold/train_score" in h for h in hist):
            axes[0].plot(
                x,
                [h.get("gold/train_score", float("nan")) for h in hist],
                "--",
                label=f"{label}: gold score",
            )
        axes[1].plot(x, [h.get("objective/kl", float("nan")) for h in hist], label=label)
    axes[0].set(title="reward of rollouts", xlabel="rollout", ylabel="score")
    axes[1].set(title="KL(policy || SFT) per response", xlabel="rollout", ylabel="nats")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gold_vs_kl(
    points: list[tuple[str, float, float, float, float]],
    path: str,
    title: str = "gold score vs KL to SFT",
) -> str:
    """Scatter of (label, kl, gold, gold_lo, gold_hi) points with CI error bars."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, kl, g, lo, hi in points:
        ax.errorbar([kl], [g], yerr=[[g - lo], [hi - g]], fmt="o", capsize=3, label=label)
    ax.set(
        title=title,
        xlabel="KL(policy || SFT), nats per response",
        ylabel="gold score (held-out prompts)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_warnings(exports: dict[str, str]) -> list[str]:
    """What the training-loop guard recorded in each export's ``metrics.json``, one line each.

    Args:
        exports: Name (``sft``, ``rm``, ...) -> export folder.

    Returns:
        Lines for exports that skipped non-finite steps or diverged (exported under
        ``guard.on_divergence=warn``); empty when every run was healthy.
    """
    lines = []
    for name, path in exports.items():
        try:
            with open(os.path.join(path, "metrics.json")) as fh:
                m = json.load(fh)
        except (OSError, ValueError):
            continue  # a user's folder from elsewhere has no guard record
        label = NAMES.get(name) or (STAGES[name].label if name in STAGES else name)
        skipped = int(m.get("guard/skipped_steps") or 0)
        if skipped:
            lines.append(f"{label}: {skipped} optimizer steps skipped (NaN/inf)")
        if m.get("guard/diverged"):
            lines.append(
                f"{label}: the training loss diverged; exported only because "
                "guard.on_divergence=warn"
            )
    return lines


def write_report(
    out_dir: str,
    metrics: dict,
    histories: dict,
    paths: dict,
    rm_path: str,
    warnings: list[str] | None = None,
) -> str:
    """Write ``report.md`` and its plots into ``out_dir``; returns the report path.

    ``warnings`` (from :func:`training_warnings`) open the report when there are any.
    """
    os.makedirs(out_dir, exist_ok=True)
    plot_training(histories, os.path.join(out_dir, "training_curves.png"))
    points = [
        (
            NAMES[p],
            metrics[f"eval/{p}/kl_to_sft"],
            metrics[f"eval/{p}/gold"],
            metrics[f"eval/{p}/gold_lo"],
            metrics[f"eval/{p}/gold_hi"],
        )
        for p in _policies(metrics)
    ]
    plot_gold_vs_kl(points, os.path.join(out_dir, "gold_vs_kl.png"))
    lines = [
        "# lit_rlhf report",
        "",
        "Policies sampled once per held-out prompt and judged by the gold function "
        "(which the reward model never saw).",
        "",
    ]
    if warnings:
        lines += ["## Warnings", "", *[f"- ⚠ {w}" for w in warnings], ""]
    lines += [
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in policy_table(metrics)]
    rows = split_table(metrics)
    if rows:
        lines += [
            "",
            "## Per split",
            "",
            "Seen: frame and aspect both occur in training prompts; held-out frames: sentence "
            "patterns no training prompt uses; held-out aspects: aspects no training prompt asks "
            "about (the two held-out splits overlap).",
            "",
            "| " + " | ".join(SPLIT_HEADER) + " |",
            "|" + "---|" * len(SPLIT_HEADER),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "## Reward model",
        "",
        "- held-out pairwise accuracy vs the labeler's ranks: "
        f"{_fmt(metrics, 'eval/rm/acc_labels')}",
        f"- held-out pairwise accuracy vs the gold ordering: {_fmt(metrics, 'eval/rm/acc_gold')}",
    ]
    if "eval/rm/acc_heldout_labeler" in metrics:
        lines += [
            "- agreement with a held-out simulated labeler (who ranked no training data): "
            f"{_fmt(metrics, 'eval/rm/acc_heldout_labeler')} (that labeler vs the training "
            f"labels: {_fmt(metrics, 'eval/rm/inter_labeler_agreement')}; InstructGPT: ~72 % "
            "and ~73 %)",
        ]
    lines += [f"- export: `{rm_path}`"]
    if "eval/ptx/regression_recovered" in metrics or "eval/ptx/gain_kept" in metrics:
        lines += [
            "",
            "## Alignment tax (PPO-ptx)",
            "",
            f"- share of PPO's held-out LM-loss regression recovered by ptx: "
            f"{_fmt(metrics, 'eval/ptx/regression_recovered', '.1%')}",
            "- share of PPO's gold gain over SFT kept by PPO-ptx: "
            f"{_fmt(metrics, 'eval/ptx/gain_kept', '.1%')}",
        ]
    lines += [
        "",
        "## Plots",
        "",
        "![training curves](training_curves.png)",
        "",
        "![gold vs KL](gold_vs_kl.png)",
        "",
        "## Exports",
        "",
    ]
    lines += [f"- {NAMES.get(k, k)}: `{v}`" for k, v in paths.items()]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def print_table(metrics: dict) -> None:
    """Print the policy table to the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lit_rlhf: held-out evaluation")
    for h in HEADER:
        table.add_column(h)
    for row in policy_table(metrics):
        table.add_row(*row)
    Console().print(table)
    rows = split_table(metrics)
    if rows:
        splits = Table(title="per split")
        for h in SPLIT_HEADER:
            splits.add_column(h)
        for row in rows:
            splits.add_row(*row)
        Console().print(splits)
    for key in (
        "eval/rm/acc_labels",
        "eval/rm/acc_gold",
        "eval/rm/acc_heldout_labeler",
        "eval/ptx/regression_recovered",
        "eval/ptx/gain_kept",
    ):
        if key in metrics:
            Console().print(f"{key}: {metrics[key]:.3f}")


def plot_sweep(rows: list[dict], x: str, y: str, proxy: str | None, path: str) -> str:
    """One point per sweep job: ``y`` (e.g. gold) and optionally ``proxy`` (RM score) vs ``x``."""
    rows = sorted(rows, key=lambda r: r["x"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["x"] for r in rows], [r["y"] for r in rows], "o-", color="C0", label=y)
    for r in rows:
        ax.annotate(
            r["label"], (r["x"], r["y"]), fontsize=7, textcoords="offset points", xytext=(4, 4)
        )
    ax.set(xlabel=x, ylabel=y, title="sweep: gold score vs KL (reward over-optimization)")
    ax.grid(alpha=0.3)
    if proxy and any(r.get("proxy") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot([r["x"] for r in rows], [r["proxy"] for r in rows], "s--", color="C1", label=proxy)
        ax2.set_ylabel(proxy)
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
