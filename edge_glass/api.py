"""Using a trained run from Python (and the CLI's eval / embed / info verbs).

    model = edge_glass.load("runs/quickstart")
    img = model.encode_images(["a.jpg", pil_image], dim=128)    # (2, 128), unit rows
    txt = model.encode_texts(["a dog on a beach"])               # (1, 512) at the largest dim
    scores = img @ txt.T
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .data.formats import parse_spec, read_dataset
from .data.pipeline import PairedData, build_paired_data
from .data.samples import DataReport
from .encoders import build_encoders
from .encoders.base import FrozenEncoder
from .errors import EdgeGlassError
from .eval.retrieval import evaluate_retrieval
from .eval.zero_shot import zero_shot_digits
from .models.alignment import AlignmentModel
from .runs import RunDir
from .train.data import feature_cache_dir, limit_groups, load_eval_set


class AlignedModel(nn.Module):
    """Frozen encoders + trained heads: raw inputs -> embeddings in the shared space."""

    def __init__(self, cfg: Any, encoders: dict[str, FrozenEncoder], core: AlignmentModel, run_dir: Path | None = None):
        super().__init__()
        self.cfg, self.run_dir = cfg, run_dir
        self.encoders = nn.ModuleDict(encoders)
        self.core = core.eval()

    @property
    def dims(self) -> list[int]:
        return self.core.dims

    @torch.no_grad()
    def encode(self, modality: str, items: Iterable[Any], dim: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(N, dim) L2-normalised embeddings; any dim up to the largest trained one (nested)."""
        if modality not in self.encoders:
            raise EdgeGlassError(f"this model has no {modality} encoder (it has {', '.join(self.encoders)})")
        dim = self._dim(dim)
        items = list(items)
        enc = self.encoders[modality]
        head = self.core.heads[modality]
        bs = batch_size or enc.cfg.batch_size
        out = [head.at_dim(enc.encode(items[s : s + bs]), dim) for s in range(0, len(items), bs)]
        if not out:
            return torch.empty(0, dim)
        return torch.cat(out)

    def _dim(self, dim: int | None) -> int:
        dim = dim or self.dims[0]
        if not 1 <= dim <= self.dims[0]:
            raise EdgeGlassError(f"dim {dim} is outside 1..{self.dims[0]} (trained dims: {self.dims})")
        return dim

    @torch.no_grad()
    def encode_fused(self, first: Iterable[Any], second: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Pairs of inputs of the fusion's two modalities, in its config order (images and audio
        clips for "image+audio") -> (N, dim): one embedding per pair, e.g. a spoken question
        about a photo as one query."""
        if self.core.fusion is None:
            raise EdgeGlassError("this model has no fusion head (model.fusion in its config)")
        ((a, b),) = self.core.fused.values()
        first, second = list(first), list(second)
        if len(first) != len(second):
            raise EdgeGlassError(f"encode_fused: {len(first)} {a} inputs but {len(second)} {b} inputs")
        dim = self._dim(dim)
        bs = min(self.encoders[a].cfg.batch_size, self.encoders[b].cfg.batch_size)
        out = [self.core.fusion.at_dim(self.encoders[a].encode(first[s : s + bs]), self.encoders[b].encode(second[s : s + bs]), dim)
               for s in range(0, len(first), bs)]
        return torch.cat(out) if out else torch.empty(0, dim)

    def encode_images(self, images: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Paths, bytes or PIL images -> (N, dim)."""
        return self.encode("image", images, dim)

    def encode_texts(self, texts: Iterable[str], dim: int | None = None) -> torch.Tensor:
        return self.encode("text", texts, dim)

    def encode_audio(self, clips: Iterable[Any], dim: int | None = None) -> torch.Tensor:
        """Audio file paths or bytes -> (N, dim)."""
        return self.encode("audio", clips, dim)


def build_core(cfg: Any, encoders: dict[str, FrozenEncoder]) -> AlignmentModel:
    return AlignmentModel(cfg.model, cfg.loss, {m: e.token_dim for m, e in encoders.items()})


