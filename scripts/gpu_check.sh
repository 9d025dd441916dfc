#!/usr/bin/env bash
# CUDA check (quickstart, short TRM, tiny-Qwen LoRA; bf16; train -> kill -> resume -> eval -> load),
# printing PASS/FAIL per step. Run on a GPU machine after the README's set-up:
#   bash scripts/gpu_check.sh                 # extra flags go to scripts/gpu_check.py (--device cpu ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
