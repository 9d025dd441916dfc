#!/usr/bin/env bash
# Set up, then train and evaluate the quickstart (EfficientNet-Lite0 + MiniLM on coco1k).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN=${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
edge-glass train configs/quickstart.yaml --out "$RUN"
edge-glass eval "$RUN" --json "$RUN/eval_cli.json"
