"""The nlmm task: the nested-learning multimodal model (edge_glass/nlmm), trained from raw media.

Data: the training datasets read and split by group per dataset exactly as alignment does
(``read_and_split``: a dataset's own splits honoured, the rest hashed), decoded once into memory
(images at ``data.image_size``, log-mel at ``data.n_mels``, words of a vocabulary built on the
training split). No frozen encoder and no feature cache: the whole network trains.
Optimizer: the NL optimizer (nlmm/optim.py): the base parameters with AdamW at ``train.lr`` every
step, each continuum-memory level at its own period, lr and optimizer (DMGD or AdamW); the loop's
warmup + cosine scales every level. EMA weights (``ema``) are what evaluation and the saved
model use. Loss and metrics: nlmm/core.py and nlmm/evaluate.py.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..data.formats import read_dataset
from ..data.samples import DataReport, Sample
from ..decoders.prompt import WordTokenizer
from ..encoders import build_encoders
from ..errors import EdgeGlassError
from ..features.cache import feature_cache_dir
from ..nlmm.core import NLMMCore
from ..nlmm.data import Backbones, MediaSpec, NLMMData, build_nlmm_data, text_vocabulary
from ..nlmm.evaluate import evaluate_nlmm, headline
from ..nlmm.inference import NLMMModel
from ..nlmm.model import MODALITIES, NLMM, parameter_table
from ..nlmm.optim import NLOptimizer, nl_groups
from ..runs import RunDir
from .alignment import _prefixed, evaluation_samples, read_and_split, split_samples
from .base import Task, count_parameters, param_groups, register_task


def media_spec(cfg: Any) -> MediaSpec:
    d = cfg.data
    return MediaSpec(image_size=d.image_size, n_mels=d.n_mels, max_audio_seconds=d.max_audio_seconds, max_text_tokens=d.max_text_tokens)


def build_net(cfg: Any, vocab_size: int, modalities, feature_dims: dict[str, int] | None = None) -> NLMMCore:
    net = NLMM(cfg.model, vocab_size, cfg.data.n_mels, tuple(modalities), feature_dims)
    return NLMMCore(net, cfg.ema)


def build_backbones(cfg: Any, cached: bool = True, device: torch.device | str = "cpu") -> Backbones | None:
    """The config's frozen backbones (``backbones:``), their features cached under ``cache:`` (or
    encoded live when ``cached`` is False, as for a user's own inputs); None without backbones."""
    if not cfg.backbones:
        return None
    encoders = {m: e.to(device) for m, e in build_encoders(cfg.backbones).items()}
    return Backbones(encoders, feature_cache_dir(cfg) if cached else None, cfg.cache.dtype, cfg.cache.shard_size)


def feature_dims(cfg: Any) -> dict[str, int]:
    """{modality: token width} of the config's backbones."""
    return {m: e.token_dim for m, e in build_encoders(cfg.backbones).items()} if cfg.backbones else {}


def split_data(cfg: Any, report: DataReport, progress: bool = False) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """{"train" | "val" | "test" | "eval:<spec>": samples} and the split record."""
    samples, membership, record, extra = read_and_split(cfg.data, report)
    out = {name: [s for s in samples if membership.get(s.group) == name] for name in ("train", "val", "test")}
    out.update({f"eval:{spec}": part for spec, part in extra.items()})
    return out, record


