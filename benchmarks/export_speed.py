"""Encoding speed of a run's towers: PyTorch fp32 / channels_last / bf16 vs ONNX Runtime fp32 / int8,
on the same real inputs in one process, plus size on disk, cosine to PyTorch fp32 and (with
--recall) Recall@K of the exported image + text towers on the run's test split vs PyTorch.

    python benchmarks/export_speed.py runs/quickstart --export export/quickstart --threads 2 --recall
    python benchmarks/export_speed.py RUN --export DIR --modalities audio --n 64

Forward-only rows time one batch of ``--batch`` preprocessed inputs (best of ``--repeats``);
end-to-end rows time decoding + preprocessing + forward of ``--n`` inputs. int8 rows use the
export's int8 graph if it shipped one, else quantize here the same way (so the table also shows
the int8 graphs the export refused, and why).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import edge_glass
from edge_glass.encoders.base import EncoderOutput, frozen_output
from edge_glass.data.samples import DataReport
from edge_glass.eval.retrieval import recall_at_k
from edge_glass.export.onnx import calibration_batches, export_run, quantize, run_items
from edge_glass.runtime import MANIFEST, ExportedModel, unit_rows
from edge_glass.tasks.alignment import split_samples


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_forward(model, m: str, batch, dim: int, channels_last: bool, bf16: bool):
    """One batch through the PyTorch encoder + head. Image rows pick the memory format
    (the encoder itself runs channels_last since EfficientNetLiteEncoder version 2)."""
    enc, head = model.encoders[m].ensure_loaded(), model.core.heads[m]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def encode():
        if m != "image" or not hasattr(enc, "net"):
            return enc.encode_batch(batch)
        enc.net.to(memory_format=fmt)
        fmap = enc.net.extract_features(batch.contiguous(memory_format=fmt))
        tokens = fmap.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), tokens.mean(1))

    def run():
        with torch.no_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()):
            return head.at_dim(frozen_output(encode()), dim).float()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--export", required=True, help="export directory (written with --int8 at --dim if missing)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=128, help="inputs for the end-to-end rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modalities", nargs="+")
    ap.add_argument("--recall", action="store_true", help="also Recall@K on the run's test split (image + text towers)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.export)
    if not (out / MANIFEST).is_file():
        export_run(args.run, out, dim=args.dim, int8=True, threads=args.threads)
    manifest = json.loads((out / MANIFEST).read_text())
    dim = manifest["dim"]
    model = edge_glass.load(args.run, "cpu")
    for enc in model.encoders.values():  # "PyTorch" rows run PyTorch even for a run trained with backend onnxruntime
        enc.cfg = enc.cfg.model_copy(update={"backend": "torch"})
    fp32 = ExportedModel(out, precision="fp32", threads=args.threads)
    int8_files: dict[str, str] = {}
    rows, results = [], {"run": args.run, "export": str(out), "dim": dim, "threads": args.threads, "batch": args.batch, "rows": []}
    tmp = Path(tempfile.mkdtemp())
    for m in args.modalities or list(manifest["towers"]):
        tower = manifest["towers"][m]
        items = run_items(model, "test", m, args.n)
        batch_items = items[: args.batch]
        arrays = fp32.prepare(m, batch_items)
        tensors = tuple(torch.from_numpy(a) for a in arrays)
        torch_batch = model.encoders[m].collate([model.encoders[m].prepare(it) for it in batch_items])
        reference = torch_forward(model, m, torch_batch, dim, False, False)().numpy()
        unit = {"image": "img/s", "text": "texts/s", "audio": "audio s/s"}[m]
        seconds = sum(len(a) / 16000 for a in map(_audio_len, batch_items)) if m == "audio" else None

        def rate(t: float, n: int, audio_s: float | None = None) -> float:
            return (audio_s / t) if audio_s is not None else n / t

        variants = [("PyTorch fp32", False, False)]
        if m == "image":
            variants = [("PyTorch fp32 (NCHW)", False, False), ("PyTorch fp32 channels_last (the encoder's default)", True, False),
                        ("PyTorch channels_last + bf16", True, True)]
        else:
            variants += [("PyTorch bf16 autocast", False, True)]
        for name, cl, bf16 in variants:
            fn = torch_forward(model, m, torch_batch, dim, cl, bf16)
            t = best_of(fn, args.repeats)
            cos = float((unit_rows(fn().numpy()) * unit_rows(reference)).sum(1).min())
            rows.append((m, name, rate(t, len(batch_items), seconds), unit, cos, None))
        int8 = tower.get("int8", {})
        int8_file = int8.get("file")
        if not int8_file:
            int8_file = str(tmp / f"{m}.int8.onnx")
            calibration = calibration_batches(model, fp32, m, 128) if m == "image" else []
            quantize(out / tower["file"], Path(int8_file), m, calibration, tower["inputs"])
        int8_files[m] = int8_file
        for name, file in (("ONNX Runtime fp32", tower["file"]), ("ONNX Runtime int8" + ("" if int8.get("shipped") else " (not shipped)"), int8_file)):
            session = fp32.session(m, file)
            feed = dict(zip(tower["inputs"], arrays))
            t = best_of(lambda: session.run(None, feed), args.repeats)
            got = session.run(None, feed)[0]
            cos = float((unit_rows(got) * unit_rows(reference)).sum(1).min())
            size = Path(file if Path(file).is_absolute() else out / file).stat().st_size / 2**20
            rows.append((m, name, rate(t, len(batch_items), seconds), unit, cos, size))
        # end to end (decode + preprocess + forward) over n inputs
        t0 = time.perf_counter()
        model.encode(m, items, dim)
        t_torch = time.perf_counter() - t0
        auto = ExportedModel(out, threads=args.threads)
        t0 = time.perf_counter()
        auto.encode(m, items)
        t_onnx = time.perf_counter() - t0
        n_seconds = sum(len(a) / 16000 for a in map(_audio_len, items)) if m == "audio" else None
        rows.append((m, f"end to end, {len(items)} inputs: PyTorch fp32", rate(t_torch, len(items), n_seconds), unit, None, None))
        rows.append((m, f"end to end, {len(items)} inputs: ONNX (auto: {Path(auto.file(m)).name})", rate(t_onnx, len(items), n_seconds), unit, None, None))
    print(f"dim {dim}, {args.threads} threads, forward rows: one batch of {args.batch}")
    print(f"| tower | backend | speed | cosine to PyTorch fp32 (min) | size MB |\n|---|---|---|---|---|")
    for m, name, r, unit, cos, size in rows:
        print(f"| {m} | {name} | {r:.1f} {unit} | {'' if cos is None else f'{cos:.5f}'} | {'' if size is None else f'{size:.1f}'} |")
        results["rows"].append({"tower": m, "backend": name, "speed": round(r, 2), "unit": unit, "min_cosine": cos, "size_mb": size})
    if args.recall:
        results["recall"] = recall_table(model, out, dim, args.threads, int8_files)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _audio_len(item) -> np.ndarray:
    from edge_glass.media.audio import load_audio

    return load_audio(item)


def recall_table(model, out: Path, dim: int, threads: int, int8_files: dict[str, str]) -> dict:
    """Recall@K on the run's test split with PyTorch, the fp32 export, the auto export (int8
    where shipped) and the int8 graphs of both towers whether shipped or not."""
    samples = [s for s in split_samples(model, "test", DataReport()) if s.image is not None and s.text]
    images = sorted({s.image for s in samples})
    row = {im: i for i, im in enumerate(images)}
    texts = [s.text for s in samples]
    owner = torch.tensor([row[s.image] for s in samples])
    positives = owner[:, None] == torch.arange(len(images))[None]
    ks = [1, 5, 10]

    def recalls(img, txt):
        i, t = torch.as_tensor(np.asarray(img)), torch.as_tensor(np.asarray(txt))
        return {"text_to_image": recall_at_k(t, i, positives, ks), "image_to_text": recall_at_k(i, t, positives.T, ks)}

    table = {"images": len(images), "texts": len(texts),
             "PyTorch": recalls(model.encode_images(images, dim).numpy(), model.encode_texts(texts, dim).numpy())}
    for precision in ("fp32", "auto"):
        rt = ExportedModel(out, precision=precision, threads=threads)
        table[f"ONNX {precision}"] = recalls(rt.encode_images(images), rt.encode_texts(texts))
    rt = ExportedModel(out, precision="fp32", threads=threads)
    table["ONNX int8, both towers"] = recalls(rt.encode("image", images, file=int8_files.get("image")), rt.encode("text", texts, file=int8_files.get("text")))
    print(f"\nRecall@K at dim {dim} on the run's test split ({len(images)} images, {len(texts)} captions)")
    print("| encoder | " + " | ".join(f"{d} R@{k}" for d in ("t2i", "i2t") for k in ks) + " |\n|---|" + "---|" * 6)
    for name in ("PyTorch", "ONNX fp32", "ONNX auto", "ONNX int8, both towers"):
        r = table[name]
        print(f"| {name} | " + " | ".join(f"{r[d][f'R@{k}']:.2f}" for d in ("text_to_image", "image_to_text") for k in ks) + " |")
    return table


if __name__ == "__main__":
    main()
