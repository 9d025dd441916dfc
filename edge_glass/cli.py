"""edge-glass: train | eval | report | embed | export | push | speak | shard | download | info. Thin: parses arguments and calls the library."""
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

    e = sub.add_parser("eval", help="evaluate a run (retrieval Recall@K, QA exact match / F1...)")
    e.add_argument("run_dir")
    e.add_argument("--data", help="coco:DIR | flickr8k:DIR | jsonl:FILE | parquet:FILE (default: the run's test split)")
    e.add_argument("--json", help="also write the metrics to this file")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA if available)")

    r = sub.add_parser("report", help="evaluate a run and write report.html: figures, tables, sample retrievals / predictions")
    r.add_argument("run_dir", help="a run directory (or an ablation directory with ablation.json)")
    r.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="evaluate on this dataset spec (repeatable; default: the run's test split, its data.eval sets, FSDD's test takes)")
    r.add_argument("--out", help="output folder (default RUN/report): report.html, figures/*.png|svg, eval*.json")
    r.add_argument("--tsne-points", type=int, default=800, metavar="N", help="t-SNE on a seeded subsample of at most N items (default 800)")
    r.add_argument("--queries", type=int, default=8, metavar="N", help="sample queries per retrieval direction (default 8)")
    r.add_argument("--predictions", type=int, default=12, metavar="N", help="sample predictions shown for a vlm run (default 12)")
    r.add_argument("--no-svg", action="store_true", help="write PNG figures only")
    r.add_argument("--no-refresh", action="store_true", help="leave the run's eval*.json as they are (the report folder still gets its own)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA if available)")

    m = sub.add_parser("embed", help="embed images, audio or texts with a run's model")
    m.add_argument("run_dir")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of images")
    src.add_argument("--audio", help="directory of audio files")
    src.add_argument("--texts", help="text file, one text per line")
    m.add_argument("--out", required=True, help="output .npz (embeddings, ids) or .safetensors")
    m.add_argument("--dim", type=int, help="embedding size (default: the largest)")
    m.add_argument("--device", help="cpu | cuda | cuda:N (default: CUDA if available)")

    x = sub.add_parser("export", help="write a run as ONNX towers (edge_glass.runtime), TorchScript / torch.export programs, a sentence-transformers / HF / PEFT directory")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="output directory (new or empty)")
    x.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "torch-export", "sentence-transformers", "hf", "peft"])
    x.add_argument("--dim", type=int, help="Matryoshka dim of the towers (default: the largest)")
    x.add_argument("--int8", action="store_true", help="onnx: add int8 graphs, shipped where they keep cosine >= 0.99 and run faster")
    x.add_argument("--merge", action="store_true", help="peft: write the LoRA merged into the causal LM")
    x.add_argument("--threads", type=int, help="onnx: onnxruntime threads for the parity and speed checks")

    h = sub.add_parser("push", help="upload an exported directory to the Hugging Face Hub")
    h.add_argument("path")
    h.add_argument("repo_id")
    h.add_argument("--private", action="store_true")

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

    d = sub.add_parser("shard", help="write a dataset spec as webdataset tar shards (read back as wds:DIR)")
    d.add_argument("data", help="any dataset spec, e.g. coco:coco1k")
    d.add_argument("--out", required=True, help="output folder: shard-NNNNNN.tar, index.json, failures.jsonl (a re-run resumes)")
    d.add_argument("--shard-size", type=int, default=1000, metavar="N", help="records (media items) per shard (default 1000)")
    d.add_argument("--no-progress", action="store_true")

    w = sub.add_parser("download", help="fetch a URL table (PixMo-style parquet) into webdataset shards, resumably")
    w.add_argument("data", help="parquet:FILE (or a folder of .parquet) with an image URL column and a caption column")
    w.add_argument("--out", required=True, help="output folder: shard-NNNNNN.tar, index.json, failures.jsonl (a re-run fetches only what is missing)")
    w.add_argument("--shard-size", type=int, default=1000, metavar="N", help="table rows per shard (default 1000)")
    w.add_argument("--image-size", type=int, default=512, metavar="S", help="resize images to longest side S, as JPEG (0: keep; default 512)")
    w.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("info", help="resolved config and parameter counts")
    i.add_argument("target", help="a config YAML or a run directory")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return p


