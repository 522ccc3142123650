"""Aggregate the per-process measurements of run_all.py into a summary and a markdown report."""

from __future__ import annotations

import math
import statistics

import common

#: Speed-up targets over TRL 1.0.0 (issue 8).
TARGETS = {
    ("ppo", "1m"): 3.0,
    ("ppo", "20m"): 1.3,
    ("ppo_ragged", "1m"): 3.0,
    ("ppo_ragged", "20m"): 1.3,
    ("sft", "1m"): 2.0,
    ("sft", "20m"): 1.3,
    ("rm", "1m"): 2.0,
    ("rm", "20m"): 1.3,
    ("rm_kwise", "1m"): 2.0,
    ("rm_kwise", "20m"): 1.3,
    ("sft_ragged", "1m"): 2.0,
    ("sft_ragged", "20m"): 1.3,
    ("rm_ragged", "1m"): 2.0,
    ("rm_ragged", "20m"): 1.3,
}
#: Every bench, in report order.
BENCH_ORDER = ["ppo", "ppo_ragged", "sft", "sft_ragged", "rm", "rm_ragged", "rm_kwise"]
#: The PPO benches (s/iter with a phase split; the others are training throughput).
PPO_BENCHES = ("ppo", "ppo_ragged")
#: Benches whose steps differ in work (K or lengths vary): compared by rate, not step time.
RATE_BENCHES = {"sft_ragged": "tokens_per_s", "rm_ragged": "pairs_per_s", "rm_kwise": "pairs_per_s"}
PHASES = ("generation", "scoring", "optimization", "other")
#: Every side a measurement can come from; "bare" is bench_bare.py's plain-PyTorch floor.
FRAMEWORKS = ("lit_rlhf", "trl", "bare")


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _side(runs: list[dict], bench: str, size: str, peaks: dict) -> dict:
    """Pool the steady iterations of every round of one framework."""
    key = "iter_s" if bench in PPO_BENCHES else "step_s"
    times = [t for r in runs for t in r[key]]
    med = _med(times)
    if bench == "ppo":
        flops_per_s = common.ppo_iteration_flops(size)["total"] / med
    elif bench == "ppo_ragged":  # sampled lengths vary per iteration: not counted
        flops_per_s = float("nan")
    else:  # each measurement counted the useful FLOPs of the sequences it trained on
        flops_per_s = _med([r["flops_per_s"] for r in runs])
    out = {
        "rounds": len(runs),
        "median_s": med,
        "per_round_median_s": [_med(r[key]) for r in runs],
        "n_timed": len(times),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_after_import_mib": _med([r["rss_after_import_mib"] for r in runs]),
        "rss_after_setup_mib": _med([r["rss_after_setup_mib"] for r in runs]),
        "gflops": flops_per_s / 1e9,
        "share_fp32_peak": flops_per_s / 1e9 / peaks["fp32"],
        "share_bf16_peak": flops_per_s / 1e9 / peaks["bf16"],
        "max_loadavg": max(max(r.get("loadavg_start", 0), r.get("loadavg_end", 0)) for r in runs),
        "max_others_cores": max(r.get("others_cores", float("nan")) for r in runs),
        "contended_rounds": sum(bool(r.get("contended")) for r in runs),
        "checks": runs[-1].get("checks", {}),
    }
    gc_s = [
        r["checks"]["gc_collect_s_per_iter"]
        for r in runs
        if "gc_collect_s_per_iter" in r.get("checks", {})
    ]
    if gc_s:
        out["gc_collect_s_per_iter"] = _med(gc_s)
    if bench in PPO_BENCHES:
        out["response_len_mean"] = _med(
            [x for r in runs for x in r.get("checks", {}).get("response_len_mean", [])]
        )
        out["split_median_s"] = {
            p: _med([t for r in runs for t in r["split_s"][p]]) for p in PHASES
        }
        per_phase = common.ppo_iteration_flops(size)
        out["phase_gflops"] = {
            p: per_phase[p] / out["split_median_s"][p] / 1e9
            for p in ("generation", "scoring", "optimization")
        }
    elif bench.startswith("sft"):
        out["tokens_per_s"] = _med([r["tokens_per_s"] for r in runs])
        out["per_round_rate"] = [r["tokens_per_s"] for r in runs]
    else:
        out["pairs_per_s"] = _med([r["pairs_per_s"] for r in runs])
        out["per_round_rate"] = [r["pairs_per_s"] for r in runs]
        out["seqs_per_s"] = _med([r["seqs_per_s"] for r in runs])
    return out


