#!/usr/bin/env bash
# One-GPU checks of the strategies CI cannot run (no GPU, no deepspeed there):
# FSDP2 on CUDA/NCCL and DeepSpeed ZeRO-2/-3 (conf/strategy/deepspeed.yaml) for SFT, RM and
# PPO-ptx, each compared with a plain one-GPU run of the same steps.
#   bash tests/dist_scripts/gpu_check.sh [WHEEL_DIR]
# WHEEL_DIR (optional) holds deepspeed's sdist and its missing dependencies for an offline
# machine. Prints one line per run: the max |weight difference| to the plain run.
# STRATEGIES="single deepspeed2" limits the runs. Budget ~20 s per run on an H100 machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
# DS_ACCELERATOR: a first try here died in DeepSpeed's init with "No backend type associated
# with device type cpu", probably DeepSpeed picking its CPU accelerator; force CUDA.
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 DS_ACCELERATOR=cuda
if [ -n "${1:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$1"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    "$1"/deepspeed-*.tar.gz || exit 1
fi
python3 -c "import lit_rlhf.callbacks" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
WORK=${WORK:-/tmp/gpu_check}
run() {  # stage strategy
  local dir="$WORK/$1_$2"
  if ! timeout 240 python3 tests/dist_scripts/run_stage.py --stage "$1" --strategy "$2" \
      --accelerator gpu --devices 1 --workdir "$dir" >"$dir.log" 2>&1; then
    echo "FAILED $1 $2"; grep -v Warning "$dir.log" | grep -B30 -m1 -E "^(\[rank0\]: )?[A-Za-z]*Error" | cut -c1-220
  fi
}
mkdir -p "$WORK"
for stage in ppo sft rm; do
  for strategy in ${STRATEGIES:-single fsdp deepspeed2 deepspeed3}; do run "$stage" "$strategy"; done
done
python3 - "$WORK" <<'EOF'
import os, sys, torch
work = sys.argv[1]
for stage in ("ppo", "sft", "rm"):
    base = os.path.join(work, f"{stage}_single", "result.pt")
    if not os.path.exists(base):
        print(stage, "single run missing"); continue
    one = torch.load(base, weights_only=False)
    for strategy in ("fsdp", "deepspeed2", "deepspeed3"):
        path = os.path.join(work, f"{stage}_{strategy}", "result.pt")
        if not os.path.exists(path):
            print(f"{stage:4s} {strategy:10s} no result"); continue
        two = torch.load(path, weights_only=False)
        diffs = {
            name: max((w[k].float() - two["weights"][name][k].float()).abs().max().item() for k in w)
            for name, w in one["weights"].items()
        }
        moved = max((w - one["initial"][n][k].cpu()).abs().max().item()
                    for n in one["weights"] for k, w in one["weights"][n].items())
        print(f"{stage:4s} {strategy:10s} steps {two['global_step']} max|dw| "
              + " ".join(f"{n}={d:.1e}" for n, d in diffs.items()) + f" (moved {moved:.1e})")
EOF
