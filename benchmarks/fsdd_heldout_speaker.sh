#!/usr/bin/env bash
# Leave-one-speaker-out spoken-digit accuracy: for each FSDD speaker, train
# configs/fsdd_heldout_speaker.yaml without them and classify all 500 of their clips.
#   bash benchmarks/fsdd_heldout_speaker.sh [OUT=runs/fsdd_heldout]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fsdd_heldout}
for speaker in george jackson lucas nicolas theo yweweler; do
  run=$OUT/$speaker
  [ -f "$run/eval.json" ] || edge-glass train configs/fsdd_heldout_speaker.yaml --out "$run" --no-progress \
      --set "data.train=[\"fsdd-holdout:$speaker:fsdd\"]" > "$OUT.$speaker.log" 2>&1
  edge-glass eval "$run" --data "fsdd-holdout:$speaker:fsdd" --json "$run/heldout_speaker.json" --no-progress > /dev/null
done
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = {}
for f in sorted(out.glob("*/heldout_speaker.json")):
    d = json.loads(f.read_text())["digits"]
    acc[f.parent.name] = d["accuracy"]
    print(f"{f.parent.name:<10} {d['accuracy']:6.2f}% of {d['n']} clips")
print(f"mean {statistics.mean(acc.values()):.2f} ± {statistics.stdev(acc.values()):.2f} (min {min(acc.values()):.2f}) over {len(acc)} held-out speakers")
PY
