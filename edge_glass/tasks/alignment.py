"""The alignment task: frozen encoders -> per-modality heads -> contrastive Matryoshka loss.

Batches are cached features of every modality a sample has; the loss sums a Matryoshka InfoNCE
over every modality pair present, on embeddings gathered from all processes; evaluation is
retrieval Recall@K in both directions at every nested dim.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.pipeline import Batch
from ..encoders import build_encoders
from ..eval.retrieval import evaluate_retrieval, format_table
from ..losses import gather, matryoshka_info_nce
from ..models.alignment import AlignmentModel, pair_name
from ..train.data import dataset_rates, load_splits
from . import Task


def dim_weights(cfg: Any, step: int) -> dict[int, float]:
    """MRL weights of this step: all dims, or one dim drawn (same on every process)."""
    dims = cfg.model.dims
    w = cfg.loss.mrl.weights or [1.0] * len(dims)
    if not cfg.loss.mrl.sample_one_dim:
        return dict(zip(dims, w))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    pick = int(torch.multinomial(torch.tensor(w, dtype=torch.float), 1, generator=g))
    return {d: (1.0 if i == pick else 0.0) for i, d in enumerate(dims)}


def contrastive_loss(model, core: AlignmentModel, batch: Batch, weights: dict[int, float], pair_weights: dict[str, float]) -> torch.Tensor:
    """Sum over modality pairs of the Matryoshka InfoNCE, on embeddings gathered from all processes."""
    emb, scales = model(batch.features, batch.present)
    n = next(iter(batch.present.values())).shape[0]
    local_present, local_keys = dict(batch.present), dict(batch.keys)
    for name, (a, b) in core.fused.items():  # the fused input ("image+audio") counts as a modality
        local_present[name], local_keys[name] = batch.joint(a, b)
    full: dict[str, dict[int, torch.Tensor]] = {}
    present: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}
    for m in core.modalities:  # every process gathers every modality, present or not
        has = local_present.get(m, torch.zeros(n, dtype=torch.bool))
        present[m] = gather(has.to(torch.uint8)).bool()
        keys[m] = gather(local_keys.get(m, torch.full((n,), -1, dtype=torch.long)))
        full[m] = {}
        for d in core.dims:
            z = torch.zeros(n, d, device=has.device)
            if m in emb:
                z = z.index_put((has.nonzero().squeeze(1),), emb[m][d])
            full[m][d] = gather(z)
    total = torch.zeros((), device=next(core.parameters()).device)
    for a, b in core.pairs:
        both = present[a] & present[b]
        if int(both.sum()) < 2:
            continue
        ea = {d: t[both] for d, t in full[a].items()}
        eb = {d: t[both] for d, t in full[b].items()}
        loss = matryoshka_info_nce(ea, eb, scales[pair_name(a, b)], keys[a][both], keys[b][both], weights)
        total = total + pair_weights.get(f"{a}-{b}", pair_weights.get(f"{b}-{a}", 1.0)) * loss  # "image-audio" = "audio-image"
    return total


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return Batch(move(batch.present), move(batch.features), move(batch.keys))


class AlignmentTask(Task):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.encoders = build_encoders(cfg.encoders)
        self.records = {}

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        return len(self.cfg.encoders) > 2  # with 3+ modalities a batch may lack one

    def load(self, report, progress: bool) -> dict[str, Any]:
        splits, split_record = load_splits(self.cfg, self.encoders, report, progress)
        self.records = {"split.json": split_record, "encoders.json": {m: e.fingerprint() for m, e in self.encoders.items()}}
        return splits

    def sampling(self, data: Any) -> tuple[str, torch.Tensor | None]:
        return self.cfg.data.pairs_per_epoch, dataset_rates(data, self.cfg.data.weights)

    def build(self) -> nn.Module:
        return AlignmentModel(self.cfg.model, self.cfg.loss, {m: e.token_dim for m, e in self.encoders.items()})

    def loss(self, model: nn.Module, core: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(core.parameters()).device
        loss = contrastive_loss(model, core, to_device(batch, device), dim_weights(self.cfg, step), self.cfg.loss.pair_weights)
        return loss, {}

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

    def table(self, result: dict[str, Any], title: str) -> str:
        return format_table(result, title)
