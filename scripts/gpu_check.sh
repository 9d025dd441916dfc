#!/usr/bin/env bash
# CUDA check (quickstart, short TRM, tiny-Qwen LoRA; bf16; train -> kill -> resume -> eval -> load;
# then DeepSpeed ZeRO-2 and FSDP runs of the TRM VLM config), printing PASS/FAIL per step. Run on a
# GPU machine after the README's set-up:
#   bash scripts/gpu_check.sh                 # extra flags go to scripts/gpu_check.py (--device cpu, --only engines ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
case " $* " in
  *" --device cpu "*|*" --device=cpu "*) ;;
  *)  # the ZeRO-2 steps need deepspeed (sdist only: built here, on the GPU machine); the other steps run without it
    if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
      echo "deepspeed missing: pip install deepspeed" >&2
      "$PY" -m pip install -q deepspeed || echo "could not install deepspeed: the ZeRO-2 steps will FAIL, the others still run" >&2
    fi ;;
esac
exec "$PY" scripts/gpu_check.py "$@"
