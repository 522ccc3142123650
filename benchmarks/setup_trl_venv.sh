#!/usr/bin/env bash
# Create the separate virtualenv with TRL 1.0.0 that the benchmarks compare against.
# TRL is never a dependency of lit_rlhf: it lives only in this venv.
#
#   bash benchmarks/setup_trl_venv.sh [VENV_DIR]     (default: $LIT_RLHF_TRL_VENV or benchmarks/.trl-venv)
#
# torch and transformers are pinned to the versions the kit is tested with, so both sides run
# the same kernels and the same GPT-2 code; PYTHON picks the interpreter (default python3).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-${LIT_RLHF_TRL_VENV:-$HERE/.trl-venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.24.0}"

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --upgrade pip
# CPU wheels first (small); fall back to the default index.
"$PIP" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
  || "$PIP" install "torch==$TORCH_VERSION"
"$PIP" install "trl==1.0.0" "transformers==$TRANSFORMERS_VERSION" accelerate datasets
"$VENV/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
