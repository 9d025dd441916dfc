"""A trained NL-MM run from Python (``edge_glass.load(run)`` returns this for nlmm runs).

    model = edge_glass.load("runs/nlmm_tiny")
    model.caption(images=["photo.jpg"])                 # ["a man riding a wave on a surfboard"]
    model.caption(images=["photo.jpg"], audio=["q.wav"])  # from the fused memory of both
    model.transcribe(["clip.wav"])                      # transcripts from the audio memory
    model.embed("image", ["photo.jpg"], dim=32)         # (1, 32) unit rows; "audio", "text" alike
    model.adapt(["a.wav", "b.wav", ...], "audio")       # test-time training over a stream (one voice)
    model.transcribe(["c.wav"])                         #   ... then used until model.reset()

Reset semantics: every call adapts online within each item (``sequence``, as trained). ``adapt``
switches to ``stream``: the adapters' fast weights are carried from item to item through the given
stream and every later call, until ``reset()`` (back to W_0 and per-item adaptation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..data.samples import DataReport, Sample
from ..decoders.prompt import WordTokenizer
from ..errors import DataError, InputError
from .data import Backbones, MediaSpec, NLMMData, build_nlmm_data
from .model import NLMM


class NLMMModel(nn.Module):
    def __init__(self, cfg: Any, net: NLMM, tokenizer: WordTokenizer, spec: MediaSpec, run_dir: str | Path | None = None,
                 backbones: Backbones | None = None):
        super().__init__()
        self.cfg, self.net, self.tokenizer, self.spec = cfg, net, tokenizer, spec
        self.run_dir = None if run_dir is None else str(run_dir)
        self.backbones = backbones  # frozen encoders feeding some NL-MM encoders (their inputs encoded live)
        self.backbone_encoders = nn.ModuleDict(backbones.encoders if backbones is not None else {})  # moved by .to()
        self.net.eval()

    @property
    def device(self) -> torch.device:
        return self.net.device

    def data(self, items: dict[str, Sequence[Any] | None], what: str = "input") -> NLMMData:
        """Samples made of the given items (position i of every list is sample i); a bad item raises."""
        n = max(len(v) for v in items.values() if v is not None)
        for k, v in items.items():
            if v is not None and len(v) != n:
                raise InputError(what, f"{len(v)} {k} items for {n} samples")
        samples = [Sample(group=str(i), source=f"{what} {i}", **{k: (v[i] if v is not None else None) for k, v in items.items()})
                   for i in range(n)]
        report = DataReport()
        try:
            data = build_nlmm_data(samples, self.tokenizer if items.get("text") is not None else None, self.spec, report,
                                   backbones=self.backbones)
        except DataError:  # every item was unusable: the report names the first
            if not report.skipped:
                raise
        if report.skipped:
            bad = report.skipped[0]
            raise InputError(bad.input or bad.source, bad.reason)
        return data

    def _batches(self, data: NLMMData, batch_size: int = 64):
        for s in range(0, len(data), batch_size):
            yield {k: v.to(self.device) for k, v in data.batch(list(range(s, min(len(data), s + batch_size)))).items()}

    @torch.no_grad()
    def embed(self, modality: str, items: Sequence[Any], dim: int | None = None) -> torch.Tensor:
        """(N, dim) unit embeddings of images / audio (paths, bytes) or texts; default the largest dim."""
        if modality not in self.net.modalities:
            raise InputError("embed", f"this model has no {modality} encoder (it has {', '.join(self.net.modalities)})")
        dim = dim or self.net.cfg.embed_dims[0]
        if dim not in self.net.cfg.embed_dims:
            raise InputError("embed", f"dim {dim} is not one of the trained dims {self.net.cfg.embed_dims}")
        data = self.data({modality: list(items)}, f"embed {modality}")
        return torch.cat([self.net.embeddings(b, modality, [dim])[dim].cpu() for b in self._batches(data)])

    # -- what `edge-glass embed` asks of a loaded run
    @property
    def encoders(self) -> dict[str, "_Input"]:
        return {m: _Input(self, m) for m in self.net.modalities}

    def check_dim(self, dim: int | None) -> int:
        dims = self.net.cfg.embed_dims
        if dim is None:
            return dims[0]
        if dim not in dims:
            raise InputError("--dim", f"{dim} is not one of the trained dims {dims}")
        return dim

    def encode(self, modality: str, items: Sequence[Any], dim: int | None = None) -> torch.Tensor:
        return self.embed(modality, items, dim)

    @torch.no_grad()
    def caption(self, images: Sequence[Any] | None = None, audio: Sequence[Any] | None = None,
                max_new_tokens: int | None = None) -> list[str]:
        """Captions generated from the memory of the images, the audio, or both (fused)."""
        names = [m for m, v in (("image", images), ("audio", audio)) if v is not None]
        if not names:
            raise InputError("caption", "give images=, audio= or both")
        data = self.data({"image": None if images is None else list(images), "audio": None if audio is None else list(audio)}, "caption")
        out = []
        for b in self._batches(data):
            ctx, mask = self.net.context(self.net.encode_all(b, names), names)
            out += [self.tokenizer.decode(ids) for ids in self.net.generate(ctx, mask, self.tokenizer.bos_id, self.tokenizer.eos_id,
                                                                           max_new_tokens or self.cfg.eval.max_new_tokens)]
        return out

    def transcribe(self, audio: Sequence[Any], max_new_tokens: int | None = None) -> list[str]:
        """Transcripts of speech clips, generated from the audio memory."""
        return self.caption(audio=audio, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def adapt(self, stream: Iterable[Any], modality: str = "audio") -> "NLMMModel":
        """Test-time training over a stream of items of one modality (in order); the adapted fast
        weights are kept for every later call until ``reset()``."""
        self.net.ttt_mode = "stream"
        self.net.stream_modalities = {modality}
        items = list(stream)
        if items:
            for b in self._batches(self.data({modality: items}, f"adapt {modality}")):
                self.net.encode(modality, b)
        return self

    def reset(self) -> "NLMMModel":
        """Forget what ``adapt`` learned: back to W_0 and adaptation within each item."""
        self.net.ttt_mode = "sequence"
        self.net.stream_modalities = set(self.net.modalities)
        self.net.reset_stream()
        return self


class _Input:
    """One modality's input check: ``prepare(item)`` decodes it and raises InputError if it is unusable."""

    def __init__(self, model: NLMMModel, modality: str):
        self.model, self.modality = model, modality

    def prepare(self, item: Any) -> None:
        self.model.data({self.modality: [item]}, self.modality)
