"""Speech to text by a trained Edge Glass decoder vs Whisper's own decoder, on the run's held-out clips.

    edge-glass train configs/speech_to_text_trm.yaml --out runs/speech_to_text_trm
    python benchmarks/trimodal_speech.py runs/speech_to_text_trm --json speech.json

Word error rates (jiwer; lowercase, punctuation dropped) on the run's test split:
  decoder vs reference text, Whisper tiny.en (greedy, its own decoder) vs reference text, and
  decoder vs Whisper's transcripts. Whisper is the anchor: it was trained on 680k hours.
"""
from __future__ import annotations

import argparse
import json
import time

import edge_glass
from edge_glass.data.samples import DataReport
from edge_glass.eval.qa import word_error_rate
from edge_glass.media.audio import load_audio
from edge_glass.tasks.vlm import VLMTask
from edge_glass.weights.ctranslate2 import load_whisper, transcribe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data", help="a transcribe:SPEC to evaluate instead of the run's test split")
    ap.add_argument("--whisper", default="whisper-tiny.en")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = edge_glass.load(args.run)
    details: dict = {}
    t0 = time.perf_counter()
    result = VLMTask(model.cfg).evaluate_run(model, args.data, DataReport(), progress=False, details=details)
    decode_s = time.perf_counter() - t0
    rows = [p for p in details["predictions"] if p.get("audio")]
    refs, preds = [p["answer"] for p in rows], [p["prediction"] for p in rows]
    wm, fe, tok = load_whisper(args.whisper)
    t0 = time.perf_counter()
    heard = []
    for i in range(0, len(rows), 8):
        heard += transcribe(wm, fe, tok, [load_audio(p["audio"]) for p in rows[i : i + 8]])
    whisper_s = time.perf_counter() - t0
    out = {
        "run": args.run, "clips": len(rows),
        "decoder_vs_reference": word_error_rate(preds, refs), "whisper_vs_reference": word_error_rate(heard, refs),
        "decoder_vs_whisper": word_error_rate(preds, heard), "decoder_exact_match": result["exact_match"],
        "decoder_seconds": round(decode_s, 1), "whisper_seconds": round(whisper_s, 1), "whisper": args.whisper,
        "samples": [{"reference": r, "decoder": p, "whisper": h} for r, p, h in list(zip(refs, preds, heard))[:8]],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))
    for s in out["samples"][:4]:
        print(f"  ref: {s['reference']}\n  dec: {s['decoder']}\n  whi: {s['whisper']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
