"""Profile one lit_rlhf PPO iteration (the benchmark's settings) with cProfile and torch.profiler.

    python benchmarks/profile_ppo.py --size 1m [--warmup 2] [--out-dir benchmarks/results]

Writes ``profile_ppo_<size>.txt``: the phase split of the profiled iterations, the Python
functions with the largest cumulative and own time (cProfile, iteration ``warmup + 1``) and the
torch operators with the largest self CPU time (torch.profiler, iteration ``warmup + 2``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from artifacts import build_artifacts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=sorted(common.SIZES), required=True)
    p.add_argument("--artifacts", default=str(common.CACHE_DIR / "artifacts"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args()
    common.setup_threads()
    import bench_ppo
    import lightning as L
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile, record_function

    transformers.utils.logging.set_verbosity_error()
    build_artifacts(args.artifacts)
    L.seed_everything(0, verbose=False)
    args.iters = 2
    module, dm, _ = bench_ppo.build(args, args.warmup + 2)
    py_prof = cProfile.Profile()
    state: dict = {}

    class Profiler(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["t0"] = time.perf_counter()
            if batch_idx == args.warmup:
                py_prof.enable()
            elif batch_idx == args.warmup + 1:
                state["torch"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                state["torch"].__enter__()
                state["rf"] = record_function("ppo_iteration")
                state["rf"].__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            wall = time.perf_counter() - state["t0"]
            if batch_idx == args.warmup:
                py_prof.disable()
                state["cprofile_wall"] = wall
            elif batch_idx == args.warmup + 1:
                state["rf"].__exit__(None, None, None)
                state["torch"].__exit__(None, None, None)
                state["torch_wall"] = wall

    trainer = common.bare_trainer(Profiler(), max_epochs=-1)
    trainer.fit(module, dm)

    out = io.StringIO()
    out.write(
        f"# lit_rlhf PPO iteration profile, size {args.size}, {torch.get_num_threads()} "
        f"threads, settings {common.PPO}\n\n"
    )
    out.write("## phase split (s) per iteration; the last two are profiled\n")
    for i, h in enumerate(module.history):
        out.write(
            f"iter {i}: generation {h['time/generation']:.3f}  scoring {h['time/scoring']:.3f}"
            f"  optimization {h['time/optimization']:.3f}\n"
        )
    out.write(
        f"\ncProfile'd iteration wall: {state['cprofile_wall']:.3f} s "
        f"(profiler overhead included)\n"
    )
    out.write(f"torch.profiler'd iteration wall: {state['torch_wall']:.3f} s\n\n")
    for key, n in (("cumulative", 45), ("tottime", 30)):
        out.write(f"## cProfile, sorted by {key}\n")
        s = io.StringIO()
        pstats.Stats(py_prof, stream=s).strip_dirs().sort_stats(key).print_stats(n)
        out.write(s.getvalue().split("\n", 6)[-1] if key == "cumulative" else s.getvalue())
        out.write("\n")
    out.write("## torch.profiler, operators by self CPU time\n")
    out.write(state["torch"].key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile_ppo_{args.size}.txt"
    path.write_text(out.getvalue())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
