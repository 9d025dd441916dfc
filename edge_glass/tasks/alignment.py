"""The alignment task: frozen encoders -> per-modality heads -> contrastive Matryoshka loss.

Data: every training dataset read, split by group per dataset (a dataset's own split honoured),
encoded once into the feature cache. Batches are cached features of every modality a sample
has; the loss sums a Matryoshka InfoNCE over every modality pair present, on embeddings gathered
from all processes; evaluation is retrieval Recall@K in both directions at every nested dim
(plus closed-set spoken-digit accuracy on FSDD).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..data.formats import limit_groups, parse_spec, read_dataset
from ..data.shards import split_identity
from ..data.samples import DataReport, Sample
from ..data.split import sample_splits
from ..encoders import FrozenEncoder, TrainableEncoder, build_encoders
from ..errors import EdgeGlassError
from ..eval.retrieval import evaluate_retrieval, format_table
from ..eval.digits import spoken_digit_accuracy
from ..features.cache import feature_cache_dir
from ..features.pipeline import Batch, PairedData, build_paired_data
from ..losses import gather, matryoshka_info_nce
from ..models.alignment import AlignedModel, AlignmentModel, pair_name
from ..runs import RunDir
from .base import Task, count_parameters, register_task


# --- data ----------------------------------------------------------------------------------------

def dataset_rates(data: PairedData, weights: dict[str, float]) -> torch.Tensor | None:
    """(N,) each sample's ``data.weights`` entry (1 if its dataset has none), found by the dataset
    spec that prefixes its group; None without weights (plain permutations)."""
    if not weights:
        return None
    return torch.tensor([weights.get(s.group.split("|", 1)[0], 1.0) for s in data.samples], dtype=torch.float64)


def evaluation_samples(samples: list[Sample]) -> list[Sample]:
    """What a dataset contributes to evaluation: its own test split when it predefines one
    (e.g. FSDD's test takes, the rest may have been trained on), else all of it."""
    test = [s for s in samples if s.split == "test"]
    return test or samples


def _prefixed(spec: str, samples: list[Sample]) -> list[Sample]:
    return [Sample(**{**s.__dict__, "group": f"{spec}|{s.group}"}) for s in samples]


def read_and_split(dcfg, report: DataReport) -> tuple[list[Sample], dict[str, str], dict[str, dict[str, list[str]]], dict[str, list[Sample]]]:
    """Every training dataset of a data config (``train``, ``split``, ``max_groups``, ``eval``) read
    and split by group, each dataset on its own.

    Returns (training-dataset samples, {group: "train" | "val" | "test"}, {spec: {"val": groups,
    "test": groups}}, {eval spec: its samples}). Groups are prefixed with their dataset spec, so two
    datasets never share a group. Splits a dataset predefines (Sample.split) are honoured; the
    seeded hash splits the rest (hashed by what the data is: wds:DIR shards split like the spec
    they were made from).
    """
    samples: list[Sample] = []
    membership: dict[str, str] = {}
    split_record: dict[str, dict[str, list[str]]] = {}
    for spec in dcfg.train:
        raw = limit_groups(read_dataset(spec, report), dcfg.max_groups)
        part = _prefixed(spec, raw)
        hashed = sample_splits(_prefixed(split_identity(spec), raw), dcfg.split.val, dcfg.split.test, dcfg.split.seed)
        splits = {k: {f"{spec}|{g.split('|', 1)[1]}" for g in v} for k, v in hashed.items()}
        for name, groups in splits.items():
            membership.update((g, name) for g in groups)
        split_record[spec] = {k: sorted(g.split("|", 1)[1] for g in v) for k, v in splits.items() if k != "train"}
        samples += part
    extra = {spec: _prefixed(spec, evaluation_samples(read_dataset(spec, report))) for spec in dcfg.eval}
    return samples, membership, split_record, extra


def load_splits(cfg, encoders: dict, report: DataReport, progress: bool = True) -> tuple[dict[str, PairedData], dict[str, dict[str, list[str]]]]:
    """All training datasets read, split by group per dataset (read_and_split), encoded once.

    Returns ({"train"|"val"|"test"|"eval:<spec>": PairedData}, {spec: {"val": groups, "test": groups}}).
    """
    samples, membership, split_record, extra = read_and_split(cfg.data, report)
    samples += [s for part in extra.values() for s in part]
    data = build_paired_data(samples, encoders, report, feature_cache_dir(cfg), cfg.cache.dtype, cfg.cache.shard_size, progress)
    out = {name: data.select([i for i, s in enumerate(data.samples) if membership.get(s.group) == name]) for name in ("train", "val", "test")}
    for spec in extra:
        out[f"eval:{spec}"] = data.select([i for i, s in enumerate(data.samples) if s.group.startswith(spec + "|")])
    for spec in [*cfg.data.train, *extra]:
        report.kept[spec] += sum(1 for s in data.samples if s.group.startswith(spec + "|"))
    return out, split_record


def split_samples(model: AlignedModel, split: str, report: DataReport, prefixed: bool = False) -> list[Sample]:
    """The samples of one of a run's own splits ("train", "val", "test"), from its config and
    split.json (which records the held-out groups: train is every other group); ``prefixed``:
    groups named ``<spec>|<group>`` as in training."""
    run = RunDir(model.run_dir)
    record = run.read_json("split.json")
    samples = []
    for spec in model.cfg.data.train:
        held_out = record.get(spec, {})
        if split == "train":
            out = set().union(*map(set, held_out.values()))
            keep = lambda s: s.group not in out  # noqa: E731
        else:
            groups = set(held_out.get(split, []))
            keep = lambda s: s.group in groups  # noqa: E731
        kept = [s for s in limit_groups(read_dataset(spec, report), model.cfg.data.max_groups) if keep(s)]
        samples += _prefixed(spec, kept) if prefixed else kept
    if not samples:
        raise EdgeGlassError(f"{run.path}: its {split} split is empty")
    return samples


def heldout_data(model: AlignedModel, split: str, report: DataReport, progress: bool = True) -> PairedData:
    """Rebuild a run's own held-out split (from its config and split.json)."""
    samples = split_samples(model, split, report)
    return build_paired_data(samples, dict(model.encoders), report, feature_cache_dir(model.cfg), model.cfg.cache.dtype, progress=progress)


# --- model ---------------------------------------------------------------------------------------

def build_run_encoders(cfg: Any, device: torch.device | str = "cpu") -> dict:
    """The config's encoders on ``device``; trainable ones initialised from ``cfg.seed`` (the
    same weights in a fresh run and in a resumed one, before its checkpoint loads)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return {m: e.to(device) for m, e in build_encoders(cfg.encoders).items()}


def build_core(cfg: Any, encoders: dict) -> AlignmentModel:
    """The trainable core: heads and temperatures, plus the trainable encoders (shared with ``encoders``)."""
    trainable = {m: e for m, e in encoders.items() if isinstance(e, TrainableEncoder)}
    return AlignmentModel(cfg.model, cfg.loss, {m: e.token_dim for m, e in encoders.items()}, trainable)


# --- loss ----------------------------------------------------------------------------------------

def dim_weights(cfg: Any, step: int) -> dict[int, float]:
    """MRL weights of this step: all dims, or one dim drawn (same on every process)."""
    dims = cfg.model.dims
    w = cfg.loss.mrl.weights or [1.0] * len(dims)
    if not cfg.loss.mrl.sample_one_dim:
        return dict(zip(dims, w))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    pick = int(torch.multinomial(torch.tensor(w, dtype=torch.float), 1, generator=g))
    return {d: (1.0 if i == pick else 0.0) for i, d in enumerate(dims)}


def contrastive_loss(model, core: AlignmentModel, batch: Batch, weights: dict[int, float], pair_weights: dict[str, float],
                     parts: dict[str, dict[str, float]] | None = None) -> torch.Tensor:
    """Sum over modality pairs of the Matryoshka InfoNCE, on embeddings gathered from all processes.
    ``batch`` must be on the core's device; absent modalities are filled in there too. ``parts``,
    when given, receives {"loss_pair": {"a-b": that pair's Matryoshka loss}, "loss_dim": {"d": the
    pair-weighted InfoNCE at dim d}} (plain numbers, for logging)."""
    device = next(core.parameters()).device
    emb, scales = model(batch.features, batch.present)
    n = next(iter(batch.present.values())).shape[0]
    local_present, local_keys = dict(batch.present), dict(batch.keys)
    for name, (a, b) in core.fused.items():  # the fused input ("image+audio") counts as a modality
        local_present[name], local_keys[name] = batch.joint(a, b)
    full: dict[str, dict[int, torch.Tensor]] = {}
    present: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}
    for m in core.modalities:  # every process gathers every modality, present or not
        has = local_present.get(m, torch.zeros(n, dtype=torch.bool, device=device))
        present[m] = gather(has.to(torch.uint8)).bool()
        keys[m] = gather(local_keys.get(m, torch.full((n,), -1, dtype=torch.long, device=device)))
        full[m] = {}
        for d in core.dims:
            z = torch.zeros(n, d, device=device)
            if m in emb:
                z = z.index_put((has.nonzero().squeeze(1),), emb[m][d].to(z.dtype))
            full[m][d] = gather(z)
    total = torch.zeros((), device=device)
    for a, b in core.pairs:
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue
        ea = {d: t[both] for d, t in full[a].items()}
        eb = {d: t[both] for d, t in full[b].items()}
        per_dim: dict[int, torch.Tensor] = {}
        loss = matryoshka_info_nce(ea, eb, scales[pair_name(a, b)], keys[a][both], keys[b][both], weights, per_dim)
        pw = pair_weights.get(f"{a}-{b}", pair_weights.get(f"{b}-{a}", 1.0))  # "image-audio" = "audio-image"
        total = total + pw * loss
        if parts is not None:
            parts.setdefault("loss_pair", {})[f"{a}-{b}"] = float(loss.detach())
            dims = parts.setdefault("loss_dim", {})
            for d, v in per_dim.items():
                dims[str(d)] = dims.get(str(d), 0.0) + pw * float(v)
    return total


# --- results -------------------------------------------------------------------------------------

def short_direction(direction: str) -> str:
    """text_to_image -> t2i, image+audio_to_text -> ia2t."""
    return "2".join("".join(m[0] for m in side.split("+")) for side in direction.split("_to_"))


def compare_retrieval(results: dict[str, dict[str, Any]]) -> str:
    """One row per variant and dim; R@1/5/10 of every retrieval direction the variants report."""
    ks = ("R@1", "R@5", "R@10")
    directions = list(dict.fromkeys(k for r in results.values() if r for block in r.get("dims", {}).values() for k in block))
    lines = [f"{'variant':<24}{'dim':>6}" + "".join(f"{short_direction(x) + '@' + k[2:]:>8}" for x in directions for k in ks)]
    for name, r in results.items():
        for d, block in (r or {}).get("dims", {}).items():
            lines.append(f"{name:<24}{d:>6}" + "".join(f"{block.get(x, {}).get(k, float('nan')):>8.2f}" for x in directions for k in ks))
    return "\n".join(lines)


def format_alignment(result: dict[str, Any], title: str) -> str:
    lines = [format_table(result, title)]
    if "digits" in result:
        z = result["digits"]
        lines.append(f"spoken digits, closed set (10 digit words, the run's speakers; not zero-shot): {z['accuracy']:.2f}% of {z['n']} clips "
                     f"(chance {z['chance']:.0f}%); per speaker: " + ", ".join(f"{k} {v:.1f}" for k, v in z["per_speaker"].items()))
    return "\n".join(lines)


@register_task
class AlignmentTask(Task):
    name = "alignment"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.encoders = build_run_encoders(cfg, self.device)

    @classmethod
    def find_unused_parameters(cls, cfg: Any) -> bool:
        return len(cfg.encoders) > 2  # with 3+ modalities a batch may lack one

    # -- training
    def load(self, report, progress: bool) -> dict[str, Any]:
        splits, split_record = load_splits(self.cfg, self.encoders, report, progress)
        self.records = {"split.json": split_record,
                        "encoders.json": {m: e.fingerprint() for m, e in self.encoders.items() if isinstance(e, FrozenEncoder)}}
        return splits

    def sampling(self, data: Any) -> tuple[str, torch.Tensor | None]:
        return self.cfg.data.pairs_per_epoch, dataset_rates(data, self.cfg.data.weights)

    def build(self) -> nn.Module:
        return build_core(self.cfg, self.encoders)

    def loss(self, model: nn.Module, core: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(next(core.parameters()).device)
        parts: dict[str, Any] = {}
        return contrastive_loss(model, core, batch, dim_weights(self.cfg, step), self.cfg.loss.pair_weights, parts), parts

    def after_step(self, core: nn.Module) -> dict[str, Any]:
        core.clamp_scales()
        return {"temperature": {k: round(1.0 / float(v.detach().exp()), 5) for k, v in core.logit_scales.items()}}

    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        e = self.cfg.eval
        return evaluate_retrieval(core, data, e.ks, e.batch_size, dims=e.dims)

    def score(self, result: dict[str, Any]) -> float:
        """Mean R@1 over every direction at the largest dim."""
        blocks = [v for v in result.values() if isinstance(v, dict) and "R@1" in v]
        return sum(b["R@1"] for b in blocks) / max(len(blocks), 1)

    # -- a trained run
    @classmethod
    def load_run(cls, run: RunDir, device: torch.device | str = "cpu") -> AlignedModel:
        cfg = run.read_config()
        encoders = build_run_encoders(cfg)
        core = build_core(cfg, encoders)
        run.load_state_into(core)
        if run.file("encoders.json").exists():
            saved = run.read_json("encoders.json")
            for m, enc in encoders.items():
                if m in saved and isinstance(enc, FrozenEncoder) and saved[m].get("weights") != enc.weights_id():
                    warnings.warn(f"{run.path}: the {m} backbone's weights differ from those the heads were trained on", stacklevel=2)
        return AlignedModel(cfg, encoders, core, run.path).to(device)

    def evaluate_run(self, model: AlignedModel, spec: str | None, report, progress: bool = True,
                     details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Retrieval on a dataset spec (its predefined test split only, if it has one) or on the
        run's own test split; on ``fsdd:DIR`` also closed-set spoken-digit accuracy. ``details``
        (a dict, for edge-glass report) receives the evaluated PairedData under "data"."""
        cfg = model.cfg
        if spec:
            samples = evaluation_samples(read_dataset(spec, report))
            data = build_paired_data(samples, dict(model.encoders), report, feature_cache_dir(cfg), cfg.cache.dtype, progress=progress)
            report.kept[spec] += len(data)
        else:
            data = heldout_data(model, "test", report, progress)
        if details is not None:
            details["data"] = data
        result = evaluate_retrieval(model.core, data, cfg.eval.ks, cfg.eval.batch_size, dims=cfg.eval.dims)
        if spec and parse_spec(spec)[0].startswith("fsdd") and {"audio", "text"} <= set(model.encoders):
            result["digits"] = spoken_digit_accuracy(model, data)
        return result

    def parameter_rows(self, run_dir=None) -> list[tuple[str, int, int]]:
        core = self.build()
        rows = [count_parameters(f"encoders.{m} ({enc.cfg.type}, frozen)", enc.ensure_loaded()) if isinstance(enc, FrozenEncoder)
                else count_parameters(f"encoders.{m} ({enc.cfg.type}, trainable)", enc) for m, enc in self.encoders.items()]
        rows += [count_parameters(f"heads.{m}.{part}", getattr(head, part)) for m, head in core.heads.items() for part in ("pooler", "projection")]
        if core.fusion is not None:
            rows += [count_parameters(f"fusion ({name}).{part}", getattr(core.fusion, part)) for name in core.fused for part in ("fusion", "projection")]
        return rows + [count_parameters("logit_scales", core.logit_scales)]

    # -- results
    def table(self, result: dict[str, Any], title: str) -> str:
        return format_alignment(result, title)

    def compare(self, results: dict[str, dict[str, Any]]) -> str:
        return compare_retrieval(results)
