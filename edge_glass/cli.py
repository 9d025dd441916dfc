"""edge-glass: train | eval | embed | speak | info. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, EdgeGlassError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-glass", description="Align frozen encoders into one Matryoshka embedding space.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment config")
    t.add_argument("config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME",
                   help="train only this variant of an ablation config (repeatable; default: all)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="retrieval Recall@K of a run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="coco:DIR | flickr8k:DIR | jsonl:FILE | parquet:FILE (default: the run's test split)")
    e.add_argument("--json", help="also write the metrics to this file")
    e.add_argument("--no-progress", action="store_true")

    m = sub.add_parser("embed", help="embed images, audio or texts with a run's model")
    m.add_argument("run_dir")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of images")
    src.add_argument("--audio", help="directory of audio files")
    src.add_argument("--texts", help="text file, one text per line")
    m.add_argument("--out", required=True, help="output .npz (embeddings, ids) or .safetensors")
    m.add_argument("--dim", type=int, help="embedding size (default: the largest)")

    s = sub.add_parser("speak", help="speak a dataset's captions with espeak-ng: image-audio-text triples + a JSONL manifest")
    s.add_argument("data", help="a dataset spec with captions, e.g. coco:coco1k")
    s.add_argument("--out", required=True, help="output directory: audio/ and manifest.jsonl (existing clips are reused)")
    s.add_argument("--format", default="mp3", choices=["mp3", "wav", "flac", "ogg"])
    s.add_argument("--voices", help="comma-separated espeak-ng voices, +variant allowed (default: the training pool)")
    s.add_argument("--variants", help="comma-separated variants applied to every voice ('' = its own)")
    s.add_argument("--speeds", help="comma-separated words per minute")
    s.add_argument("--pitches", help="comma-separated pitches 0-99")
    s.add_argument("--seed", type=int, default=0, help="seeds each caption's draw of voice, speed and pitch")
    s.add_argument("--max-groups", type=int, help="speak only the captions of the first N images")

    i = sub.add_parser("info", help="resolved config and parameter counts")
    i.add_argument("target", help="a config YAML or a run directory")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return p


def cmd_train(args) -> None:
    from .config import load_config, variant_config
    from .train.loop import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    unknown = [v for v in args.variants if v not in cfg.variants]
    if unknown:
        raise ConfigError(f"{args.config}: no variant {', '.join(unknown)}; the config has: {', '.join(cfg.variants) or 'none'}")
    if not cfg.variants:
        train(cfg, out, resume=args.resume, progress=not args.no_progress)
        if _is_main_process():
            print(f"run directory: {out}")
        return
    results = {}
    for name in args.variants or cfg.variants:
        print(f"== variant {name}")
        results[name] = train(variant_config(cfg, name), out / name, resume=args.resume, progress=not args.no_progress)
    if _is_main_process():
        _print_ablation(results)
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        print(f"run directory: {out} (one subdirectory per variant; summary in ablation.json)")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _short(direction: str) -> str:
    """text_to_image -> t2i, image+audio_to_text -> ia2t."""
    return "2".join("".join(m[0] for m in side.split("+")) for side in direction.split("_to_"))


def _print_ablation(results: dict) -> None:
    """One row per variant and dim; R@1/5/10 of every retrieval direction the variants report."""
    directions = list(dict.fromkeys(k for r in results.values() if r for block in r["dims"].values() for k in block))
    rows = []
    for name, r in results.items():
        if not r:
            continue
        for d, block in r["dims"].items():
            rows.append(f"{name:<24}{d:>6}" + "".join(f"{block.get(x, {}).get(k, float('nan')):>8.2f}" for x in directions for k in ("R@1", "R@5", "R@10")))
    print(f"{'variant':<24}{'dim':>6}" + "".join(f"{_short(x) + '@' + k[2:]:>8}" for x in directions for k in ("R@1", "R@5", "R@10")))
    print("\n".join(rows))


def cmd_eval(args) -> None:
    from .api import evaluate
    from .eval.retrieval import format_table
    from .runs import slug

    result = evaluate(args.run_dir, args.data, progress=not args.no_progress)
    title = f"{args.run_dir} on {args.data or 'its test split'}"
    predictions = result.pop("predictions", None)
    if "exact_match" in result:
        from .tasks.vqa import format_qa

        print(format_qa({**result, "predictions": predictions or []}, title))
    else:
        print(format_table(result, title))
    if "zero_shot_digits" in result:
        z = result["zero_shot_digits"]
        print(f"zero-shot spoken digits: {z['accuracy']:.2f}% of {z['n']} clips (chance {z['chance']:.0f}%); per speaker: "
              + ", ".join(f"{k} {v:.1f}" for k, v in z["per_speaker"].items()))
    if result.get("skipped"):
        print(f"skipped {result['skipped']} samples: {result.get('skipped_by_reason')}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if predictions is not None:
        where = Path(args.json).with_suffix(".predictions.json") if args.json else Path(args.run_dir) / f"predictions_{slug(args.data or 'test')}.json"
        where.write_text(json.dumps(predictions, indent=2))
        print(f"sample predictions: {where}")


def _list_files(folder: str, suffixes: set[str]) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise EdgeGlassError(f"{folder}: not a directory")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise EdgeGlassError(f"{folder}: no files with suffix {', '.join(sorted(suffixes))}")
    return files


def cmd_embed(args) -> None:
    import numpy as np

    from .api import load
    from .errors import InputError

    model = load(args.run_dir)
    if args.texts:
        lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
        ids = [f"{n}" for n, line in enumerate(lines, 1) if line.strip()]
        items, modality = [line.strip() for line in lines if line.strip()], "text"
        skipped = len(lines) - len(items)
    else:
        modality = "image" if args.images else "audio"
        files = _list_files(args.images or args.audio, IMAGE_SUFFIXES if args.images else AUDIO_SUFFIXES)
        enc = model.encoders[modality]
        items, ids, skipped = [], [], 0
        for f in files:  # check every input first, so one bad file is reported and skipped
            try:
                enc.prepare(str(f))
                items.append(str(f))
                ids.append(str(f.relative_to(args.images or args.audio)))
            except InputError as err:
                print(f"skipped {err}", file=sys.stderr)
                skipped += 1
    emb = model.encode(modality, items, dim=args.dim).numpy().astype(np.float32)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": emb}, str(out), metadata={"ids": json.dumps(ids), "modality": modality})
    else:
        np.savez(out, embeddings=emb, ids=np.array(ids))
    print(f"wrote {emb.shape[0]} {modality} embeddings of dim {emb.shape[1]} to {out}" + (f" ({skipped} skipped)" if skipped else ""))


def cmd_speak(args) -> None:
    from .data import speech
    from .data.formats import read_dataset
    from .data.samples import DataReport
    from .train.data import limit_groups

    default = args.voices is None and args.variants is None and args.speeds is None and args.pitches is None
    pool = speech.TRAIN_POOL if default else speech.VoicePool.parse(
        args.voices or speech.TRAIN_VOICES, args.speeds or speech.TRAIN_SPEEDS, args.pitches or speech.TRAIN_PITCHES, args.variants or "")
    report = DataReport()
    samples = limit_groups(read_dataset(args.data, report), args.max_groups)
    start = time.time()
    spoken = speech.speak_samples(samples, Path(args.out), pool, args.format, args.seed, report)
    manifest = speech.write_manifest(spoken, Path(args.out))
    print(f"{len(spoken)} spoken captions ({len(pool.voices)} voices, {args.format}) in {time.time() - start:.1f} s -> {manifest}")
    if report.skipped:
        print(report.summary())


def cmd_info(args) -> None:
    from .api import parameter_rows
    from .config import dump_config, load_config
    from .runs import RunDir

    target = Path(args.target)
    cfg = RunDir(target).read_config() if target.is_dir() else load_config(target, args.overrides)
    print(dump_config(cfg))
    rows = parameter_rows(cfg, target if target.is_dir() else None)
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'module':<{width}}{'total':>14}{'trainable':>14}")
    for name, total, trainable in rows:
        print(f"{name:<{width}}{total:>14,}{trainable:>14,}")
    print(f"{'all':<{width}}{sum(r[1] for r in rows):>14,}{sum(r[2] for r in rows):>14,}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "embed": cmd_embed, "speak": cmd_speak, "info": cmd_info}[args.command](args)
    except EdgeGlassError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
