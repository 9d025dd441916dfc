#!/usr/bin/env bash
# Phase 1 -> phase 2: a TRM decoder on an alignment run's frozen image head (the quickstart's
# 512-d Matryoshka image embedding) vs on the raw EfficientNet-Lite0 tokens, same recipe and
# budget, 3 seeds each; mean ± std of test exact match.
#   bash benchmarks/aligned_vs_raw.sh [OUT=runs/aligned_vs_raw]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/aligned_vs_raw}
T="--set train.threads=1"
QS=$OUT/quickstart
[ -f "$QS/eval.json" ] || edge-glass train configs/quickstart.yaml --out "$QS" --no-progress $T > "$OUT.quickstart.log" 2>&1
ALIGNED="--set vision.aligned_run=$QS --set vision.aligned_output=embedding"
# coco1k VQA v2 yes/no: the trm_vlm_qa recipe (30 epochs, best validation step)
python benchmarks/seeds.py configs/trm_vlm_qa.yaml --out "$OUT/vqa_yesno_raw" $T
python benchmarks/seeds.py configs/trm_vlm_qa.yaml --out "$OUT/vqa_yesno_aligned" $T $ALIGNED --set projector.pool=none
# easy-VQA at a short budget: the first 5,000 training questions, 3 epochs (test: the first 5,000 official test questions)
SHORT="--set data.max_samples=5000 --set train.epochs=3 --set train.warmup=50"
python benchmarks/seeds.py configs/trm_easy_vqa.yaml --out "$OUT/easy_vqa_raw" $T $SHORT
python benchmarks/seeds.py configs/trm_easy_vqa.yaml --out "$OUT/easy_vqa_aligned" $T $SHORT $ALIGNED
