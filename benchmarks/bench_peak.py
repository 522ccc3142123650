"""Measure this machine's dense matmul peak (fp32 and bf16) with the benchmark thread count.

Best of several ``torch.mm`` timings of square matrices (256 ... 2048); FLOPs = 2 n^3. The
best (not the mean) is what "peak" means: what the BLAS reaches when nothing interferes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def best_seconds(dtype, n: int, reps: int, budget_s: float) -> float:
    """Best of ``reps`` timings of one ``n x n`` matmul (fewer when over ``budget_s``)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm up the kernel choice and the allocator
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    common.setup_threads()
    import torch

    result = {"sizes": {}, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_size = {}
        # Growing sizes until one product takes over a second: CPUs without bf16 units
        # (AVX2 only) run bf16 matmuls on a slow fallback path, ~100x below fp32.
        for n in (256, 512, 1024, 2048):
            best = best_seconds(dtype, n, args.reps, budget_s=3.0)
            per_size[n] = 2 * n**3 / best / 1e9
            if best > 1.0:
                break
        result["sizes"][name] = per_size
        result[f"{name}_gflops"] = max(per_size.values())
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
