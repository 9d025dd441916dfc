"""``edge-glass export RUN --out DIR --format torch-export`` for NL-MM runs: each modality's
embedding path (encoder + TTT adapter -> central memory of that modality alone -> pooled ->
Matryoshka embedding, unit rows) as a ``torch.export`` program, and as TorchScript (traced; the
seeds' format) where tracing reproduces it.

    DIR/embed_image.pt2     torch.export.load(...).module()(pixels (B, 3, S, S) float32)              -> (B, dim)
    DIR/embed_audio.pt2     ...(log-mel (B, T_max, n_mels) float32, frames (B,) int64)                  -> (B, dim)
    DIR/embed_text.pt2      ...(tokens (B, L_max) int64 <bos> words <eos> padded, lengths (B,) int64)  -> (B, dim)
    DIR/embed_*.torchscript.pt   torch.jit.load(...) with the same inputs
    DIR/word_tokenizer.json, DIR/edge_glass_export.json (inputs, preprocessing, shapes, parity)

Shapes are static (B = ``batch``, audio padded to data.max_audio_seconds, text to
data.max_text_tokens + 2): the fast-weight chunk loop and the TTT mini-batch loop are unrolled for
those lengths, and shorter inputs ride on the masks (``frames``, ``lengths``). Every program is
checked before the directory appears: on the run's own test samples its output must match the
PyTorch model within PARITY_RTOL of the values' scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "torch-export"
PARITY_RTOL = 1e-4  # tests/numerics.py FP32_NET: the same ops, traced


class EmbedTower(nn.Module):
    """One modality's embedding path of an NL-MM network, as a module of plain tensor inputs."""

    def __init__(self, net: nn.Module, modality: str, dim: int):
        super().__init__()
        self.net, self.modality, self.dim = net, modality, dim

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=x.device)
        if self.modality == "image":
            batch = {"image": x, "image_mask": ones}
        elif self.modality == "audio":
            batch = {"audio": x, "audio_lengths": lengths, "audio_mask": ones}
        else:
            batch = {"text": x, "text_lengths": lengths, "text_mask": ones}
        tokens, mask, _ = self.net.encode(self.modality, batch)
        ctx, ctx_mask = self.net.memory({self.modality: (tokens, mask)})
        return F.normalize(self.net.embed_memory(ctx, ctx_mask)[:, : self.dim].float(), dim=-1)


def example_samples(model: Any, modality: str, batch: int) -> list[Any]:
    """The first ``batch`` samples with this modality of the run's own test split (then val, train)."""
    from ..data.samples import DataReport
    from ..tasks.nlmm import split_data

    parts = split_data(model.cfg, DataReport())[0]
    return [s for name in ("test", "val", "train") for s in parts[name] if getattr(s, modality) is not None][: batch]


def example_inputs(model: Any, modality: str, batch: int) -> dict[str, Tensor]:
    """``example_samples`` of one modality as a padded batch (static max shapes), as a user pads."""
    from ..data.samples import DataReport
    from ..nlmm.data import build_nlmm_data

    cfg = model.cfg
    samples = [replace(s, **{m: None for m in ("image", "audio", "text") if m != modality}) for s in example_samples(model, modality, batch)]
    data = build_nlmm_data(samples, model.tokenizer, model.spec, DataReport())
    b = data.batch(list(range(len(data))))
    if modality == "image":
        return {"x": b["image"]}
    if modality == "audio":
        T = math.ceil(cfg.data.max_audio_seconds * 100)  # 10 ms frames
        mel = torch.full((len(data), T, cfg.data.n_mels), data.audio_pad_value)
        mel[:, : b["audio"].shape[1]] = b["audio"][:, :T]
        return {"x": mel, "lengths": b["audio_lengths"].clamp(max=T)}
    L = cfg.data.max_text_tokens + 2
    text = torch.full((len(data), L), data.text_pad_id, dtype=torch.long)
    text[:, : b["text"].shape[1]] = b["text"][:, :L]
    return {"x": text, "lengths": b["text_lengths"].clamp(max=L)}


