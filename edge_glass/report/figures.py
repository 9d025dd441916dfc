"""Matplotlib figures of the report on the Agg canvas (object API: no pyplot, no GUI backend, no
global figure state, so a notebook's inline backend is left alone), written as PNG and SVG under
``DIR/figures/`` and embedded in the page as PNG data: URIs."""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any, Callable

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_write_bytes
from .html import data_uri, esc

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 110, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
    "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none", "legend.framealpha": 0.85,
}
MODALITY_COLORS = {"image": "#1f77b4", "text": "#d62728", "audio": "#2ca02c", "image+audio": "#9467bd"}
K_COLORS = {"R@1": "#1f77b4", "R@5": "#ff7f0e", "R@10": "#2ca02c"}
ARROW = "\u2192"


def pretty_direction(direction: str) -> str:
    """text_to_image -> 'text → image'."""
    return f" {ARROW} ".join(direction.split("_to_"))


def styled(fn: Callable) -> Callable:
    """Run a figure-making function under the report's matplotlib style."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


class ReportFigure(Figure):
    """A Figure that Jupyter shows inline as PNG without pyplot's inline backend (_repr_png_)."""

    def _repr_png_(self) -> bytes:
        return figure_bytes(self, "png")


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs: Any):
    """(fig, axes) on an Agg canvas with a constrained layout (labels never overlap the axes)."""
    fig = ReportFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format=fmt, facecolor="white")
    return buf.getvalue()


class FigureWriter:
    """save(fig, name, caption): figures/NAME.png (+ .svg) written, the page's <figure> block returned."""

    def __init__(self, out_dir: Path, formats: tuple[str, ...] = ("png", "svg")):
        self.dir = Path(out_dir) / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.formats = tuple(formats)
        self.written: list[Path] = []

    def save(self, fig: Figure, name: str, caption: str) -> str:
        png = figure_bytes(fig, "png")
        for fmt in self.formats:
            path = self.dir / f"{name}.{fmt}"
            atomic_write_bytes(path, png if fmt == "png" else figure_bytes(fig, fmt))
            self.written.append(path)
        files = ", ".join(f"figures/{name}.{f}" for f in self.formats)
        return (f'<figure id="fig-{esc(name)}"><img src="{data_uri(png, "image/png")}" alt="{esc(caption)}" data-figure="{esc(name)}">'
                f'<figcaption>{esc(caption)} <span class="meta">({esc(files)})</span></figcaption></figure>')