def cmd_train(args) -> None:
    from .config import load_config, variant_config
    from .tasks import task_for
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
        from .atomic import atomic_write_json

        atomic_write_json(out / "ablation.json", results)  # first: a table that fails to print loses nothing
        print(task_for(cfg).compare(results))
        print(f"run directory: {out} (one subdirectory per variant; summary in ablation.json)")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _check_output(path: Path, flag: str) -> None:
    """Fail before any work if ``path`` cannot be written (missing folder, not a folder, read-only)."""
    import os

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EdgeGlassError(f"{flag} {path}: " + (f"{parent} is not a folder" if parent.exists() else f"folder {parent} does not exist"))
    if path.is_dir():
        raise EdgeGlassError(f"{flag} {path}: is a folder, expected a file name")
    # os.access also answers for root, for whom only a read-only file system (EROFS) says no
    if not os.access(parent, os.W_OK):
        raise EdgeGlassError(f"{flag} {path}: folder {parent} is not writable")


def cmd_eval(args) -> None:
    from .api import evaluate
    from .atomic import atomic_write_json
    from .runs import RunDir, slug
    from .tasks import task_for

    if args.json:
        _check_output(Path(args.json), "--json")
    if args.no_progress:  # also no "Loading weights" bar from transformers
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    result = evaluate(args.run_dir, args.data, progress=not args.no_progress, device=args.device)
    task = task_for(RunDir(args.run_dir).read_config())
    predictions = result.pop("predictions", None)
    print(task.table({**result, "predictions": predictions or []}, f"{args.run_dir} on {args.data or 'its test split'}"))
    if result.get("skipped"):
        print(f"skipped {result['skipped']} samples: {result.get('skipped_by_reason')}")
        for s in result["skipped_samples"][:20]:
            print(f"  {s['source']}: {s['reason']}" + (f" ({s['input']})" if s.get("input") else ""))
        if result["skipped"] > 20:
            print(f"  ... {result['skipped'] - 20} more" + (f" (all in {args.json})" if args.json else " (--json FILE lists them all)"))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    if predictions is not None:
        where = Path(args.json).with_suffix(".predictions.json") if args.json else Path(args.run_dir) / f"predictions_{slug(args.data or 'test')}.json"
        atomic_write_json(where, predictions)
        print(f"sample predictions: {where}")


def cmd_report(args) -> None:
    from .api import report

    for flag, value in (("--tsne-points", args.tsne_points), ("--queries", args.queries), ("--predictions", args.predictions)):
        if value < 0:
            raise EdgeGlassError(f"{flag} {value}: must be 0 or more")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise EdgeGlassError(f"--out {args.out}: is a file, expected a folder")
    if args.no_progress:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    start = time.time()
    html = report(args.run_dir, args.data or None, args.out, progress=not args.no_progress, device=args.device,
                  tsne_points=args.tsne_points, queries=args.queries, predictions=args.predictions,
                  formats=("png",) if args.no_svg else ("png", "svg"), refresh_run_eval=not args.no_refresh)
    figures = sorted((html.parent / "figures").glob("*.png"))
    print(f"wrote {html} ({len(figures)} figures in {html.parent / 'figures'}) in {time.time() - start:.1f} s")


