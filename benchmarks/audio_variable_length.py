"""Clips per second of the Whisper audio encoder with variable-length encoding vs classic 30 s
padding, on Free Spoken Digit Dataset recordings (~0.5 s each, so most of a 30 s window is silence)
or, with --folder asterisk/wav, on telephone prompts (1-10 s).

    PYTHONPATH=. python benchmarks/audio_variable_length.py --clips 100 --batch-size 16 --model whisper-tiny.en
    PYTHONPATH=. python benchmarks/audio_variable_length.py --folder asterisk/wav --clips 100

(PYTHONPATH=. is not needed once the project is pip-installed.)

Decoding and log-mel (``prepare``) are timed apart from the encoder forward pass. Clips are batched
by length, as the feature cache does (FeatureCache.fill), so batch padding stays small.
"""
from __future__ import annotations

import argparse
import time

import torch

from edge_glass.encoders.whisper import WhisperAudioEncoder
from edge_glass.paths import data_root


def run(encoder: WhisperAudioEncoder, files: list, batch_size: int) -> tuple[float, float, int]:
    """(prepare seconds, encode seconds, positions per clip on average) over all files."""
    t0 = time.perf_counter()
    prepared = sorted((encoder.prepare(f) for f in files), key=encoder.length)  # batches of similar length, as the feature cache forms them
    t1 = time.perf_counter()
    positions = 0
    for i in range(0, len(prepared), batch_size):
        out = encoder(encoder.collate(prepared[i:i + batch_size]))
        positions += out.tokens.shape[0] * out.tokens.shape[1]
    return t1 - t0, time.perf_counter() - t1, positions // len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--folder", default="fsdd/recordings", help="folder of .wav files under the data root")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    folder = data_root() / args.folder
    files = sorted(folder.glob("*.wav"))[: args.clips]
    if not files:
        raise SystemExit(f"no .wav files under {folder} (set EDGE_GLASS_DATA)")
    results = {}
    for variable in (True, False):
        enc = WhisperAudioEncoder(WhisperAudioEncoder.Config(model=args.model, variable_length=variable))
        enc.ensure_loaded()
        enc(enc.collate([enc.prepare(files[0])]))  # warm-up
        prep, encode, positions = run(enc, files, args.batch_size)
        results[variable] = len(files) / encode
        name = "variable length" if variable else "30 s padding   "
        print(f"{name}: {len(files) / encode:8.1f} clips/s encode ({positions} positions/clip incl. batch padding), "
              f"{len(files) / prep:8.1f} clips/s prepare")
    print(f"speed-up of the encoder forward: {results[True] / results[False]:.1f}x "
          f"({len(files)} clips, batch {args.batch_size}, {args.threads} thread(s), {args.model})")


if __name__ == "__main__":
    main()
