"""``edge-glass export RUN --out DIR --format torch-export`` for NL-MM runs: each modality's
embedding path (encoder + TTT adapter -> central memory of that modality alone -> pooled ->
Matryoshka embedding, unit rows) as a ``torch.export`` program, and as TorchScript (traced; the
seeds' format) where tracing reproduces it.

    DIR/embed_image.pt2     torch.export.load(...).module()(pixels (B, 3, S, S) float32)              -> (B, dim)
    DIR/embed_audio.pt2     ...(log-mel (B, T_max, n_mels) float32, frames (B,) int64)                  -> (B, dim)
    DIR/embed_text.pt2      ...(tokens (B, L_max) int64 <bos> words <eos> padded, lengths (B,) int64)  -> (B, dim)
    DIR/context_image.pt2   ...(pixels) -> (ctx (B, P, D), ctx_mask (B, P)): the image's memory, as the decoder reads it
    DIR/context_audio.pt2   ...(log-mel, frames) -> (ctx, ctx_mask)
    DIR/caption_decoder_{image,audio}.pt2   ...(ctx, ctx_mask, tokens (B, W) padded, lengths (B,)) -> logits (B, W, V),
                            W = eval.max_new_tokens + 1; ``generate(context, decoder, ...)`` below is the greedy loop
                            (captions from photos, transcripts from speech), equal to ``model.caption`` (tested)
    DIR/*.torchscript.pt    torch.jit.load(...) with the same inputs, for each program tracing reproduces
    DIR/word_tokenizer.json, DIR/edge_glass_export.json (inputs, preprocessing, shapes, parity, generation ids)

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

from ..nlmm.model import CONTEXT

FORMAT = "torch-export"
PARITY_RTOL = 1e-4  # tests/numerics.py FP32_NET: the same ops, traced


class EmbedTower(nn.Module):
    """One modality's embedding path of an NL-MM network, as a module of plain tensor inputs."""

    def __init__(self, net: nn.Module, modality: str, dim: int):
        super().__init__()
        self.net, self.modality, self.dim = net.embedding_path(modality), modality, dim

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        tokens, mask, _ = self.net.encode(self.modality, _single(self.modality, x, lengths))
        ctx, ctx_mask = self.net.memory({self.modality: (tokens, mask)})
        return F.normalize(self.net.embed_memory(ctx, ctx_mask)[:, : self.dim].float(), dim=-1)


def example_samples(model: Any, modality: str, batch: int) -> list[Any]:
    """The first ``batch`` samples with this modality of the run's own test split (then val, train),
    as split.json records them."""
    from ..data.samples import DataReport
    from ..errors import EdgeGlassError
    from ..tasks.alignment import split_samples

    out: list[Any] = []
    for name in ("test", "val", "train"):
        try:
            part = split_samples(model, name, DataReport(), prefixed=True)
        except EdgeGlassError:  # an empty split
            continue
        out += [s for s in part if getattr(s, modality) is not None]
        if len(out) >= batch:
            break
    return out[:batch]


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


class ContextTower(nn.Module):
    """The memory of one modality alone, as the decoders read it: (ctx (B, P, D), ctx_mask (B, P))."""

    def __init__(self, net: nn.Module, modality: str):
        super().__init__()
        self.net, self.modality = net.embedding_path(modality), modality

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens, mask, _ = self.net.encode(self.modality, _single(self.modality, x, lengths))
        return self.net.memory({self.modality: (tokens, mask)})


