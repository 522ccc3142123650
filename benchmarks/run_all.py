"""Run every speed benchmark, lit_rlhf against TRL 1.0.0, and write results/latest.{json,md}.

    python benchmarks/run_all.py            # both sizes, 2 alternating rounds (~25 min)
    python benchmarks/run_all.py --quick    # 1 round, few iterations (~3 min, smoke test)

Each measurement is its own subprocess (peak RSS per measurement; the frameworks never share
a process); lit_rlhf runs with this interpreter, TRL with the python of a separate virtualenv
(created by setup_trl_venv.sh when missing). Rounds alternate ours, TRL, bare, ours, TRL, bare
(bare = bench_bare.py, the plain-PyTorch floor of the ppo, sft and rm benches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402
from artifacts import build_artifacts  # noqa: E402
from bench_bare import BARE_BENCHES  # noqa: E402

BENCHES = tuple(report.BENCH_ORDER)
#: bench -> (script stem, extra arguments); rm_kwise is the RM bench on K-wise data, the
#: *_ragged ones run on variable-length data.
SCRIPTS = {b: (b, []) for b in ("ppo", "sft", "rm")} | {
    "rm_kwise": ("rm", ["--kwise"]),
    "sft_ragged": ("sft", ["--ragged"]),
    "rm_ragged": ("rm", ["--ragged"]),
    "ppo_ragged": ("ppo", ["--ragged"]),
}
OURS = {b: common.BENCH_DIR / f"bench_{stem}.py" for b, (stem, _) in SCRIPTS.items()}
THEIRS = {b: common.BENCH_DIR / "trl_side" / f"{stem}.py" for b, (stem, _) in SCRIPTS.items()}
#: The plain-PyTorch floor of the fixed-length benches (bench_bare.BARE_BENCHES).
BARE = common.BENCH_DIR / "bench_bare.py"

#: (warmup, timed) iterations per bench and size; quick mode uses QUICK.
FULL = {
    ("ppo", "1m"): (2, 8),
    ("ppo", "20m"): (2, 4),
    ("ppo_ragged", "1m"): (2, 8),
    ("ppo_ragged", "20m"): (2, 4),
    ("sft", "1m"): (3, 20),
    ("sft", "20m"): (2, 8),
    ("rm", "1m"): (3, 20),
    ("rm", "20m"): (2, 8),
    ("rm_kwise", "1m"): (3, 20),
    ("rm_kwise", "20m"): (2, 8),
    ("sft_ragged", "1m"): (3, 20),
    ("sft_ragged", "20m"): (2, 8),
    ("rm_ragged", "1m"): (3, 20),
    ("rm_ragged", "20m"): (2, 8),
}
QUICK = {
    ("ppo", "1m"): (1, 3),
    ("ppo", "20m"): (1, 1),
    ("ppo_ragged", "1m"): (1, 3),
    ("ppo_ragged", "20m"): (1, 1),
    ("sft", "1m"): (2, 6),
    ("sft", "20m"): (1, 3),
    ("rm", "1m"): (2, 6),
    ("rm", "20m"): (1, 3),
    ("rm_kwise", "1m"): (2, 6),
    ("rm_kwise", "20m"): (1, 3),
    ("sft_ragged", "1m"): (2, 6),
    ("sft_ragged", "20m"): (1, 3),
    ("rm_ragged", "1m"): (2, 6),
    ("rm_ragged", "20m"): (1, 3),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round, few iterations")
    p.add_argument("--sizes", default="1m,20m", help="comma list of " + ",".join(common.SIZES))
    p.add_argument(
        "--benches", default=",".join(BENCHES), help="comma list of " + ",".join(BENCHES)
    )
    p.add_argument(
        "--precisions",
        default=",".join(common.PRECISIONS),
        help="comma list of fp32,bf16 (both frameworks run each)",
    )
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (2; quick: 1)")
    p.add_argument(
        "--trl-venv",
        default=os.environ.get("LIT_RLHF_TRL_VENV", str(common.BENCH_DIR / ".trl-venv")),
        help="virtualenv with trl==1.0.0 (env LIT_RLHF_TRL_VENV; created when missing)",
    )
    p.add_argument("--no-trl", action="store_true", help="measure lit_rlhf only")
    p.add_argument(
        "--no-bare",
        action="store_true",
        help="skip the bare-PyTorch floor (bench_bare.py) of the ppo, sft and rm benches",
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=0.15,
        help="CPU cores other processes may use during a measurement before it counts as "
        "contended and is retried (default 0.15)",
    )
    p.add_argument("--retries", type=int, default=1, help="re-runs of a contended measurement")
    p.add_argument(
        "--wait-s",
        type=float,
        default=120.0,
        help="before each measurement wait up to this long for other processes to go idle",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--timeout", type=float, default=1200.0, help="per measurement, seconds")
    return p.parse_args()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(common.THREADS),
            "MKL_NUM_THREADS": str(common.THREADS),
            "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            # Byte-compile once into our own cache: without it every child re-compiles
            # torch/transformers/lightning (>10 s per start on this machine).
            "PYTHONPYCACHEPREFIX": str(common.CACHE_DIR / "pycache"),
        }
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def ensure_trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    script = common.BENCH_DIR / "setup_trl_venv.sh"
    print(f"[run_all] no TRL virtualenv at {venv}: creating it with {script.name} ...", flush=True)
    subprocess.run(["bash", str(script), str(venv)], check=True)
    if not python.exists():
        raise SystemExit(f"setup_trl_venv.sh did not create {python}")
    return python


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (first line of /proc/stat)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def others_now(sample_s: float = 2.0) -> float:
    """Cores other processes keep busy right now (sampled while no measurement runs)."""
    b0, t0 = _busy_seconds(), time.perf_counter()
    time.sleep(sample_s)
    return (_busy_seconds() - b0) / (time.perf_counter() - t0)


def wait_quiet(max_others: float, wait_s: float) -> float:
    """Wait (up to ``wait_s``) until other processes use less than ``max_others`` cores."""
    deadline = time.time() + wait_s
    busy = others_now(1.0)
    while busy > max_others and time.time() < deadline:
        busy = others_now(5.0)
    return busy


def run_once(cmd: list[str], log: Path, args) -> dict:
    quiet = wait_quiet(args.max_others, args.wait_s)
    load0 = os.getloadavg()[0]
    b0, c0, t0 = _busy_seconds(), _children_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(),
            timeout=args.timeout,
            cwd=common.BENCH_DIR.parent,
        )
    elapsed = time.perf_counter() - t0
    # Busy CPU time of the whole machine minus that of the measurement = the others' share.
    others = max(0.0, (_busy_seconds() - b0) - (_children_cpu() - c0)) / elapsed
    out = Path(cmd[cmd.index("--out") + 1])
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-3000:]
        return {"error": f"exit {proc.returncode}; log {log}:\n{tail}", "process_s": elapsed}
    result = json.loads(out.read_text())
    result.update(
        {
            "process_s": elapsed,
            "loadavg_start": load0,
            "others_cores_before": quiet,
            "others_cores": others,
            "contended": others > args.max_others,
        }
    )
    return result


def run_child(cmd: list[str], log: Path, args) -> dict:
    """Run one measurement; re-run it (up to ``--retries``) when other processes interfered."""
    attempts = []
    for attempt in range(args.retries + 1):
        res = run_once(cmd, log.with_suffix(f".a{attempt}.log"), args)
        res["attempt"] = attempt
        attempts.append(res)
        if "error" in res or not res["contended"]:
            break
    ok = [r for r in attempts if "error" not in r]
    best = min(ok, key=lambda r: r["others_cores"]) if ok else attempts[-1]
    best["attempts"] = len(attempts)
    return best


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def main() -> None:
    args = parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    benches = [b for b in args.benches.split(",") if b]
    for s in sizes:
        if s not in common.SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r}; use {sorted(common.SIZES)}")
    for b in benches:
        if b not in BENCHES:
            raise SystemExit(f"--benches: unknown bench {b!r}; use {list(BENCHES)}")
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        if p not in common.PRECISIONS:
            raise SystemExit(f"--precisions: unknown {p!r}; use {list(common.PRECISIONS)}")
    rounds = args.rounds or (1 if args.quick else 2)
    plan = QUICK if args.quick else FULL
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = common.CACHE_DIR / "runs" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    trl_python = None if args.no_trl else ensure_trl_python(Path(args.trl_venv))

    t_start = time.perf_counter()
    print("[run_all] building shared artifacts (tokenizer, weights, data) ...", flush=True)
    artifacts = build_artifacts(common.CACHE_DIR / "artifacts")

    def peak(tag: str) -> dict:
        out = work / f"peak_{tag}.json"
        cmd = [sys.executable, str(common.BENCH_DIR / "bench_peak.py"), "--out", str(out)]
        return run_child(cmd, work / f"peak_{tag}.log", args)

    print("[run_all] matmul peak ...", flush=True)
    peaks = [peak("start")]
    runs: list[dict] = []
    for size, bench, prec in ((s, b, p) for s in sizes for b in benches for p in precisions):
        warmup, iters = plan[(bench, size)]
        for r in range(rounds):
            sides = [("lit_rlhf", sys.executable, OURS[bench], SCRIPTS[bench][1])]
            if trl_python is not None:
                sides.append(("trl", str(trl_python), THEIRS[bench], SCRIPTS[bench][1]))
            if bench in BARE_BENCHES and not args.no_bare:
                sides.append(("bare", sys.executable, BARE, ["--bench", bench]))
            for name, python, script, extra in sides:
                tag = f"{bench}_{size}_{prec}_{name}_r{r}"
                out = work / f"{tag}.json"
                cmd = [
                    python,
                    str(script),
                    "--size",
                    size,
                    "--artifacts",
                    str(artifacts),
                    "--warmup",
                    str(warmup),
                    "--iters",
                    str(iters),
                    "--out",
                    str(out),
                    "--precision",
                    prec,
                    *extra,
                ]
                print(f"[run_all] {tag} ...", end=" ", flush=True)
                res = run_child(cmd, work / f"{tag}.log", args)
                res.update(
                    {
                        "bench": bench,
                        "size": size,
                        "precision": prec,
                        "framework": name,
                        "round": r,
                    }
                )
                runs.append(res)
                if "error" in res:
                    print("FAILED", flush=True)
                else:
                    print(
                        f"{res['process_s']:.0f}s, others used {res['others_cores']:.2f} "
                        f"cores{' (CONTENDED)' if res['contended'] else ''}",
                        flush=True,
                    )
                if "error" in res:
                    print(res["error"], file=sys.stderr)
    if not args.quick:
        peaks.append(peak("end"))

    summary = report.summarize(runs, peaks, sizes, benches, precisions)
    data = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "rounds": rounds,
        "plan": {f"{b}/{s}": plan[(b, s)] for b in benches for s in sizes},
        "machine": machine_info(),
        "settings": {
            "threads": common.THREADS,
            "precisions": precisions,
            "ppo": common.PPO,
            "sft": common.SFT,
            "rm": common.RM,
            "rm_kwise": common.RM_KWISE,
            "ragged_files": common.RAGGED_FILES,
            "sizes": common.SIZES,
            "params": {s: common.param_counts(s) for s in sizes},
        },
        "peaks": peaks,
        "summary": summary,
        "runs": runs,
        "total_s": time.perf_counter() - t_start,
    }
    (out_dir / "latest.json").write_text(json.dumps(data, indent=1))
    (out_dir / "latest.md").write_text(report.markdown(data))
    print(report.markdown(data))
    print(
        f"[run_all] wrote {out_dir / 'latest.json'} and latest.md "
        f"in {data['total_s'] / 60:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()
