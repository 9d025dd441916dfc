"""Alignment runs: Recall@K against the Matryoshka dim per retrieval direction (numbers from the
evaluation that ``edge-glass eval`` runs), and what the shared space looks like: t-SNE coloured
by modality with matched pairs joined, the modality gap, a similarity heatmap of matched pairs,
top-5 retrievals of sample queries, and per-class accuracy on spoken digits."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.retrieval import embed_rows
from ..features.pipeline import PairedData
from .figures import K_COLORS, MODALITY_COLORS, FigureWriter, new_figure, pretty_direction, styled
from .html import Cell, Section, esc, table
from .media import MediaDir, image_uri, thumbnail


# --- numbers from the evaluation -----------------------------------------------------------------

def directions_of(result: dict[str, Any]) -> list[str]:
    dims = result.get("dims", {})
    return list(next(iter(dims.values())).keys()) if dims else []


def ks_of(result: dict[str, Any]) -> list[str]:
    for block in result.get("dims", {}).values():
        for rk in block.values():
            return list(rk)
    return []


@styled
def recall_curves_figure(result: dict[str, Any], label: str):
    """One panel per retrieval direction: R@K (one line per K) against the Matryoshka dim."""
    dirs, ks = directions_of(result), ks_of(result)
    if not dirs:
        return None
    dims = sorted(int(d) for d in result["dims"])
    ncols = min(3, len(dirs))
    nrows = math.ceil(len(dirs) / ncols)
    fig, axes = new_figure(4.3 * ncols, 3.3 * nrows, nrows, ncols, sharey=True)
    flat = [a for row in axes for a in row]
    for ax, d in zip(flat, dirs):
        for k in ks:
            ys = [result["dims"][str(x)][d][k] for x in dims]
            ax.plot(dims, ys, marker="o", label=k, color=K_COLORS.get(k))
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(x) for x in dims])
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_title(pretty_direction(d))
        ax.set_xlabel("Matryoshka embedding dim")
        ax.set_ylabel("recall (%)")
    for ax in flat[len(dirs):]:
        ax.set_visible(False)
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), title="Recall@K")
    fig.suptitle(textwrap.shorten(f"Recall@K vs embedding dim on {label}", 110, placeholder=" \u2026"))
    return fig


def recall_table(result: dict[str, Any], file: str) -> str:
    """One row per direction; R@K at every dim (largest first)."""
    dirs, ks = directions_of(result), ks_of(result)
    dims = sorted(result.get("dims", {}), key=int, reverse=True)
    header = ["direction", *[f"{k} @{d}" for d in dims for k in ks]]
    rows = [[pretty_direction(x), *[Cell(result["dims"][d][x][k], key=f"dims/{d}/{x}/{k}", file=file) for d in dims for k in ks]] for x in dirs]
    counts = ", ".join(f"{k[2:]} {v}" for k, v in result.items() if k.startswith("n_"))
    return (table(header, rows) + '<p class="meta">recall in %; @N: Matryoshka dim N. '
            + (f"Items evaluated: {esc(counts)}." if counts else "") + "</p>")


@styled
def digits_figure(digits: dict[str, Any]):
    per_digit, per_speaker = digits.get("per_digit", {}), digits.get("per_speaker", {})
    dims = sorted(int(d) for d in digits.get("dims", {}))
    fig, axes = new_figure(13, 3.4, 1, 3, gridspec_kw={"width_ratios": [2.2, 1.2, 1.0]})
    ax = axes[0][0]
    names = list(per_digit)
    ax.bar(names, [per_digit[n] for n in names], color="#1f77b4")
    ax.axhline(digits["chance"], color="grey", linestyle="--", label=f"chance {digits['chance']:.0f}%")
    ax.set_ylim(0, 105)
    ax.set_title(f"accuracy per digit (dim {dims[-1] if dims else ''}, {digits['n']} clips)")
    ax.set_xlabel("spoken digit (class)")
    ax.set_ylabel("accuracy (%)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(loc="lower right")
    ax = axes[0][1]
    speakers = list(per_speaker)
    ax.bar(speakers, [per_speaker[s] for s in speakers], color="#2ca02c")
    ax.axhline(digits["chance"], color="grey", linestyle="--")
    ax.set_ylim(0, 105)
    ax.set_title("accuracy per speaker")
    ax.set_xlabel("speaker")
    ax.set_ylabel("accuracy (%)")
    ax.tick_params(axis="x", rotation=30)
    ax = axes[0][2]
    ax.plot(dims, [digits["dims"][str(d)]["accuracy"] for d in dims], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_title("accuracy vs dim")
    ax.set_xlabel("Matryoshka embedding dim")
    ax.set_ylabel("accuracy (%)")
    return fig


def digits_html(digits: dict[str, Any], file: str, writer: FigureWriter, name: str) -> str:
    top = str(max(int(d) for d in digits["dims"])) if digits.get("dims") else None
    parts = [writer.save(digits_figure(digits), name, "Closed-set spoken-digit classification: each clip takes the digit word whose text embedding "
                         "is most similar (not zero-shot when the run trained on FSDD). Dashed: chance.")]
    rows = [["all", Cell(digits["accuracy"], key="digits/accuracy", file=file), Cell(digits["n"], key="digits/n", file=file)]]
    rows += [[f"digit {w}", Cell(v, key=f"digits/per_digit/{w}", file=file), ""] for w, v in digits.get("per_digit", {}).items()]
    rows += [[f"speaker {s}", Cell(v, key=f"digits/per_speaker/{s}", file=file), ""] for s, v in digits.get("per_speaker", {}).items()]
    parts.append(table(["class", f"accuracy (%) at dim {top}", "clips"], rows))
    return "".join(parts)


# --- the shared space ----------------------------------------------------------------------------

@dataclass
class Space:
    """Every distinct item of an evaluated dataset, per modality: raw input, embeddings at every
    dim (unit rows) and, for audio clips, the text they are paired with."""

    modalities: list[str]
    items: dict[str, list[Any]]
    emb: dict[str, dict[int, torch.Tensor]]
    transcript: dict[str, dict[int, str]]
    sample_index: dict[str, torch.Tensor]  # modality -> (N samples,) item index or -1
    dims: list[int]

    @classmethod
    def build(cls, model, data: PairedData, batch_size: int = 512, progress: bool = True) -> "Space":
        from tqdm.auto import tqdm

        mods = [m for m in data.modalities if m in model.core.heads]
        items, emb, transcript, index = {}, {}, {}, {}
        for m in tqdm(mods, desc="embedding", unit="modality", disable=not progress, leave=False):
            rows = data.rows[m]
            uniq = torch.unique(rows[rows >= 0])
            index[m] = torch.where(rows >= 0, torch.searchsorted(uniq, rows.clamp(min=0)), -1)
            raw: list[Any] = [None] * len(uniq)
            said: dict[int, str] = {}
            for i, s in enumerate(data.samples):
                j = int(index[m][i])
                if j >= 0:
                    raw[j] = getattr(s, m)
                    if m == "audio" and s.text:
                        said.setdefault(j, s.text)
            items[m], transcript[m] = raw, said
            emb[m] = embed_rows(model.core, data, m, uniq, batch_size) if len(uniq) else {}
        return cls(mods, items, emb, transcript, index, list(model.dims))

    def pairs(self) -> list[tuple[str, str]]:
        out = []
        for i, a in enumerate(self.modalities):
            for b in self.modalities[i + 1:]:
                if bool(((self.sample_index[a] >= 0) & (self.sample_index[b] >= 0)).any()):
                    out.append((a, b))
        return out

    def matched(self, a: str, b: str) -> torch.Tensor:
        """(P, 2) distinct (item of a, item of b) pairs that co-occur in a sample."""
        both = (self.sample_index[a] >= 0) & (self.sample_index[b] >= 0)
        return torch.unique(torch.stack([self.sample_index[a][both], self.sample_index[b][both]], 1), dim=0)

    def positives(self, a: str, b: str) -> torch.Tensor:
        pos = torch.zeros(len(self.items[a]), len(self.items[b]), dtype=torch.bool)
        m = self.matched(a, b)
        pos[m[:, 0], m[:, 1]] = True
        return pos


def gap_stats(space: Space, a: str, b: str, dim: int) -> dict[str, float]:
    """Centroid distance and mean matched / unmatched cosine between two modalities at ``dim``."""
    ea, eb = space.emb[a][dim].double(), space.emb[b][dim].double()
    m = space.matched(a, b)
    matched = (ea[m[:, 0]] * eb[m[:, 1]]).sum(1)
    total = float(ea.sum(0) @ eb.sum(0))
    n_unmatched = len(ea) * len(eb) - len(m)
    return {"centroid_distance": float((ea.mean(0) - eb.mean(0)).norm()), "matched_cosine": float(matched.mean()),
            "unmatched_cosine": (total - float(matched.sum())) / max(n_unmatched, 1), "matched_pairs": len(m)}


@styled
def gap_figure(space: Space, dim: int, seed: int = 0, max_unmatched: int = 20000):
    """Per modality pair: histograms of matched vs unmatched cosine similarity at ``dim``."""
    pairs = space.pairs()
    if not pairs:
        return None
    g = torch.Generator().manual_seed(seed)
    fig, axes = new_figure(4.6 * len(pairs), 3.4, 1, len(pairs), sharey=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ea, eb = space.emb[a][dim], space.emb[b][dim]
        m = space.matched(a, b)
        pos = space.positives(a, b)
        matched = (ea[m[:, 0]] * eb[m[:, 1]]).sum(1).numpy()
        i = torch.randint(len(ea), (max_unmatched,), generator=g)
        j = torch.randint(len(eb), (max_unmatched,), generator=g)
        keep = ~pos[i, j]
        unmatched = (ea[i[keep]] * eb[j[keep]]).sum(1).numpy()
        bins = np.linspace(-1, 1, 81)
        ax.hist(unmatched, bins=bins, density=True, alpha=0.6, color="#7f7f7f", label=f"unmatched (mean {unmatched.mean():.2f})")
        ax.hist(matched, bins=bins, density=True, alpha=0.6, color="#ff7f0e", label=f"matched (mean {matched.mean():.2f})")
        st = gap_stats(space, a, b, dim)
        ax.set_title(f"{a} vs {b}: centroid distance {st['centroid_distance']:.2f}")
        ax.set_xlabel(f"cosine similarity (dim {dim})")
        ax.set_ylabel("density")
        lo = float(min(unmatched.min(initial=1), matched.min(initial=1)))
        ax.set_xlim(max(-1, lo - 0.1), 1)
        ax.legend(loc="upper left")
    return fig


def gap_html(space: Space, writer: FigureWriter, name: str, seed: int) -> str:
    pairs = space.pairs()
    if not pairs:
        return "<p>No two modalities co-occur in this data.</p>"
    rows = []
    for a, b in pairs:
        for d in space.dims:
            st = gap_stats(space, a, b, d)
            rows.append([f"{a} \u2013 {b}", Cell(d), Cell(st["centroid_distance"], digits=3), Cell(st["matched_cosine"], digits=3),
                         Cell(st["unmatched_cosine"], digits=3), Cell(st["matched_cosine"] - st["unmatched_cosine"], digits=3), Cell(st["matched_pairs"])])
    fig = gap_figure(space, space.dims[0], seed)
    return (writer.save(fig, name, f"Modality gap at dim {space.dims[0]}: cosine similarity of matched pairs (orange) against unmatched pairs "
                        "(grey, a random sample); the title gives the distance between the two modalities' centroids (unit vectors).")
            + table(["modalities", "dim", "centroid distance", "mean matched cosine", "mean unmatched cosine", "margin", "matched pairs"], rows))


@styled
def tsne_figure(space: Space, max_points: int = 800, max_lines: int = 150, seed: int = 0, perplexity: float = 30.0):
    """t-SNE (scikit-learn, PCA-initialised) of the largest-dim embeddings of at most
    ``max_points`` items, coloured by modality; grey lines join the items of matched samples."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    dim = space.dims[0]
    n_samples = len(next(iter(space.sample_index.values())))
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: dict[str, dict[int, int]] = {m: {} for m in space.modalities}  # item -> point index
    points: list[tuple[str, int]] = []
    joined: list[list[int]] = []
    for i in order:
        here = [(m, int(space.sample_index[m][i])) for m in space.modalities if int(space.sample_index[m][i]) >= 0]
        if len(here) < 2:
            continue
        new = sum(1 for m, j in here if j not in chosen[m])
        if len(points) + new > max_points:
            if len(points) >= max_points:
                break
            continue
        ids = []
        for m, j in here:
            if j not in chosen[m]:
                chosen[m][j] = len(points)
                points.append((m, j))
            ids.append(chosen[m][j])
        joined.append(ids)
    if len(points) < 5:
        return None, 0
    from threadpoolctl import threadpool_limits

    x = torch.stack([space.emb[m][dim][j] for m, j in points]).numpy().astype(np.float64)
    perp = float(min(perplexity, max(2.0, (len(x) - 1) / 3)))
    # one OpenMP thread: on a shared 2-core machine t-SNE's threads spin against each other (10x slower)
    with threadpool_limits(1):
        if x.shape[1] > 50 and len(x) > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        xy = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)
    fig, axes = new_figure(7.8, 6.4)
    ax = axes[0][0]
    from matplotlib.collections import LineCollection

    segs = []
    for ids in joined[:max_lines]:
        for p in range(len(ids)):
            for q in range(p + 1, len(ids)):
                segs.append([xy[ids[p]], xy[ids[q]]])
    if segs:
        ax.add_collection(LineCollection(segs, colors="#555555", linewidths=0.6, alpha=0.35, label=f"matched pair ({min(len(joined), max_lines)} samples)"))
    for m in space.modalities:
        idx = [k for k, (mm, _) in enumerate(points) if mm == m]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=12, alpha=0.85, color=MODALITY_COLORS.get(m), label=f"{m} ({len(idx)})", edgecolors="none")
    ax.set_title(f"t-SNE of the shared space (dim {dim}, {len(points)} items, perplexity {perp:.0f})")
    ax.set_xlabel("t-SNE 1 (arbitrary units)")
    ax.set_ylabel("t-SNE 2 (arbitrary units)")
    ax.legend(loc="best", markerscale=1.5)
    return fig, len(points)


