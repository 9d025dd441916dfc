"""NL-MM test-time training on a shifted held-out set: the run's test captions spoken by a voice
training never used (espeak-ng's held-out pool: an accent, variant, speed and pitch outside the
training pool), retrieved against their texts and photos with and without adaptation.

    python benchmarks/nlmm_ttt_shift.py RUN [--json out.json]

Modes (edge_glass.nlmm.evaluate.adaptation, applied to the audio encoder; texts and photos as trained):
    none      the TTT adapters' inner learning rate set to 0 (no adaptation)
    sequence  online adaptation within each clip, reset for the next (as trained)
    stream    the adapters' fast weights carried from clip to clip through the whole unseen-voice
              set in order (one voice: the stream a deployed model would hear)

Also the same numbers on the run's own test clips (training voices), so the shift itself is visible.
Reports audio->text and audio->image Recall@1/5/10 and text->audio R@1 at the largest dim.

A run whose test split holds FSDD clips (trained on ``fsdd-holdout:SPEAKER:fsdd``: every clip of
SPEAKER is test) is scored instead on spoken-digit accuracy of those clips in the three modes:

    edge-glass train configs/nlmm_tiny.yaml --out runs/nlmm_fsdd_theo --set 'data.train=["fsdd-holdout:theo:fsdd"]' \
        --set 'data.split={val: 100, test: 0}' --set data.max_audio_seconds=1.5
    python benchmarks/nlmm_ttt_shift.py runs/nlmm_fsdd_theo
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edge_glass  # noqa: E402
from edge_glass.data.samples import DataReport  # noqa: E402
from edge_glass.data.speech import HELDOUT_POOL, speak_samples  # noqa: E402
from edge_glass.features.cache import feature_cache_dir  # noqa: E402
from edge_glass.nlmm.data import build_nlmm_data  # noqa: E402
from edge_glass.nlmm.evaluate import adaptation, digits, retrieval  # noqa: E402
from edge_glass.paths import cache_root  # noqa: E402
from edge_glass.tasks.nlmm import split_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.time()
    model = edge_glass.load(args.run, "cpu")
    net, cfg = model.net, model.cfg
    backbones = None if model.backbones is None else replace(model.backbones, cache_dir=feature_cache_dir(cfg))  # encoded once
    everything = split_data(cfg, DataReport())[0]["test"]
    digits_test = [s for s in everything if s.group.split("|", 1)[0].startswith("fsdd")]
    if digits_test:  # e.g. fsdd-holdout:SPEAKER:fsdd: a voice never heard in training, digits from audio alone
        data = build_nlmm_data(digits_test, model.tokenizer, model.spec, DataReport(), workers=2, backbones=backbones)
        out = {"run": args.run, "n": len(data), "results": {}}
        for mode in ("none", "sequence", "stream"):
            with adaptation(net, mode, ["audio"]), torch.no_grad():
                res = digits(net, data, model.tokenizer, cfg.eval, torch.arange(len(data)))
            out["results"][mode] = res
            print(f"FSDD test clips  {mode:9} digit accuracy {res['accuracy']:6.2f}  from the transcript {res['transcript_accuracy']:6.2f}"
                  f"  per speaker {res['per_speaker']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return
    test = [s for s in everything if s.image is not None and s.audio is not None and s.text]
    if not test:
        raise SystemExit(f"{args.run}: its test split has neither FSDD clips nor image-audio-text samples (train on spoken:coco:...)")
    spoken = [s for s, _ in speak_samples([replace(s, audio=None) for s in test], cache_root() / "speech", HELDOUT_POOL, "flac")]
    sets = {"training voices": test, "unseen voice": spoken}
    out: dict = {"run": args.run, "voice": str(HELDOUT_POOL.pick("")), "n": len(test), "results": {}}
    for name, samples in sets.items():
        data = build_nlmm_data(samples, model.tokenizer, model.spec, DataReport(), workers=2, backbones=backbones)
        for mode in ("none", "sequence", "stream"):
            with adaptation(net, mode, ['audio']), torch.no_grad():
                at = retrieval(net, data, "audio", "text", cfg.eval.ks, cfg.eval.batch_size)
                ai = retrieval(net, data, "image", "audio", cfg.eval.ks, cfg.eval.batch_size)
            row = {"audio_to_text": at["audio_to_text"], "text_to_audio": at["text_to_audio"], "audio_to_image": ai["audio_to_image"]}
            out["results"][f"{name} / {mode}"] = row
            print(f"{name:16} {mode:9} audio->text R@1 {row['audio_to_text']['R@1']:6.2f} R@5 {row['audio_to_text']['R@5']:6.2f}"
                  f"  text->audio R@1 {row['text_to_audio']['R@1']:6.2f}  audio->image R@1 {row['audio_to_image']['R@1']:6.2f}"
                  f" R@5 {row['audio_to_image']['R@5']:6.2f}", flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
