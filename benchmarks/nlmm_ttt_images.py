"""NL-MM test-time training under an image shift: a photo-trained run (coco1k) shown easy-VQA's
synthetic shapes (one coloured circle, rectangle or triangle on a plain background), with and
without adaptation of the image encoder's TTT adapters.

    python benchmarks/nlmm_ttt_images.py RUN [--n 600] [--json out.json]

Modes (edge_glass.nlmm.evaluate.adaptation on the image encoder; everything else as trained):
    none      the adapters' inner learning rate set to 0 (no adaptation)
    sequence  online adaptation within each image, reset for the next (as trained)
    stream    the adapters' fast weights carried from image to image through the shifted set in order

Per mode, on the shifted images (easy-VQA test images whose questions give both their shape and
their colour) and on the run's own held-out photos (no shift):
    recon_mse     patch reconstruction error of the image decoder from the image's own memory
                  (pixels in [-1, 1]; what the model was trained to do, the adapter's nearest task)
    probe_shape   5-fold logistic-regression accuracy of the shape (3 classes) from the embedding
    probe_color   the same for the colour (8 classes)
    zeroshot_*    nearest class-name text embedding ("circle", ... / "red", ...), no training
The probes measure what the embedding keeps about the shifted images; chance is the majority class.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edge_glass  # noqa: E402
from edge_glass.data.samples import DataReport, Sample  # noqa: E402
from edge_glass.data.vqa import read_easy_vqa  # noqa: E402
from edge_glass.features.cache import feature_cache_dir  # noqa: E402
from edge_glass.nlmm.data import NLMMData, build_nlmm_data  # noqa: E402
from edge_glass.nlmm.evaluate import adaptation, class_embeddings, embed_samples, to  # noqa: E402
from edge_glass.nlmm.model import patchify  # noqa: E402
from edge_glass.tasks.alignment import split_samples  # noqa: E402

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "brown", "teal")


def labelled_shapes(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Up to ``n`` easy-VQA test images with their shape and colour (from the answers of their questions)."""
    qa, _ = read_easy_vqa("test")
    shape: dict[str, str] = {}
    color: dict[str, str] = {}
    for q in qa:
        if q.answer in SHAPES and "shape" in q.question:
            shape[q.image] = q.answer
        elif q.answer in COLORS and "color" in q.question:
            color[q.image] = q.answer
    images = sorted(i for i in shape if i in color)[:n]
    return images, np.array([SHAPES.index(shape[i]) for i in images]), np.array([COLORS.index(color[i]) for i in images])


def probe(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    return round(100.0 * float(cross_val_score(clf, x, y, cv=folds).mean()), 2)


@torch.no_grad()
def reconstruction_mse(net, data: NLMMData, batch_size: int) -> float:
    total, count = 0.0, 0
    for s in range(0, len(data), batch_size):
        b = to(data.batch(torch.arange(s, min(len(data), s + batch_size))), net.device)
        ctx, mask = net.context(net.encode_all(b, ["image"]), ["image"])
        pred = net.image_patches(ctx, mask, b["image"].shape[-2:])
        target = patchify(b["image"], net.cfg.patch_size)
        total += float((pred.float() - target).pow(2).mean(-1).sum())
        count += target.shape[0] * target.shape[1]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=600, help="shifted images (easy-VQA test)")
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.time()
    model = edge_glass.load(args.run, "cpu")
    net, cfg = model.net, model.cfg
    if "image" not in net.modalities:
        raise SystemExit(f"{args.run}: the run has no image encoder")
    images, shape, color = labelled_shapes(args.n)
    backbones = None if model.backbones is None else replace(model.backbones, cache_dir=feature_cache_dir(cfg))  # encoded once
    shifted = build_nlmm_data([Sample(group=str(i), source=p, image=p) for i, p in enumerate(images)], None, model.spec,
                              DataReport(), workers=2, backbones=backbones)
    photos = [p for p in dict.fromkeys(s.image for s in split_samples(model, "test", DataReport()) if s.image is not None)]
    clean = build_nlmm_data([Sample(group=str(i), source=str(p), image=p) for i, p in enumerate(photos)], None, model.spec,
                            DataReport(), workers=2, backbones=backbones)
    text_side = build_nlmm_data([Sample(group="w", source="class names", text="circle")], model.tokenizer, model.spec,
                                DataReport(), backbones=backbones)
    words = {"shape": SHAPES, "color": COLORS}
    classes = {k: class_embeddings(net, text_side, model.tokenizer, w) for k, w in words.items()}
    out: dict = {"run": args.run, "n_shifted": len(shifted), "n_photos": len(clean),
                 "majority": {"shape": round(100.0 * Counter(shape.tolist()).most_common(1)[0][1] / len(shape), 2),
                              "color": round(100.0 * Counter(color.tolist()).most_common(1)[0][1] / len(color), 2)},
                 "results": {}}
    for mode in ("none", "sequence", "stream"):
        with adaptation(net, mode, ["image"]):
            row = {"recon_mse": reconstruction_mse(net, shifted, cfg.eval.batch_size)}
            net.reset_stream()  # the stream starts over for the embeddings
            emb = embed_samples(net, shifted, "image", torch.arange(len(shifted)), cfg.eval.batch_size)
            d = max(emb)
            x = emb[d].numpy()
            row["probe_shape"], row["probe_color"] = probe(x, shape), probe(x, color)
            for k, y in (("shape", shape), ("color", color)):
                pred = (emb[d] @ classes[k][d].t()).argmax(1).numpy()
                row[f"zeroshot_{k}"] = round(100.0 * float((pred == y).mean()), 2)
            net.reset_stream()
            row["photos_recon_mse"] = reconstruction_mse(net, clean, cfg.eval.batch_size)
        out["results"][mode] = row
        print(f"{mode:9} shapes: recon {row['recon_mse']:.4f}  probe shape {row['probe_shape']:6.2f} colour {row['probe_color']:6.2f}"
              f"  zero-shot shape {row['zeroshot_shape']:6.2f} colour {row['zeroshot_color']:6.2f}"
              f"   | held-out photos: recon {row['photos_recon_mse']:.4f}", flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    print(f"majority class: shape {out['majority']['shape']}, colour {out['majority']['color']}; {out['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