@register_task
class NLMMTask(Task):
    name = "nlmm"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.tokenizer: WordTokenizer | None = None
        self.modalities: tuple[str, ...] = MODALITIES
        self.opt: NLOptimizer | None = None
        self.feature_dims: dict[str, int] = {}

    @classmethod
    def find_unused_parameters(cls, cfg: Any) -> bool:
        return True  # a batch may lack a modality (its encoder and decoder get no gradient)

    # -- training
    def load(self, report, progress: bool) -> dict[str, Any]:
        parts, record = split_data(self.cfg, report, progress)
        d = self.cfg.data
        self.tokenizer = text_vocabulary(parts["train"], d.vocab_min_count, d.max_vocab)
        spec = media_spec(self.cfg)
        everything = [s for part in parts.values() for s in part]
        backbones = build_backbones(self.cfg)
        data = build_nlmm_data(everything, self.tokenizer, spec, report, progress, d.workers, backbones)
        where: dict[int, str] = {}
        for name, part in parts.items():
            where.update((id(s), name) for s in part)
        out = {name: data.select([i for i, s in enumerate(data.samples) if where.get(id(s)) == name]) for name in parts}
        for spec_name in [*d.train, *d.eval]:
            report.kept[spec_name] += sum(1 for s in data.samples if s.group.startswith(spec_name + "|"))
        present = data.modalities()
        self.modalities = tuple(m for m in MODALITIES if m in present)
        if "text" not in self.modalities:
            raise EdgeGlassError(f"data.train: NL-MM needs texts (captions or transcripts); {', '.join(d.train)} gave none")
        encoders = backbones.encoders if backbones is not None else {}
        self.feature_dims = {m: e.token_dim for m, e in encoders.items() if m in self.modalities}
        info = {"modalities": list(self.modalities), "vocab_size": len(self.tokenizer), "feature_dims": self.feature_dims}
        if encoders:
            info["backbones"] = {m: e.fingerprint() for m, e in encoders.items()}
        self.records = {"split.json": record, "nlmm.json": info}
        return out

    def build(self) -> nn.Module:
        if self.tokenizer is None:
            raise EdgeGlassError("nlmm: build() before load(): the vocabulary comes from the training split")
        return build_net(self.cfg, len(self.tokenizer), self.modalities, self.feature_dims)

    def optimizer(self, core: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        levels = core.net.cms_modules()
        specs = core.net.switches["cms"] if levels else None
        self.opt = NLOptimizer(nl_groups(param_groups(core, t.weight_decay), levels, specs, t.lr, t.betas))
        return self.opt

    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(core.device) for k, v in batch.items()}
        return model(batch, self.cfg.loss)

    def after_step(self, core: nn.Module) -> dict[str, Any]:
        core.update_ema()
        if self.opt is None:
            return {}
        return {"level_updates": {lv.name: lv.updates for lv in self.opt.cms.levels if lv.period > 1}}

    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        if limit is not None and len(data) > limit:
            data = data.select(torch.linspace(0, len(data) - 1, limit).round().long().unique().tolist())  # spread over the datasets
        with core.inference_weights() as net:
            result = evaluate_nlmm(net, data, self.tokenizer, self.cfg.eval)
        result["headline"] = headline(result)
        return result

    def score(self, result: dict[str, Any]) -> float:
        return sum(result["headline"].values())

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        """The network's weights (the EMA weights when the run keeps them) and the logit scale."""
        with core.inference_weights() as net:
            state = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
        state["log_scale"] = core.log_scale.detach()
        return state

    def checkpoint_state(self, core: nn.Module) -> dict[str, torch.Tensor]:
        """Everything: the live weights, the EMA weights and their update count (exact resume)."""
        return core.state_dict()

    def save_files(self, run) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(run.file("tokenizer.json"))

    # -- a trained run
    @classmethod
    def load_run(cls, run: RunDir, device: torch.device | str = "cpu") -> NLMMModel:
        cfg = run.read_config()
        info = run.read_json("nlmm.json")
        tokenizer = WordTokenizer.load(run.file("tokenizer.json"))
        net = NLMM(cfg.model, len(tokenizer), cfg.data.n_mels, tuple(info["modalities"]), info.get("feature_dims"))
        state = {k[4:]: v for k, v in run.load_weights().items() if k.startswith("net.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EdgeGlassError(f"{run.file('model.safetensors')}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return NLMMModel(cfg, net, tokenizer, media_spec(cfg), run.path, build_backbones(cfg, cached=False)).to(device)

    def evaluate_run(self, model: NLMMModel, spec: str | None, report, progress: bool = True,
                     details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every metric on a dataset spec (its predefined test split, if it has one) or on the run's
        own test split (the groups split.json records)."""
        if spec:
            samples = _prefixed(spec, evaluation_samples(read_dataset(spec, report)))
        else:
            samples = split_samples(model, "test", report, prefixed=True)
        backbones = None if model.backbones is None else replace(model.backbones, cache_dir=feature_cache_dir(model.cfg))
        data = build_nlmm_data(samples, model.tokenizer, model.spec, report, progress, model.cfg.data.workers, backbones)
        if details is not None:
            details["data"] = data
        result = evaluate_nlmm(model.net, data, model.tokenizer, model.cfg.eval)
        result["headline"] = headline(result)
        return result

    def parameter_rows(self, run_dir=None) -> list[tuple[str, int, int]]:
        """Per part of the network, at the run's vocabulary (or ``data.max_vocab`` words without a run)."""
        if run_dir is not None and RunDir(run_dir).file("nlmm.json").exists():
            info = RunDir(run_dir).read_json("nlmm.json")
            vocab, modalities, dims = info["vocab_size"], tuple(info["modalities"]), info.get("feature_dims")
        else:
            vocab, modalities, dims = self.cfg.data.max_vocab, MODALITIES, feature_dims(self.cfg)
        core = build_net(self.cfg, vocab, modalities, dims)
        rows = [count_parameters(label, module) for label, module in parameter_table(core.net)]
        for m, enc in build_encoders(self.cfg.backbones).items():  # frozen: counted, not trained
            if m in modalities:
                rows.append(count_parameters(f"{m} backbone (frozen {enc.cfg.type})", enc.ensure_loaded()))
        return rows

    # -- results
    def table(self, result: dict[str, Any], title: str) -> str:
        return format_nlmm(result, title)

    def compare(self, results: dict[str, dict[str, Any]]) -> str:
        return compare_nlmm(results)


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_nlmm(result: dict[str, Any], title: str = "") -> str:
    lines = [f"NL-MM, {title} ({result.get('n', 0)} samples, test-time training: {result.get('adapt')})"] if title else []
    for spec, res in result.get("datasets", {}).items():
        lines.append(f"  {spec} ({res['n']} samples)")
        for key, r in res.items():
            if "-" in key and isinstance(r, dict):
                a, b = key.split("-")
                for direction in (f"{a}_to_{b}", f"{b}_to_{a}"):
                    lines.append(f"    {direction:<16} " + "  ".join(f"{k} {v:6.2f}" for k, v in r[direction].items()))
        if "captions" in res:
            c = res["captions"]
            lines.append("    captions         " + "  ".join(f"{k} {_fmt(c[k])}" for k in ("f1", "exact_match", "bleu1", "bleu4", "cider", "distinct_captions") if k in c))
        if "transcripts" in res:
            t = res["transcripts"]
            lines.append("    transcripts      " + "  ".join(f"{k} {_fmt(t[k])}" for k in ("f1", "exact_match", "wer") if k in t))
        if "digits" in res:
            g = res["digits"]
            lines.append(f"    spoken digits    accuracy {g['accuracy']:.2f} (chance {g['chance']:.0f})  transcript {g['transcript_accuracy']:.2f}")
    return "\n".join(lines)


def compare_nlmm(results: dict[str, dict[str, Any]]) -> str:
    keys = sorted({k for r in results.values() for k in r.get("headline", {})})
    width = max([len(n) for n in results] + [7])
    lines = [f"{'variant':<{width}}  " + "  ".join(f"{k:>14}" for k in keys)]
    for name, r in results.items():
        h = r.get("headline", {})
        lines.append(f"{name:<{width}}  " + "  ".join(f"{h[k]:>14.2f}" if k in h else f"{'-':>14}" for k in keys))
    return "\n".join(lines)
