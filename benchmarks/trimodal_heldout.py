"""Build a held-out tri-modal set for a trained run: the run's own test images of a COCO-format
dataset, all their captions, and those captions spoken as mp3 by a voice, speed and pitch that
training never used (edge_glass.data.speech.HELDOUT_POOL). Prints the eval command.

    python benchmarks/trimodal_heldout.py runs/trimodal --out runs/trimodal_heldout
    edge-glass eval runs/trimodal --data jsonl:runs/trimodal_heldout/manifest.jsonl

The run must have trained on ``spoken:coco:DIR`` or ``coco:DIR`` (its split.json names the test
images); ``--dataset`` picks which when it trained on several. A dataset that already has audio
(``--dataset jsonl:asterisk/transcripts.jsonl``) is written as it is: the run's held-out clips of
that dataset alone, with their own recordings.

    python benchmarks/trimodal_heldout.py runs/trimodal --dataset jsonl:asterisk/transcripts.jsonl --out runs/asterisk_test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_glass.data.formats import read_dataset
from edge_glass.data.speech import HELDOUT_POOL, speak_samples, write_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dataset", help="the training spec whose test images to use (default: the first coco one)")
    ap.add_argument("--format", default="mp3")
    args = ap.parse_args()

    split = json.loads((Path(args.run_dir) / "split.json").read_text())
    spec = args.dataset or next((s for s in split if s.removeprefix("spoken:").startswith("coco:")), None)
    if spec is None:
        raise SystemExit(f"{args.run_dir} did not train on a coco: or spoken:coco: dataset; pass --dataset")
    images = set(split[spec]["test"])
    held_out = [s for s in read_dataset(spec.removeprefix("spoken:")) if s.group in images]
    if not spec.startswith("spoken:") and any(s.audio is not None for s in held_out):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{k: str(Path(v).resolve()) if k in ("image", "audio") else v
                 for k, v in (("image", s.image), ("audio", s.audio), ("text", s.text)) if v is not None}
                for s in held_out]
        (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(images)} held-out groups of {spec}, {len(rows)} samples -> {out / 'manifest.jsonl'}")
        print(f"edge-glass eval {args.run_dir} --data jsonl:{out / 'manifest.jsonl'}")
        return
    samples = held_out
    start = time.time()
    spoken = speak_samples(samples, Path(args.out), HELDOUT_POOL, args.format)
    manifest = write_manifest(spoken, Path(args.out))
    voice = spoken[0][1]
    print(f"{len(images)} held-out images, {len(spoken)} captions spoken by {voice.name} at {voice.speed} wpm, "
          f"pitch {voice.pitch} ({args.format}, {time.time() - start:.0f} s) -> {manifest}")
    print(f"edge-glass eval {args.run_dir} --data jsonl:{manifest}")


if __name__ == "__main__":
    main()
