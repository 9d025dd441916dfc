"""Cross-modal retrieval: Recall@K in both directions at every Matryoshka dim.

Protocol (as for COCO / Flickr): a text query is correct at K if its own image is among the K
most similar images; an image query is correct at K if any of its captions is among the K most
similar texts. Ranks count strictly more similar items, so ties go to the query.
"""
from __future__ import annotations

import torch

from ..data.pipeline import PairedData
from ..models.alignment import AlignmentModel

DIRECTION_NAMES = {("text", "image"): "text_to_image", ("image", "text"): "image_to_text"}


def direction_name(query: str, gallery: str) -> str:
    return DIRECTION_NAMES.get((query, gallery), f"{query}_to_{gallery}")


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, positives: torch.Tensor, ks: list[int], chunk: int = 1024) -> dict[str, float]:
    """queries (Nq, d), gallery (Ng, d) unit vectors; positives (Nq, Ng) bool -> {"R@k": percent}."""
    ranks = []
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ gallery.t()
        pos = positives[s : s + chunk]
        best_pos = sims.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        ranks.append((sims > best_pos).sum(1))
    rank = torch.cat(ranks)
    return {f"R@{k}": round(100.0 * (rank < k).float().mean().item(), 2) for k in ks}


@torch.no_grad()
def embed_rows(model: AlignmentModel, data: PairedData, modality: str, rows: torch.Tensor, batch_size: int) -> dict[int, torch.Tensor]:
    """Embeddings {dim: (len(rows), dim)} of the given rows of a modality's feature table."""
    table = data.tables[modality]
    parts: list[dict[int, torch.Tensor]] = []
    for s in range(0, len(rows), batch_size):
        feats = table.batch(rows[s : s + batch_size])
        parts.append(model.embed(modality, feats))
    return {d: torch.cat([p[d] for p in parts]) for d in parts[0]}


@torch.no_grad()
def evaluate_retrieval(model: AlignmentModel, data: PairedData, ks: list[int], batch_size: int = 512, pairs: list[tuple[str, str]] | None = None) -> dict:
    """Recall@K for every modality pair present in ``data``, in both directions, at every dim.

    Result: {"text_to_image": {...}, "image_to_text": {...}, "dims": {"512": {...}, ...},
             "n_images": ..., "n_texts": ...}; the top-level blocks are the largest dim.
    """
    was_training = model.training
    model.eval()
    mods = [m for m in data.modalities if m in model.heads]
    pairs = pairs or [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    emb: dict[str, dict[int, torch.Tensor]] = {}
    uniq: dict[str, torch.Tensor] = {}
    for m in mods:
        rows = data.rows[m]
        uniq[m] = torch.unique(rows[rows >= 0])
        emb[m] = embed_rows(model, data, m, uniq[m], batch_size)
    result: dict = {"dims": {}}
    for a, b in pairs:
        both = (data.rows[a] >= 0) & (data.rows[b] >= 0)
        if not both.any():
            continue
        # positives between distinct a-items and distinct b-items that co-occur in a sample
        ia = torch.searchsorted(uniq[a], data.rows[a][both])
        ib = torch.searchsorted(uniq[b], data.rows[b][both])
        qa, qb = torch.unique(ia), torch.unique(ib)  # items of each side that have a partner
        pos = torch.zeros(len(uniq[a]), len(uniq[b]), dtype=torch.bool)
        pos[ia, ib] = True
        pos = pos[qa][:, qb]
        for d in model.dims:
            ea, eb = emb[a][d][qa], emb[b][d][qb]
            block = result["dims"].setdefault(str(d), {})
            # text queries first for the image-text pair, as in the literature
            block[direction_name(b, a)] = recall_at_k(eb, ea, pos.t(), ks)
            block[direction_name(a, b)] = recall_at_k(ea, eb, pos, ks)
        result[f"n_{a}s" if a != "audio" else "n_audio"] = len(qa)
        result[f"n_{b}s" if b != "audio" else "n_audio"] = len(qb)
    top = result["dims"].get(str(model.dims[0]), {})
    model.train(was_training)
    return {**top, **{k: v for k, v in result.items() if k != "dims"}, "dims": result["dims"]}


def format_table(result: dict, title: str = "") -> str:
    """Plain-text table: one row per dim and direction."""
    dims = result.get("dims", {})
    if not dims:
        return "(no retrieval pairs)"
    directions = list(next(iter(dims.values())).keys())
    ks = list(next(iter(next(iter(dims.values())).values())).keys())
    head = f"{'dim':>6}  {'direction':<16}" + "".join(f"{k:>8}" for k in ks)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for d, block in dims.items():
        for name in directions:
            lines.append(f"{d:>6}  {name:<16}" + "".join(f"{block[name][k]:>8.2f}" for k in ks))
    counts = ", ".join(f"{k[2:]}: {v}" for k, v in result.items() if k.startswith("n_"))
    lines.append(f"({counts})")
    return "\n".join(lines)