def _gap(a: Tensor, b: Tensor) -> dict[str, float]:
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    return {"max_abs_diff": diff, "scale": scale, "ratio": diff / scale if scale else 0.0}


def export_nlmm(run_dir: str | Path, out: str | Path, batch: int = 8, dim: int | None = None) -> Path:
    """Write every modality's embedding program of an NL-MM run into ``out`` (see module doc)."""
    from ..atomic import atomic_dir
    from ..errors import EdgeGlassError
    from ..runs import RunDir
    from ..tasks import task_class
    from .formats import MARKER, _check_target, _version

    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.task != "nlmm":
        raise EdgeGlassError(f"export --format {FORMAT}: {run.path} is a {cfg.task} run; this format exports NL-MM runs")
    model = task_class("nlmm").load_run(run, "cpu")
    net = model.net.eval()
    dim = dim or cfg.model.embed_dims[0]
    if dim not in cfg.model.embed_dims:
        raise EdgeGlassError(f"--dim {dim}: not one of the trained dims {cfg.model.embed_dims}")
    target = _check_target(out)
    manifest: dict[str, Any] = {"format": FORMAT, "edge_glass_version": _version(), "source_run": str(run.path), "run_name": cfg.name,
                                "dim": dim, "batch": batch, "programs": {}, "torchscript": {}, "parity": {},
                                "preprocess": {"image": {"size": cfg.data.image_size, "layout": "(B, 3, S, S) RGB, (pixel / 255 - 0.5) / 0.5"},
                                               "audio": {"sample_rate": 16000, "n_mels": cfg.data.n_mels, "n_fft": 400, "hop": 160,
                                                         "max_frames": math.ceil(cfg.data.max_audio_seconds * 100),
                                                         "log_mel": "(log10(max(mel, 1e-10)) + 4) / 4, padded with -1.5"},
                                               "text": {"max_tokens": cfg.data.max_text_tokens + 2, "tokenizer": "word_tokenizer.json"}}}
    with atomic_dir(target) as work:
        for m in net.modalities:
            tower = EmbedTower(net, m, dim).eval()
            ex = example_inputs(model, m, batch)
            if len(ex["x"]) < batch:  # fewer held-out items than the static batch: repeat them
                reps = math.ceil(batch / len(ex["x"]))
                ex = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:batch] for k, v in ex.items()}
            args = tuple(ex.values())
            with torch.no_grad():
                ref = tower(*args)
                program = torch.export.export(tower, args, strict=False)
            torch.export.save(program, str(work / f"embed_{m}.pt2"))
            loaded = torch.export.load(str(work / f"embed_{m}.pt2")).module()
            with torch.no_grad():
                got = loaded(*args)
            gap = _gap(got, ref)
            if not gap["ratio"] <= PARITY_RTOL:
                raise EdgeGlassError(f"export: the {m} program differs from the model ({gap}); nothing was written")
            manifest["programs"][m] = {"file": f"embed_{m}.pt2", "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in ex.items()}}
            manifest["parity"][m] = gap
            try:  # TorchScript, as the seeds shipped: traced with the same inputs, kept where it reproduces the model
                with torch.no_grad():
                    traced = torch.jit.trace(tower, args, check_trace=False)
                traced.save(str(work / f"embed_{m}.torchscript.pt"))
                with torch.no_grad():
                    ts_gap = _gap(torch.jit.load(str(work / f"embed_{m}.torchscript.pt"))(*args), ref)
                ok = ts_gap["ratio"] <= PARITY_RTOL
                manifest["torchscript"][m] = {"file": f"embed_{m}.torchscript.pt", "parity": ts_gap} if ok else {"error": f"parity {ts_gap}"}
                if not ok:
                    (work / f"embed_{m}.torchscript.pt").unlink()
            except Exception as exc:  # noqa: BLE001  tracing is best effort; torch.export is the format
                manifest["torchscript"][m] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        model.tokenizer.save(work / "word_tokenizer.json")
        (work / MARKER).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return target