def summarize(
    runs: list[dict], peak_runs: list[dict], sizes, benches, precisions=("fp32",)
) -> dict:
    good_peaks = [p for p in peak_runs if "error" not in p]
    peaks = {
        "fp32": max((p["fp32_gflops"] for p in good_peaks), default=float("nan")),
        "bf16": max((p["bf16_gflops"] for p in good_peaks), default=float("nan")),
    }
    out = {"peak_gflops": peaks, "results": {}, "failed": []}
    for bench, size, prec in ((b, s, p) for b in benches for s in sizes for p in precisions):
        entry = {}
        for fw in FRAMEWORKS:
            mine = [
                r
                for r in runs
                if r["bench"] == bench
                and r["size"] == size
                and r["framework"] == fw
                and r.get("precision", "fp32") == prec
            ]
            ok = [r for r in mine if "error" not in r]
            out["failed"] += [
                f"{bench}/{size}/{prec}/{fw}/r{r['round']}" for r in mine if "error" in r
            ]
            if ok:
                entry[fw] = _side(ok, bench, size, peaks)
        if "lit_rlhf" in entry and "trl" in entry:
            ours, theirs = entry["lit_rlhf"], entry["trl"]
            if bench in RATE_BENCHES:
                rate = RATE_BENCHES[bench]
                speedup = ours[rate] / theirs[rate]
                rounds = [o / t for o, t in zip(ours["per_round_rate"], theirs["per_round_rate"])]
            else:
                speedup = theirs["median_s"] / ours["median_s"]
                rounds = [
                    t / o for o, t in zip(ours["per_round_median_s"], theirs["per_round_median_s"])
                ]
            rss_ratio = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
            target = TARGETS[(bench, size)]
            entry["compare"] = {
                "speedup": speedup,
                "per_round_speedup": rounds,
                "rss_ratio": rss_ratio,
                "target_speedup": target,
                "speed_target_met": speedup >= target,
                "rss_target_met": rss_ratio <= 1.0 if bench in PPO_BENCHES else None,
            }
        if "bare" in entry and "trl" in entry:
            floor, theirs = entry["bare"]["median_s"], entry["trl"]["median_s"]
            entry["ceiling"] = {
                "bare_s": floor,
                "ours_over_bare": entry["lit_rlhf"]["median_s"] / floor
                if "lit_rlhf" in entry
                else float("nan"),
                "max_speedup": theirs / floor,
                "target_reachable": theirs / floor >= TARGETS[(bench, size)],
            }
        out["results"][f"{bench}/{size}/{prec}"] = entry
    return out


