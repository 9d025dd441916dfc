"""edge-glass: train | eval | embed | info. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import EdgeGlassError

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

    i = sub.add_parser("info", help="resolved config and parameter counts")
    i.add_argument("target", help="a config YAML or a run directory")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return p


def cmd_train(args) -> None:
    from .config import load_config, variant_config
    from .train.loop import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.variants:
        train(cfg, out, resume=args.resume, progress=not args.no_progress)
        if _is_main_process():
            print(f"run directory: {out}")
        return
    results = {}
    for name in cfg.variants:
        print(f"== variant {name}")
        results[name] = train(variant_config(cfg, name), out / name, resume=args.resume, progress=not args.no_progress)
    if _is_main_process():
        _print_ablation(results)
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
        print(f"run directory: {out} (one subdirectory per variant; summary in ablation.json)")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_ablation(results: dict) -> None:
    rows = []
    for name, r in results.items():
        if not r:
            continue
        for d, block in r["dims"].items():
            t2i, i2t = block.get("text_to_image", {}), block.get("image_to_text", {})
            rows.append(f"{name:<24}{d:>6}" + "".join(f"{t2i.get(k, float('nan')):>8.2f}" for k in ("R@1", "R@5", "R@10"))
                        + "".join(f"{i2t.get(k, float('nan')):>8.2f}" for k in ("R@1", "R@5", "R@10")))
    print(f"{'variant':<24}{'dim':>6}{'t2i@1':>8}{'t2i@5':>8}{'t2i@10':>8}{'i2t@1':>8}{'i2t@5':>8}{'i2t@10':>8}")
    print("\n".join(rows))


def cmd_eval(args) -> None:
    from .api import evaluate
    from .eval.retrieval import format_table

    result = evaluate(args.run_dir, args.data, progress=not args.no_progress)
    print(format_table(result, f"{args.run_dir} on {args.data or 'its test split'}"))
    if result.get("skipped"):
        print(f"skipped {result['skipped']} samples: {result.get('skipped_by_reason')}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


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


def cmd_info(args) -> None:
    from .api import build_core
    from .config import dump_config, load_config
    from .encoders import build_encoders
    from .runs import RunDir

    target = Path(args.target)
    cfg = RunDir(target).read_config() if target.is_dir() else load_config(target, args.overrides)
    print(dump_config(cfg))
    encoders = build_encoders(cfg.encoders)
    core = build_core(cfg, encoders)
    rows = []
    for m, enc in encoders.items():
        enc.ensure_loaded()
        rows.append((f"encoders.{m} ({enc.cfg.type}, frozen)", sum(p.numel() for p in enc.parameters()), 0))
    for m, head in core.heads.items():
        for part in ("pooler", "projection"):
            mod = getattr(head, part)
            n = sum(p.numel() for p in mod.parameters())
            rows.append((f"heads.{m}.{part}", n, sum(p.numel() for p in mod.parameters() if p.requires_grad)))
    rows.append(("logit_scales", sum(p.numel() for p in core.logit_scales.values()), sum(p.numel() for p in core.logit_scales.values() if p.requires_grad)))
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'module':<{width}}{'total':>14}{'trainable':>14}")
    for name, total, trainable in rows:
        print(f"{name:<{width}}{total:>14,}{trainable:>14,}")
    print(f"{'all':<{width}}{sum(r[1] for r in rows):>14,}{sum(r[2] for r in rows):>14,}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "embed": cmd_embed, "info": cmd_info}[args.command](args)
    except EdgeGlassError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
