"""Cross-modal retrieval: Recall@K in both directions at every Matryoshka dim.

Protocol (as for COCO / Flickr): a text query is correct at K if its own image is among the K
most similar images; an image query is correct at K if any of its captions is among the K most
similar texts. Ranks count strictly more similar items, so ties go to the query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..features.pipeline import PairedData
from ..models.alignment import AlignmentModel
from ..tensors import to_device

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
    """Embeddings {dim: (len(rows), dim)} of the given rows of a modality's feature table; for
    the fused input ("image+audio") a row is ``row_a * FUSED_BASE + row_b`` (see fused_rows)."""
    device = next(model.parameters()).device  # features go to the model; embeddings come back to the CPU
    parts: list[dict[int, torch.Tensor]] = []
    for s in range(0, len(rows), batch_size):
        r = rows[s : s + batch_size]
        if modality in model.fused:
            a, b = model.fused[modality]
            out = model.embed_fused(to_device(data.tables[a].batch(r // FUSED_BASE), device), to_device(data.tables[b].batch(r % FUSED_BASE), device))
        else:
            out = model.embed(modality, to_device(data.tables[modality].batch(r), device))
        parts.append({d: e.float().cpu() for d, e in out.items()})
    return {d: torch.cat([p[d] for p in parts]) for d in parts[0]}


FUSED_BASE = 2**31  # fused row = row of a * FUSED_BASE + row of b (feature tables hold < 2^31 rows)


def fused_rows(rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
    """(N,) rows of two modalities -> (N,) ids of the (a, b) combination, -1 where either is absent."""
    return torch.where((rows_a >= 0) & (rows_b >= 0), rows_a * FUSED_BASE + rows_b, -1)


def count_name(modality: str) -> str:
    """n_images, n_texts, n_audio, n_image+audio."""
    return f"n_{modality}" if modality == "audio" or "+" in modality else f"n_{modality}s"


@torch.no_grad()
def evaluate_retrieval(model: AlignmentModel, data: PairedData, ks: list[int], batch_size: int = 512,
                       pairs: list[tuple[str, str]] | None = None, dims: list[int] | None = None) -> dict:
    """Recall@K for every modality pair present in ``data``, in both directions, at every dim;
    with a fusion head also for the fused input ("image+audio") against the other modalities.
    ``dims`` (default: the model's) may include untrained sizes: the largest embedding's prefix,
    renormalised.

    Result: {"text_to_image": {...}, "image_to_text": {...}, "audio_to_text": {...}, ...,
             "dims": {"512": {...}, ...}, "n_images": ..., "n_audio": ..., "n_texts": ...};
    the top-level blocks are the largest evaluated dim; n_* count the distinct items of each modality that
    take part in at least one evaluated pair.
    """
    was_training = model.training
    model.eval()
    dims = sorted(dims or model.dims, reverse=True)
    rows = {m: data.rows[m] for m in data.modalities if m in model.heads}
    mods = list(rows)
    default = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    for name, (a, b) in model.fused.items():
        if a in rows and b in rows:
            rows[name] = fused_rows(rows[a], rows[b])
            default += [(name, m) for m in mods if m not in (a, b)]
    pairs = [(a, b) for a, b in (pairs or default) if a in rows and b in rows]
    emb: dict[str, dict[int, torch.Tensor]] = {}
    uniq: dict[str, torch.Tensor] = {}
    involved: dict[str, torch.Tensor] = {}
    for m in dict.fromkeys(x for p in pairs for x in p):
        uniq[m] = torch.unique(rows[m][rows[m] >= 0])
        involved[m] = torch.zeros(len(uniq[m]), dtype=torch.bool)
        if len(uniq[m]):
            trained = embed_rows(model, data, m, uniq[m], batch_size)
            emb[m] = {d: trained[d] if d in trained else F.normalize(trained[model.dims[0]][:, :d], dim=-1) for d in dims}
    result: dict = {"dims": {}}
    for a, b in pairs:
        both = (rows[a] >= 0) & (rows[b] >= 0)
        if not both.any():
            continue
        # positives between distinct a-items and distinct b-items that co-occur in a sample
        ia = torch.searchsorted(uniq[a], rows[a][both])
        ib = torch.searchsorted(uniq[b], rows[b][both])
        qa, qb = torch.unique(ia), torch.unique(ib)  # items of each side that have a partner
        involved[a][qa] = True
        involved[b][qb] = True
        pos = torch.zeros(len(uniq[a]), len(uniq[b]), dtype=torch.bool)
        pos[ia, ib] = True
        pos = pos[qa][:, qb]
        for d in dims:
            ea, eb = emb[a][d][qa], emb[b][d][qb]
            block = result["dims"].setdefault(str(d), {})
            # text queries first for the image-text pair, as in the literature
            block[direction_name(b, a)] = recall_at_k(eb, ea, pos.t(), ks)
            block[direction_name(a, b)] = recall_at_k(ea, eb, pos, ks)
    for m, used in involved.items():
        if used.any():
            result[count_name(m)] = int(used.sum())
    top = result["dims"].get(str(dims[0]), {})
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