def _ceiling_lines(res: dict) -> list[str]:
    """The bare-PyTorch table: what the model code alone costs, and what that leaves."""
    rows = [(k, e["ceiling"]) for k, e in res.items() if "ceiling" in e]
    if not rows:
        return []
    lines = [
        "",
        "## Ceiling at equal arithmetic (bare PyTorch)",
        "",
        "`bench_bare.py` does the same model work (same models, batches, optimizer, precision) "
        "in a plain loop over pre-tokenized batches: no framework, no logging, no data "
        "loader. Its time is what the shared HF model code costs here, so TRL / bare is the "
        "largest speed-up over TRL that any kit can show without doing less arithmetic, and "
        "lit_rlhf / bare is our own overhead.",
        "",
        "| bench | size | precision | bare PyTorch | lit_rlhf / bare | TRL / bare = largest "
        "reachable speed-up | target | reachable? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, c in rows:
        bench, size, prec = key.split("/")
        unit = "s/iter" if bench in PPO_BENCHES else "s/step"
        target = TARGETS[(bench, size)]
        lines.append(
            f"| {bench.upper()} | {size} | {prec} | {c['bare_s']:.3f} {unit} | "
            f"{c['ours_over_bare']:.2f}× | {c['max_speedup']:.2f}× | ≥ {target}× | "
            f"{'yes' if c['target_reachable'] else 'no'} |"
        )
    return lines


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(data: dict) -> str:
    s = data["summary"]
    pk = s["peak_gflops"]
    m = data["machine"]
    lines = [
        "# lit_rlhf vs TRL 1.0.0 — speed benchmarks",
        "",
        f"{data['created']} · {m.get('cpu', '?')} · {m.get('cpus')} CPUs · "
        f"{data['settings']['threads']} torch threads · "
        f"{'quick' if data['quick'] else 'full'} run, {data['rounds']} alternating round(s) · "
        f"{data['total_s'] / 60:.1f} min",
        "",
        f"Measured matmul peak (same run): **fp32 {pk['fp32']:.0f} GFLOP/s**, "
        f"**bf16 {pk['bf16']:.0f} GFLOP/s**. Each comparison runs both frameworks in the "
        "same precision: fp32, or bf16 = bf16 autocast with fp32 weights (Lightning "
        "`precision=bf16-mixed`; TRL `bf16=True`, its configs' default).",
        "",
        "## Summary (speed-up = TRL time / lit_rlhf time, same work)",
        "",
        "| bench | size | precision | lit_rlhf | TRL 1.0.0 | speed-up | target | per round | "
        "peak RSS ours / TRL (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    res = s["results"]
    for key, entry in res.items():
        bench, size, prec = key.split("/")
        if "compare" not in entry:
            continue
        c, o, t = entry["compare"], entry["lit_rlhf"], entry["trl"]
        if bench in PPO_BENCHES:
            ov, tv = f"{o['median_s']:.3f} s/iter", f"{t['median_s']:.3f} s/iter"
        elif bench.startswith("sft"):
            ov, tv = f"{o['tokens_per_s']:.0f} tok/s", f"{t['tokens_per_s']:.0f} tok/s"
        else:
            ov, tv = f"{o['pairs_per_s']:.1f} pairs/s", f"{t['pairs_per_s']:.1f} pairs/s"
        met = "✅" if c["speed_target_met"] else "❌"
        rounds = ", ".join(f"{x:.2f}×" for x in c["per_round_speedup"])
        rss = f"{o['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f}"
        if c["rss_target_met"] is not None:
            rss += " ✅" if c["rss_target_met"] else " ❌"
        lines.append(
            f"| {bench.upper()} | {size} | {prec} | {ov} | {tv} | **{c['speedup']:.2f}×** | "
            f"≥ {c['target_speedup']}× {met} | {rounds} | {rss} |"
        )
    lines += [
        "",
        "## PPO iteration (median seconds; batch 16 prompts × 16 tokens, responses of 24 "
        "tokens (PPO_RAGGED: up to 24, ending at a sampled EOS), 4 PPO epochs, 1 minibatch)",
        "",
        "| bench | size | precision | framework | total | generation | scoring | optimization | "
        "other | mean response | GFLOP/s | % fp32 peak | % bf16 peak | peak RSS MiB | "
        "RSS after imports |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in res.items():
        bench, size, prec = key.split("/")
        if bench not in PPO_BENCHES:
            continue
        for fw in FRAMEWORKS:
            if fw not in entry:
                continue
            e = entry[fw]
            sp = e["split_median_s"]
            lines.append(
                f"| {bench.upper()} | {size} | {prec} | {fw} | {e['median_s']:.3f} | "
                f"{sp['generation']:.3f} | "
                f"{sp['scoring']:.3f} | {sp['optimization']:.3f} | {sp['other']:.3f} | "
                f"{_f(e['response_len_mean'], '{:.1f}')} | "
                f"{_f(e['gflops'], '{:.1f}')} | {_f(100 * e['share_fp32_peak'], '{:.1f}')} | "
                f"{_f(100 * e['share_bf16_peak'], '{:.1f}')} | {e['peak_rss_mib']:.0f} | "
                f"{e['rss_after_import_mib']:.0f} |"
            )
    for bench in (b for b in BENCH_ORDER if b not in PPO_BENCHES):
        unit = "tokens/s" if bench.startswith("sft") else "pairs/s"
        if not any(k.startswith(bench + "/") and e for k, e in res.items()):
            continue
        lines += [
            "",
            f"## {bench.upper()} training throughput",
            "",
            f"| size | precision | framework | s/step | {unit} | GFLOP/s | % fp32 peak | "
            "% bf16 peak | peak RSS MiB | RSS after imports |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, entry in res.items():
            if not key.startswith(bench + "/"):
                continue
            for fw in FRAMEWORKS:
                if fw not in entry:
                    continue
                e = entry[fw]
                rate = e["tokens_per_s"] if bench.startswith("sft") else e["pairs_per_s"]
                lines.append(
                    f"| {key.split('/', 1)[1].replace('/', ' | ')} | {fw} | "
                    f"{e['median_s']:.3f} | {rate:.1f} | "
                    f"{e['gflops']:.1f} | {100 * e['share_fp32_peak']:.1f} | "
                    f"{100 * e['share_bf16_peak']:.1f} | {e['peak_rss_mib']:.0f} | "
                    f"{e['rss_after_import_mib']:.0f} |"
                )
    others = [e[fw]["max_others_cores"] for e in res.values() for fw in FRAMEWORKS if fw in e]
    contended = sum(e[fw]["contended_rounds"] for e in res.values() for fw in FRAMEWORKS if fw in e)
    lines += _ceiling_lines(res)
    lines += [
        "",
        "## Notes",
        "",
        "- Times are medians over the timed iterations of all rounds (warm-up iterations "
        "dropped); one iteration/step = from the end of the previous one to its own end, "
        "so every per-step cost of each framework is included.",
        "- FLOP/s counts the same useful model FLOPs for both frameworks (README, "
        '"FLOP accounting"), from the lengths of the sequences each step trained on; a '
        "framework doing redundant work (padding, repeated forwards) shows a lower share "
        "(RM_KWISE: the FLOPs of the forwards/backwards each framework runs).",
        "- Peak RSS is `ru_maxrss` of each measurement's own process (imports included; "
        "the after-imports column shows the framework's import footprint).",
        f"- Other processes kept at most {max(others, default=float('nan')):.2f} CPU cores busy "
        f"during a kept measurement; {contended} kept measurement(s) were still contended "
        "after retries. With 2 torch threads on 2 cores any other busy process slows "
        "iterations by 2-50x; run-to-run spread on a quiet machine is about +-10 %.",
    ]
    kw = [e for k, e in res.items() if k.startswith("rm_kwise/") and "compare" in e]
    if kw:
        k = common.RM_KWISE
        lines.append(
            f"- RM_KWISE: InstructGPT's comparison format, K = {k['k_min']}..{k['k_max']} ranked "
            "responses per prompt. lit_rlhf trains on the K-wise records (one forward per "
            f"response, all C(K, 2) pairs of a prompt in one batch element, "
            f"{k['prompts_per_batch']} prompts per step); TRL's RewardTrainer takes the same "
            "pairs expanded (two forwards per pair). Both see the same pairs with the same "
            "per-pair loss; responses per second are about equal ("
            + ", ".join(
                f"{e['lit_rlhf']['seqs_per_s']:.1f} vs {e['trl']['seqs_per_s']:.1f}" for e in kw
            )
            + "), so the speed-up is the (K - 1) / 2 pairs each forward serves."
        )
    if any(k.split("/")[0] in ("sft_ragged", "rm_ragged") for k in res):
        lines.append(
            "- SFT_RAGGED / RM_RAGGED: the same prompts and batch sizes as SFT / RM, responses "
            "of uniformly random length (sequences of 18..64 tokens). TRL's collators pad each "
            "batch to its longest sequence (its defaults: `padding_free=False`, no packing); "
            "lit_rlhf packs each batch's sequences into rows as wide as its longest, or twice "
            "that when it saves >= 10 % (`padding_free`, its default). Rates count real "
            "tokens / pairs only; each framework shuffles its own way, so batches differ "
            "(hence rates, not step times)."
        )
    if any(k.startswith("ppo_ragged/") for k in res):
        lines.append(
            "- PPO_RAGGED: the PPO settings with a policy whose responses end at a sampled EOS "
            "(about 1/12 per token, so 1..24 tokens); both kits stop at EOS, TRL runs its "
            "forwards on the padded width, lit_rlhf packs them where that is cheaper. Learning "
            f"rate {common.RAGGED_PPO_LR:g} on both sides, so both keep sampling from the same "
            "length distribution (at PPO's learning rate the updates shorten responses at a "
            "different pace in each kit); every forward, backward and optimizer step still "
            'runs. The "mean response" column shows the lengths each side timed.'
        )
    gcs = {
        k: e["trl"]["gc_collect_s_per_iter"]
        for k, e in res.items()
        if "trl" in e and "gc_collect_s_per_iter" in e["trl"]
    }
    if gcs:
        lines.append(
            "- TRL's PPO calls `gc.collect()` twice per iteration: "
            + ", ".join(
                f"{v:.3f} s/iter at {k.split('/', 1)[1].replace('/', ' ')}" for k, v in gcs.items()
            )
            + " (inside its scoring and other columns)."
        )
    if pk["bf16"] < pk["fp32"]:
        lines.append(
            f"- bf16 matmuls run at only {pk['bf16']:.1f} GFLOP/s here, below fp32: this CPU "
            "has no bf16 matrix units and torch falls back to a slow path, so the "
            '"% bf16 peak" columns exceed 100 % and mean nothing on this machine.'
        )
    if s["failed"]:
        lines.append(f"- Failed measurements: {', '.join(s['failed'])} (see latest.json).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    src = Path(sys.argv[1] if len(sys.argv) > 1 else common.RESULTS_DIR / "latest.json")
    data = json.loads(src.read_text())
    data["summary"] = summarize(
        data["runs"],
        data["peaks"],
        list(data["settings"]["sizes"]),
        sorted({r["bench"] for r in data["runs"]}, key=BENCH_ORDER.index),
        data["settings"].get("precisions", ["fp32"]),
    )
    src.with_suffix(".md").write_text(markdown(data))
    print(f"rewrote {src.with_suffix('.md')}")