def load(run_dir: str | Path) -> Any:
    """Load a trained run directory (its config.yaml + model.safetensors; no YAML needed):
    an AlignedModel for alignment runs, a VisionLanguageModel (``.answer``) for vlm runs."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    if cfg.task == "vlm":
        from .tasks.vqa import load_vlm

        return load_vlm(run)
    encoders = build_encoders(cfg.encoders)
    core = build_core(cfg, encoders)
    core.load_state_dict(run.load_weights())
    if run.file("encoders.json").exists():
        saved = run.read_json("encoders.json")
        for m, enc in encoders.items():
            if m in saved and saved[m].get("weights") != enc.weights_id():
                warnings.warn(f"{run.path}: the {m} backbone's weights differ from those the heads were trained on", stacklevel=2)
    return AlignedModel(cfg, encoders, core, run.path)


def heldout_data(model: AlignedModel, split: str, report: DataReport, progress: bool = True) -> PairedData:
    """Rebuild a run's own held-out split (from its config and split.json)."""
    run = RunDir(model.run_dir)  # type: ignore[arg-type]
    record = run.read_json("split.json")
    samples = []
    for spec in model.cfg.data.train:
        groups = set(record.get(spec, {}).get(split, []))
        samples += [s for s in limit_groups(read_dataset(spec, report), model.cfg.data.max_groups) if s.group in groups]
    if not samples:
        raise EdgeGlassError(f"{run.path}: its {split} split is empty")
    return build_paired_data(samples, dict(model.encoders), report, feature_cache_dir(model.cfg), model.cfg.cache.dtype, progress=progress)


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Retrieval metrics of a run on a dataset spec (default: the run's own test split); a
    dataset's predefined test split only, if it has one; on ``fsdd:DIR`` also zero-shot spoken-digit
    classification (``zero_shot_digits``)."""
    model = load(run_dir)
    report = DataReport()
    if model.cfg.task == "vlm":
        from .tasks.vqa import evaluate_vlm

        result = evaluate_vlm(model, data, report, progress)
        result["skipped"] = len(report.skipped)
        return result
    if data:
        paired = load_eval_set(data, dict(model.encoders), report, feature_cache_dir(model.cfg), model.cfg.cache.dtype, progress)
    else:
        paired = heldout_data(model, "test", report, progress)
    result = evaluate_retrieval(model.core, paired, model.cfg.eval.ks, model.cfg.eval.batch_size, dims=model.cfg.eval.dims)
    if data and parse_spec(data)[0] == "fsdd" and "audio" in model.encoders and "text" in model.encoders:
        result["zero_shot_digits"] = zero_shot_digits(model, paired)
    result["skipped"] = len(report.skipped)
    if report.skipped:
        result["skipped_by_reason"] = dict(report.reasons())
    return result


def _count(label: str, module: nn.Module | None) -> tuple[str, int, int]:
    params = {id(p): p for p in module.parameters()}.values() if module is not None else []  # tied weights once
    return label, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_rows(cfg: Any, run_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module, total, trainable) parameter counts of an experiment, frozen backbones included."""
    if cfg.task == "vlm":
        from .data.qa import read_qa
        from .decoders.prompt import WordTokenizer
        from .tasks.vqa import WORD_DECODERS, build_vlm, vision_source

        tokenizer = None
        if cfg.decoder.type in WORD_DECODERS:  # the vocabulary comes from the training questions
            tok_file = Path(run_dir or "") / "tokenizer.json"
            tokenizer = WordTokenizer.load(tok_file) if run_dir else WordTokenizer.build(
                t for spec in cfg.data.train for s in read_qa(spec, DataReport()) for t in (s.question, s.answer))
        encoder, aligned = vision_source(cfg)
        core = build_vlm(cfg, tokenizer, (encoder, aligned))
        rows = [_count(f"vision.encoder ({encoder.cfg.type}, frozen)", encoder.ensure_loaded())]
        if aligned is not None:
            rows.append(_count("vision.aligned_head (frozen)", aligned))
        return rows + [_count("projector", core.projector), _count(f"fusion ({cfg.fusion.type})", core.fusion),
                       _count(f"decoder ({cfg.decoder.type})", core.decoder)]
    encoders = build_encoders(cfg.encoders)
    core = build_core(cfg, encoders)
    rows = [_count(f"encoders.{m} ({enc.cfg.type}, frozen)", enc.ensure_loaded()) for m, enc in encoders.items()]
    rows += [_count(f"heads.{m}.{part}", getattr(head, part)) for m, head in core.heads.items() for part in ("pooler", "projection")]
    if core.fusion is not None:
        rows += [_count(f"fusion ({name}).{part}", getattr(core.fusion, part)) for name in core.fused for part in ("fusion", "projection")]
    return rows + [_count("logit_scales", core.logit_scales)]
