#!/usr/bin/env bash
# Mixed precision as a measured mode: the same runs (config, seed, data) with
# train.mixed_precision=no and =bf16: median seconds per step and the test metrics.
#   bash benchmarks/bf16_vs_fp32.sh [OUT=runs/bf16_vs_fp32] [THREADS=2]     (WITH_TRIMODAL=1: also configs/trimodal.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bf16_vs_fp32}
T="--set train.threads=${2:-2}"
SHORT="--set data.max_samples=10000 --set train.epochs=3 --set train.warmup=100"
TINY=(--set "decoder={type: tiny, d_model: 128, n_layers: 2, n_heads: 4}" --set train.lr=1.0e-3)
for mp in no bf16; do
  python benchmarks/seeds.py configs/quickstart.yaml --seeds 0 --out "$OUT/quickstart_$mp" $T --set train.mixed_precision=$mp
  if [ -n "${WITH_TRIMODAL:-}" ]; then  # ~8 min cold per run on 2 cores
    python benchmarks/seeds.py configs/trimodal.yaml --seeds 0 --out "$OUT/trimodal_$mp" $T --set train.mixed_precision=$mp
  fi
  python benchmarks/seeds.py configs/trm_easy_vqa.yaml --seeds 0 --out "$OUT/trm_short_$mp" $T $SHORT --set train.mixed_precision=$mp
  python benchmarks/seeds.py configs/trm_easy_vqa.yaml --seeds 0 --out "$OUT/tiny_short_$mp" $T $SHORT "${TINY[@]}" --set train.mixed_precision=$mp
done
