"""The report page: one self-contained HTML file (figures and thumbnails as data: URIs, audio as
data: URIs), no scripts from anywhere, opens from disk without a server or the internet.

Numbers that come from an evaluation JSON are marked ``data-file`` (the JSON file, relative to the
run directory) and ``data-key`` (the path inside it, '/'-separated), so a test (or a person with a
JSON viewer) can check every one of them against the file."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

CSS = """
:root { --ok: #1a7f37; --bad: #c62828; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328;
       margin: 0; padding: 0 24px 48px; max-width: 1280px; margin-inline: auto; }
header { padding: 18px 0 8px; border-bottom: 2px solid var(--line); }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: var(--muted); font-size: 13px; }
nav { margin: 12px 0; font-size: 14px; } nav a { margin-right: 14px; white-space: nowrap; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 1000px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: var(--bg); border: 1px solid var(--line); padding: 10px; overflow: auto; max-height: 520px; font-size: 12.5px; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 6px 10px; margin: 8px 0; font-size: 14px; }
.retrieval td { width: 150px; min-width: 120px; } .retrieval td.query { background: var(--bg); }
.item { font-size: 12px; } .item img { display: block; width: 96px; height: 96px; object-fit: cover; border: 3px solid transparent; }
.item audio { width: 140px; height: 32px; display: block; }
.hit { background: #dafbe1; } .hit img { border-color: var(--ok); } .miss img { border-color: #eee; }
.mark { font-weight: 700; } .hit .mark { color: var(--ok); } .miss .mark { color: var(--bad); }
.caption { display: block; max-width: 150px; overflow-wrap: anywhere; }
.score { color: var(--muted); font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; } .card { border: 1px solid var(--line); padding: 6px; width: 200px; font-size: 13px; }
.card img { width: 96px; height: 96px; object-fit: cover; display: block; margin-bottom: 4px; }
.card.ok { border-left: 5px solid var(--ok); } .card.wrong { border-left: 5px solid var(--bad); }
.ok-text { color: var(--ok); font-weight: 600; } .bad-text { color: var(--bad); font-weight: 600; }
details summary { cursor: pointer; color: #0969da; }
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Cell:
    """A table cell; ``key`` + ``file``: a number read from that evaluation JSON (checked by tests)."""

    value: Any
    key: str | None = None
    file: str | None = None
    digits: int = 2
    raw_html: bool = False

    def render(self, tag: str = "td") -> str:
        numeric = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
        attrs = ' class="num"' if numeric else ""
        if self.key is not None:
            attrs += f' data-key="{esc(self.key)}" data-file="{esc(self.file or "eval.json")}"'
        body = self.value if self.raw_html else esc(fmt(self.value, self.digits))
        return f"<{tag}{attrs}>{body}</{tag}>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        body.append("<tr>" + "".join((c if isinstance(c, Cell) else Cell(c)).render() for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


@dataclass
class Section:
    title: str
    anchor: str
    parts: list[str] = field(default_factory=list)

    def add(self, part: str) -> "Section":
        self.parts.append(part)
        return self

    def note(self, text: str) -> "Section":
        return self.add(f'<div class="note">{esc(text)}</div>')

    def para(self, text: str) -> "Section":
        return self.add(f"<p>{esc(text)}</p>")

    def h3(self, text: str) -> "Section":
        return self.add(f"<h3>{esc(text)}</h3>")


def page(title: str, meta: list[str], sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>{"".join(s.parts)}</section>' for s in sections)
    meta_html = "<br>".join(esc(m) for m in meta)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><header><h1>{esc(title)}</h1>"
            f'<div class="meta">{meta_html}</div><nav>{nav}</nav></header>{body}</body></html>')