def _list_files(folder: str, suffixes: set[str]) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise EdgeGlassError(f"{folder}: not a directory")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise EdgeGlassError(f"{folder}: no files with suffix {', '.join(sorted(suffixes))}")
    return files


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise EdgeGlassError(f"--texts {path}: file not found") from None
    except IsADirectoryError:
        raise EdgeGlassError(f"--texts {path}: is a directory, expected a text file (one text per line)") from None
    except OSError as exc:
        raise EdgeGlassError(f"--texts {path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EdgeGlassError(f"--texts {path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8") from None


def cmd_embed(args) -> None:
    import numpy as np

    from .api import load
    from .atomic import atomic_write_bytes
    from .errors import InputError

    try:  # embed prints its one result line; no "Loading weights" bar from transformers on stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    out = Path(args.out)
    if out.suffix not in (".npz", ".safetensors"):
        raise EdgeGlassError(f"--out {out}: expected a .npz or .safetensors file")
    if args.dim is not None and args.dim < 1:
        raise EdgeGlassError(f"--dim {args.dim}: must be a positive embedding size (leave it out for the largest)")
    _check_output(out, "--out")
    modality = "text" if args.texts else "image" if args.images else "audio"
    # every input check that needs no model comes first: a bad argument fails before any loading
    lines = _read_lines(args.texts) if args.texts else None
    folder = args.images or args.audio
    files = _list_files(folder, IMAGE_SUFFIXES if args.images else AUDIO_SUFFIXES) if lines is None else []
    model = load(args.run_dir, args.device)
    encoders = getattr(model, "encoders", {})
    if modality not in encoders:
        raise EdgeGlassError(f"{args.run_dir}: this run has no {modality} encoder (it embeds {', '.join(encoders) or 'nothing'})")
    dim = model.check_dim(args.dim)
    if lines is not None:
        ids = [f"{n}" for n, line in enumerate(lines, 1) if line.strip()]
        items = [line.strip() for line in lines if line.strip()]
        skipped = len(lines) - len(items)
    else:
        enc = encoders[modality]
        items, ids, skipped = [], [], 0
        for f in files:  # check every input first, so one bad file is reported and skipped
            try:
                enc.prepare(str(f))
                items.append(str(f))
                ids.append(str(f.relative_to(folder)))
            except InputError as err:
                print(f"skipped {err}", file=sys.stderr)
                skipped += 1
    if not items:
        raise EdgeGlassError(f"{args.texts or args.images or args.audio}: nothing to embed ({skipped} skipped)")
    emb = model.encode(modality, items, dim=dim).numpy().astype(np.float32)
    # serialised in memory, then written atomically with plain file I/O (a full disk is an OSError)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save

        data = save({"embeddings": emb}, metadata={"ids": json.dumps(ids), "modality": modality})
    else:
        import io

        buf = io.BytesIO()
        np.savez(buf, embeddings=emb, ids=np.array(ids))
        data = buf.getvalue()
    atomic_write_bytes(out, data)
    print(f"wrote {emb.shape[0]} {modality} embeddings of dim {emb.shape[1]} to {out}" + (f" ({skipped} skipped)" if skipped else ""))


def cmd_speak(args) -> None:
    from .data import speech
    from .data.formats import limit_groups, read_dataset
    from .data.samples import DataReport

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


def _shard_summary(index: dict, out: str) -> str:
    skipped = f", {index['skipped']} skipped ({', '.join(f'{n} {r}' for r, n in index['skipped_by_reason'].items())}; see {Path(out) / index['failures']})" if index["skipped"] else ""
    return (f"{index['samples']} samples in {index['records']} records, {len(index['shardlist'])} shards in {out} "
            f"({index['written']} written, {index['kept']} already done){skipped}; read it as wds:{out}")


def cmd_shard(args) -> None:
    from .data.shards import write_shards

    print(_shard_summary(write_shards(args.data, args.out, args.shard_size, progress=not args.no_progress), args.out))


def cmd_download(args) -> None:
    from .data.download import download_shards

    index = download_shards(args.data, args.out, args.shard_size, args.image_size, progress=not args.no_progress)
    print(f"{index['fetched']} images fetched; " + _shard_summary(index, args.out))


def cmd_export(args) -> None:
    import json as _json

    from .api import export
    from .runtime import MANIFEST

    out = export(args.run_dir, args.out, args.format, args.dim, args.int8, args.merge, args.threads)
    if (out / MANIFEST).is_file() and args.format == "onnx":
        manifest = _json.loads((out / MANIFEST).read_text())
        for m, tower in manifest["towers"].items():
            int8 = tower.get("int8")
            note = "" if int8 is None else (f", int8 shipped (cosine {int8['min_cosine']:.4f}, {int8['speedup_vs_fp32_onnx']:.2f}x)" if int8["shipped"]
                                            else f", int8 not shipped: {int8['why_not']}")
            print(f"{m:6} {tower['file']} {tower['size_mb']} MB, fp32 cosine to PyTorch {tower['parity']['fp32_min_cosine']:.6f}{note}")
    print(f"exported to {out}")


def cmd_push(args) -> None:
    from .api import push_to_hub

    print(push_to_hub(args.path, args.repo_id, private=args.private or None))


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
        {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "embed": cmd_embed, "export": cmd_export, "push": cmd_push,
         "speak": cmd_speak, "shard": cmd_shard, "download": cmd_download, "info": cmd_info}[args.command](args)
    except EdgeGlassError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