class CaptionDecoder(nn.Module):
    """The causal text decoder over a memory: (ctx, ctx_mask, tokens (B, L) padded, lengths (B,))
    -> logits (B, L, V); position i predicts token i + 1, so a row's next token is read at
    ``lengths - 1`` (what follows a row's length does not reach it: the decoder is causal)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.decoder = net.text_decoder

    def forward(self, ctx: Tensor, ctx_mask: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        token_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return self.decoder(ctx, ctx_mask, tokens, token_mask)


def _single(modality: str, x: Tensor, lengths: Tensor | None) -> dict[str, Tensor]:
    """A batch of one modality, every row present, as NLMM.encode takes it."""
    ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if modality == "image":
        return {"image": x, "image_mask": ones}
    return {modality: x, f"{modality}_lengths": lengths, f"{modality}_mask": ones}


def _prefixes(ids: list[list[int]], tokenizer: Any, width: int) -> tuple[Tensor, Tensor]:
    """Greedy outputs as decoder inputs of static width: <bos> + ids, padded; lengths spread over
    1..full so that the parity check covers short and long prefixes."""
    tokens = torch.full((len(ids), width), tokenizer.pad_id, dtype=torch.long)
    lengths = torch.empty(len(ids), dtype=torch.long)
    for i, row in enumerate(ids):
        full = [tokenizer.bos_id, *row][:width]
        tokens[i, : len(full)] = torch.tensor(full)
        lengths[i] = max(1, len(full) - i % 3)
    return tokens, lengths


def generate(context: Any, decoder: Any, inputs: tuple[Tensor, ...], bos_id: int, eos_id: int, pad_id: int,
             max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding with the exported programs (``torch.export.load(f).module()``): the
    memory once, then one decoder pass per new token over the static-width padded prefix.
    Returns ids without <bos> / <eos>, as ``NLMM.generate``."""
    with torch.no_grad():
        ctx, ctx_mask = context(*inputs)
        B, width = ctx.shape[0], max_new_tokens + 1
        tokens = torch.full((B, width), pad_id, dtype=torch.long)
        tokens[:, 0] = bos_id
        lengths = torch.ones(B, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        rows = torch.arange(B)
        for step in range(max_new_tokens):
            nxt = decoder(ctx, ctx_mask, tokens, lengths)[rows, lengths - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            tokens[:, step + 1] = nxt
            lengths += 1
            done |= nxt == eos_id
            if bool(done.all()):
                break
    out = []
    for row in tokens[:, 1 : int(lengths.max())].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def _export_program(module: nn.Module, args: tuple[Tensor, ...], stem: Path, manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """torch.export ``module`` at ``args`` into ``stem``.pt2, reload it and check its output against
    the module (PARITY_RTOL of the scale; a tuple's first tensor, the rest equal); then TorchScript
    (traced) into ``stem``.torchscript.pt where tracing reproduces it. Records parity in ``manifest``."""
    from ..errors import EdgeGlassError

    def main(out: Any) -> Tensor:
        return out[0] if isinstance(out, tuple) else out

    def same_rest(a: Any, b: Any) -> bool:
        return not isinstance(a, tuple) or all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))

    with torch.no_grad():
        ref = module(*args)
        program = torch.export.export(module, args, strict=False)
    path = stem.with_suffix(".pt2")
    torch.export.save(program, str(path))
    with torch.no_grad():
        got = torch.export.load(str(path)).module()(*args)
    gap = _gap(main(got), main(ref))
    if not (gap["ratio"] <= PARITY_RTOL and same_rest(got, ref)):
        raise EdgeGlassError(f"export: the {key} program differs from the model ({gap}); nothing was written")
    manifest["parity"][key] = gap
    ts = stem.with_name(stem.name + ".torchscript.pt")
    try:  # TorchScript, as the seeds shipped: traced with the same inputs, kept where it reproduces the model
        with torch.no_grad():
            torch.jit.trace(module, args, check_trace=False).save(str(ts))
            ts_out = torch.jit.load(str(ts))(*args)
        ts_gap = _gap(main(ts_out), main(ref))
        ok = ts_gap["ratio"] <= PARITY_RTOL and same_rest(ts_out, ref)
        manifest["torchscript"][key] = {"file": ts.name, "parity": ts_gap} if ok else {"error": f"parity {ts_gap}"}
        if not ok:
            ts.unlink()
    except Exception as exc:  # noqa: BLE001  tracing is best effort; torch.export is the format
        manifest["torchscript"][key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        ts.unlink(missing_ok=True)
    return {"file": path.name}


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
                                "dim": dim, "batch": batch, "programs": {}, "generation": {}, "torchscript": {}, "parity": {},
                                "preprocess": {"image": {"size": cfg.data.image_size, "layout": "(B, 3, S, S) RGB, (pixel / 255 - 0.5) / 0.5"},
                                               "audio": {"sample_rate": 16000, "n_mels": cfg.data.n_mels, "n_fft": 400, "hop": 160,
                                                         "max_frames": math.ceil(cfg.data.max_audio_seconds * 100),
                                                         "log_mel": "(log10(max(mel, 1e-10)) + 4) / 4, padded with -1.5"},
                                               "text": {"max_tokens": cfg.data.max_text_tokens + 2, "tokenizer": "word_tokenizer.json"}}}
    with atomic_dir(target) as work:
        examples: dict[str, tuple[Tensor, ...]] = {}
        for m in net.modalities:
            if m in net.feature_in:  # the program would have to hold the frozen backbone too
                manifest.setdefault("not_exported", {})[m] = (f"the {m} encoder reads the frozen backbone's token features "
                                                              f"(backbones.{m}); this format exports raw-media encoders only")
                continue
            ex = example_inputs(model, m, batch)
            if len(ex["x"]) < batch:  # fewer held-out items than the static batch: repeat them
                reps = math.ceil(batch / len(ex["x"]))
                ex = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:batch] for k, v in ex.items()}
            examples[m] = tuple(ex.values())
            entry = _export_program(EmbedTower(net, m, dim).eval(), examples[m], work / f"embed_{m}", manifest, m)
            manifest["programs"][m] = {**entry, "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in ex.items()}}
        if not manifest["programs"]:
            raise EdgeGlassError(f"export --format {FORMAT}: every encoder of {run.path} reads backbone features; nothing to export")
        for m in (c for c in CONTEXT if c in examples):  # captions / transcripts: memory program + causal decoder program
            context = ContextTower(net, m).eval()
            name = f"context_{m}"
            entry = _export_program(context, examples[m], work / name, manifest, name)
            with torch.no_grad():
                ctx, ctx_mask = context(*examples[m])
                ids = net.generate(ctx, ctx_mask, model.tokenizer.bos_id, model.tokenizer.eos_id, cfg.eval.max_new_tokens)
            tokens, lengths = _prefixes(ids, model.tokenizer, cfg.eval.max_new_tokens + 1)
            dec_name = f"caption_decoder_{m}"
            dec = _export_program(CaptionDecoder(net).eval(), (ctx, ctx_mask, tokens, lengths), work / dec_name, manifest, dec_name)
            manifest["generation"][m] = {"context": entry["file"], "decoder": dec["file"], "max_new_tokens": cfg.eval.max_new_tokens,
                                         "bos_id": model.tokenizer.bos_id, "eos_id": model.tokenizer.eos_id,
                                         "pad_id": model.tokenizer.pad_id}
        model.tokenizer.save(work / "word_tokenizer.json")
        (work / MARKER).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return target