def _label(space: Space, m: str, j: int, width: int = 34) -> str:
    item = space.items[m][j]
    if m == "text":
        text = str(item)
    elif m == "audio":
        text = "clip: " + space.transcript[m].get(j, Path(str(item)).name if isinstance(item, str) else f"#{j}")
    else:
        text = Path(str(item)).name if isinstance(item, str) else f"image #{j}"
    return text if len(text) <= width else text[: width - 1] + "\u2026"


@styled
def heatmap_figure(space: Space, rows_m: str, cols_m: str, n: int = 10, seed: int = 0):
    """Cosine similarity between ``n`` matched pairs (distinct items on both sides) at the largest
    dim: row i and column i belong to the same sample, so a good space has a bright diagonal."""
    dim = space.dims[0]
    m = space.matched(cols_m, rows_m)  # (P, 2): column item, row item
    perm = torch.randperm(len(m), generator=torch.Generator().manual_seed(seed))
    used_r, used_c, pick = set(), set(), []
    for k in perm.tolist():
        c, r = int(m[k, 0]), int(m[k, 1])
        if c not in used_c and r not in used_r:
            used_c.add(c)
            used_r.add(r)
            pick.append((r, c))
        if len(pick) == n:
            break
    if len(pick) < 2:
        return None
    R = torch.stack([space.emb[rows_m][dim][r] for r, _ in pick])
    C = torch.stack([space.emb[cols_m][dim][c] for _, c in pick])
    sims = (R @ C.t()).numpy()
    k = len(pick)
    images = cols_m == "image"
    fig, axes = new_figure(0.6 * k + 4.8, 0.5 * k + (2.5 if images else 2.4), 2 if images else 1, 1,
                           gridspec_kw={"height_ratios": [1.15, k]} if images else None, sharex=images)
    ax = axes[-1][0]
    im = ax.imshow(sims, cmap="viridis", vmin=float(sims.min()), vmax=float(sims.max()), aspect="auto")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if sims[i, j] < sims.min() + 0.6 * (sims.max() - sims.min()) else "black")
    ax.set_yticks(range(k), [_label(space, rows_m, r) for r, _ in pick], fontsize=8)
    ax.set_xticks(range(k), [str(i + 1) if images else _label(space, cols_m, c, 18) for i, (_, c) in enumerate(pick)],
                  rotation=0 if images else 45, ha="center" if images else "right", fontsize=8)
    ax.set_xlabel(f"{cols_m} (column i is matched with row i)")
    ax.set_ylabel(rows_m)
    ax.grid(False)
    fig.colorbar(im, ax=[a[0] for a in axes], label=f"cosine similarity (dim {dim})", shrink=0.8)  # all rows: columns stay aligned
    if images:
        top = axes[0][0]
        px = 64
        strip = np.full((px, px * k, 3), 255, dtype=np.uint8)
        for i, (_, c) in enumerate(pick):
            t = thumbnail(space.items[cols_m][c], px)
            if t is not None:
                a = np.asarray(t.convert("RGB"))
                h, w = a.shape[:2]
                strip[(px - h) // 2:(px - h) // 2 + h, i * px + (px - w) // 2:i * px + (px - w) // 2 + w] = a
        top.imshow(strip, extent=(-0.5, k - 0.5, 0, 1), aspect="auto")
        top.set_axis_off()
        top.set_title(f"similarity of {k} matched {rows_m}\u2013{cols_m} pairs (images above their columns)")
    else:
        ax.set_title(f"similarity of {k} matched {rows_m}\u2013{cols_m} pairs")
    return fig


# --- sample queries ------------------------------------------------------------------------------

def item_html(space: Space, m: str, j: int, thumb_px: int, media: MediaDir) -> str:
    item = space.items[m][j]
    name = Path(str(item)).name if isinstance(item, str) else f"#{j}"
    if m == "image":
        uri = image_uri(item, thumb_px)
        body = f'<img src="{uri}" alt="{esc(name)}" title="{esc(item if isinstance(item, str) else name)}" loading="eager">' if uri else f"<i>undecodable image {esc(name)}</i>"
        return body + f'<span class="caption meta">{esc(name)}</span>'
    if m == "audio":
        uri = media.audio(item)
        body = f'<audio controls preload="metadata" src="{uri}" title="{esc(name)}"></audio>' if uri else f"<i>unplayable clip {esc(name)}</i>"
        said = space.transcript[m].get(j)
        return body + f'<span class="caption meta">{esc(name)}' + (f": \u201c{esc(said)}\u201d" if said else "") + "</span>"
    return f'<span class="caption">{esc(item)}</span>'


def retrieval_samples_html(space: Space, direction: str, media: MediaDir, n_queries: int = 8, k: int = 5, seed: int = 0, thumb_px: int = 96) -> str:
    """A table: each sample query, then its top-k items (cosine at the largest dim), correct ones marked."""
    q, g = direction.split("_to_")
    if q not in space.emb or g not in space.emb or not space.emb[q] or not space.emb[g]:
        return ""
    dim = space.dims[0]
    pos = space.positives(q, g)
    has = pos.any(1).nonzero().squeeze(1)
    if not len(has):
        return ""
    pick = has[torch.randperm(len(has), generator=torch.Generator().manual_seed(seed))[:n_queries]].tolist()
    sims = space.emb[q][dim][pick] @ space.emb[g][dim].t()
    rows = []
    for r, qi in enumerate(pick):
        order = sims[r].argsort(descending=True)
        rank = int((pos[qi][order]).nonzero()[0]) + 1
        cells = [f'<td class="query"><div class="item">{item_html(space, q, qi, thumb_px, media)}<br><span class="meta">first correct at rank {rank}</span></div></td>']
        for gi in order[:k].tolist():
            hit = bool(pos[qi, gi])
            mark = "\u2713 correct" if hit else "\u2717"
            cells.append(f'<td class="{"hit" if hit else "miss"}"><div class="item">{item_html(space, g, gi, thumb_px, media)}'
                         f'<span class="mark">{mark}</span> <span class="score">cos {float(sims[r, gi]):.3f}</span></div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>query</th>" + "".join(f"<th>top {i + 1}</th>" for i in range(k)) + "</tr>"
    return (f"<h3>{esc(pretty_direction(direction))}: {len(pick)} sample queries, top {k} of {len(space.items[g])} {esc(g)} items</h3>"
            f'<table class="retrieval" data-direction="{esc(direction)}"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')


def space_sections(space: Space, label: str, writer: FigureWriter, opts) -> list[Section]:
    """Embedding-space figures of one evaluated dataset (the report's first)."""
    out = []
    sec = Section("Shared space: t-SNE", "tsne")
    fig, n = tsne_figure(space, opts.tsne_points, opts.tsne_lines, opts.seed)
    if fig is None:
        sec.note("too few matched items for a t-SNE")
    else:
        sec.add(writer.save(fig, "tsne", f"t-SNE of {n} items of {label} (a random subsample; --tsne-points sets the size), one colour per modality; "
                            "grey lines join items of the same sample. Distances between far clusters are not meaningful in t-SNE."))
    out.append(sec)
    sec = Section("Modality gap", "gap")
    sec.add(gap_html(space, writer, "modality_gap", opts.seed))
    out.append(sec)
    sec = Section("Similarity of matched pairs", "heatmap")
    for a, b in space.pairs():
        rows_m, cols_m = (a, b) if a == "text" or (a == "audio" and b == "image") else (b, a)
        fig = heatmap_figure(space, rows_m, cols_m, opts.heatmap_pairs, opts.seed)
        if fig is not None:
            sec.add(writer.save(fig, f"heatmap_{rows_m}_{cols_m}", f"Cosine similarity of {rows_m} (rows) and {cols_m} (columns) for a batch of "
                                f"matched pairs from {label}: the diagonal holds the matched pairs."))
    out.append(sec)
    return out


def samples_section(space: Space, result: dict[str, Any], label: str, opts, media: MediaDir) -> Section:
    sec = Section("Sample queries", "queries")
    sec.para(f"Queries drawn at random from {label}; each row shows the top {opts.top_k} items by cosine similarity at dim {space.dims[0]}. "
             "Correct items (paired with the query in the data) are marked \u2713 and shaded green.")
    for d in directions_of(result):
        if "+" in d.split("_to_")[0] or "+" in d.split("_to_")[1]:
            continue
        sec.add(retrieval_samples_html(space, d, media, opts.queries, opts.top_k, opts.seed, opts.thumb_px))
    return sec
