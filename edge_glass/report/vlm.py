"""Vision-language runs: exact match / F1 (from the evaluation ``edge-glass eval`` runs) overall,
per answer type and per question template, a confusion matrix for closed answer sets, sample
predictions with their images, and the TRM decoder's halting steps."""
from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.qa import normalize_answer, qa_metrics
from .figures import FigureWriter, new_figure, styled
from .html import Cell, Section, esc, table
from .media import image_uri

MAX_CLOSED_SET = 20  # a closed answer set (confusion matrix) has at most this many distinct answers
MAX_GROUPS = 24


def answer_type(answer: str) -> str:
    """The VQA convention: yes/no, number, other."""
    a = normalize_answer(answer)
    if a in ("yes", "no"):
        return "yes/no"
    if re.fullmatch(r"\d+(\.\d+)?|zero|one|two|three|four|five|six|seven|eight|nine|ten", a):
        return "number"
    return "other"


def answer_types(predictions: list[dict[str, Any]]) -> list[str]:
    """Each sample's answer type: yes/no and number as in VQA; "other" answers split into the
    families of answers that the same question templates take (easy-VQA: shapes and colours),
    named by their members."""
    base = [answer_type(p["answer"]) for p in predictions]
    _, templates = question_groups(predictions)
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    first: dict[str, str] = {}
    for p, t, b in zip(predictions, templates, base):
        if b == "other":
            a = normalize_answer(p["answer"])
            parent[find(a)] = find(first.setdefault(t, a))
    families: dict[str, list[str]] = defaultdict(list)
    for a in parent:
        families[find(a)].append(a)
    if not 2 <= len(families) <= 8:
        return base
    name = {}
    for members in families.values():
        members = sorted(members)
        label = "other: " + ", ".join(members[:3]) + (", \u2026" if len(members) > 3 else "")
        name.update((m, label) for m in members)
    return [name.get(normalize_answer(p["answer"]), b) if b == "other" else b for p, b in zip(predictions, base)]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def question_groups(predictions: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(what, group of each sample): question templates (words that are answers in the data
    replaced by '_', e.g. "what color is the _") when templates repeat, else the VQA question
    type (the first three words)."""
    vocab = {w for p in predictions for w in _words(p["answer"])} - {"yes", "no"}
    templates = [" ".join("_" if w in vocab else w for w in _words(p["question"])) for p in predictions]
    counts = Counter(templates)
    if predictions and len(counts) <= 40 and len(predictions) / max(len(counts), 1) >= 3:
        return "question template", templates
    return "question type (first three words)", [" ".join(_words(p["question"])[:3]) for p in predictions]


def grouped_metrics(predictions: list[dict[str, Any]], groups: list[str], limit: int = MAX_GROUPS) -> list[tuple[str, dict[str, float]]]:
    """[(group, qa_metrics of its samples)], largest groups first; the rest pooled as '(other)'."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    ranked = sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    keep, rest = ranked[:limit], [i for _, idx in ranked[limit:] for i in idx]
    out = [(g, qa_metrics([predictions[i]["prediction"] for i in idx], [predictions[i]["answer"] for i in idx])) for g, idx in keep]
    if rest:
        out.append((f"(other: {len(ranked) - limit} groups)", qa_metrics([predictions[i]["prediction"] for i in rest], [predictions[i]["answer"] for i in rest])))
    return out


@styled
def grouped_figure(rows: list[tuple[str, dict[str, float]]], what: str):
    """Horizontal bars: exact match and F1 per group (with its sample count)."""
    n = len(rows)
    fig, axes = new_figure(9.5, max(2.2, 0.36 * n + 1.3))
    ax = axes[0][0]
    y = np.arange(n)
    ax.barh(y - 0.2, [r[1]["exact_match"] for r in rows], height=0.4, label="exact match", color="#1f77b4")
    ax.barh(y + 0.2, [r[1]["f1"] for r in rows], height=0.4, label="F1", color="#ff7f0e")
    ax.set_yticks(y, [f"{g} (n={r['n']})" for g, r in rows])
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 105)
    ax.set_xlabel("score (%)")
    ax.set_title(f"exact match and F1 per {what}")
    ax.legend(loc="lower right")
    return fig


def closed_set(predictions: list[dict[str, Any]]) -> list[str] | None:
    refs = Counter(normalize_answer(p["answer"]) for p in predictions)
    if not 2 <= len(refs) <= MAX_CLOSED_SET or any(len(a.split()) > 3 for a in refs):
        return None
    family = dict(zip((normalize_answer(p["answer"]) for p in predictions), answer_types(predictions)))
    return sorted(refs, key=lambda a: (family.get(a) != "yes/no", family.get(a, ""), a))


@styled
def confusion_figure(predictions: list[dict[str, Any]], labels: list[str]):
    """Rows: reference answer; columns: predicted answer (+ '(other)'); colour: row-normalised %,
    text: count."""
    cols = labels + ["(other)"]
    index = {a: i for i, a in enumerate(labels)}
    m = np.zeros((len(labels), len(cols)), dtype=np.int64)
    for p in predictions:
        r = index.get(normalize_answer(p["answer"]))
        if r is not None:
            m[r, index.get(normalize_answer(p["prediction"]), len(labels))] += 1
    share = 100.0 * m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(labels)
    fig, axes = new_figure(0.62 * len(cols) + 3.2, 0.5 * k + 2.2)
    ax = axes[0][0]
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for i in range(k):
        for j in range(len(cols)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 55 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted answer")
    ax.set_ylabel("reference answer")
    ax.grid(False)
    ax.set_title(f"confusion matrix ({len(predictions)} questions; numbers are counts)")
    fig.colorbar(im, ax=ax, label="share of the reference answer's questions (%)")
    return fig


@styled
def halting_figure(predictions: list[dict[str, Any]], n_sup: int | None):
    """Supervision steps a TRM decoder used before halting, at the first answer token; and the
    exact match of the questions by steps used."""
    steps = [p["halt_steps"][0] for p in predictions if p.get("halt_steps")]
    if not steps:
        return None
    top = max(max(steps), n_sup or 1)
    xs = list(range(1, top + 1))
    counts = Counter(steps)
    fig, axes = new_figure(10, 3.4, 1, 2)
    ax = axes[0][0]
    ax.bar(xs, [counts.get(x, 0) for x in xs], color="#9467bd")
    ax.set_xticks(xs)
    ax.set_xlabel(f"supervision steps used before halting (of n_sup = {n_sup})")
    ax.set_ylabel("questions")
    ax.set_title("halting steps at the first answer token")
    for x in xs:
        if counts.get(x):
            ax.annotate(f"{100 * counts[x] / len(steps):.1f}%", (x, counts[x]), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.15)
    ax.set_xlim(0.5, top + 0.5)
    ax = axes[0][1]
    em = []
    for x in xs:
        sel = [p for p in predictions if p.get("halt_steps") and p["halt_steps"][0] == x]
        em.append(qa_metrics([p["prediction"] for p in sel], [p["answer"] for p in sel])["exact_match"] if sel else math.nan)
    ax.bar(xs, em, color="#1f77b4")
    ax.set_xticks(xs)
    ax.set_ylim(0, 105)
    ax.set_xlim(0.5, top + 0.5)
    ax.set_xlabel("supervision steps used")
    ax.set_ylabel("exact match (%)")
    ax.set_title("exact match by halting step")
    return fig


def prediction_cards(predictions: list[dict[str, Any]], n: int, seed: int, thumb_px: int) -> str:
    """Up to n sample predictions, half of them errors where there are any, with their images."""
    from ..eval.qa import exact_match

    rng = random.Random(seed)
    idx = list(range(len(predictions)))
    rng.shuffle(idx)
    wrong = [i for i in idx if not exact_match(predictions[i]["prediction"], predictions[i]["answer"])]
    right = [i for i in idx if exact_match(predictions[i]["prediction"], predictions[i]["answer"])]
    pick = wrong[: n // 2]
    pick += right[: n - len(pick)]
    pick += wrong[n // 2: n // 2 + n - len(pick)]  # too few right answers: more errors
    cards = []
    for i in pick:
        p = predictions[i]
        ok = bool(exact_match(p["prediction"], p["answer"]))
        uri = image_uri(p["image"], thumb_px) if p.get("image") else None
        img = f'<img src="{uri}" alt="{esc(p["image"])}">' if uri else ("<i>image unavailable</i>" if p.get("image") else "<i>no image</i>")
        # what the decoder got after the run's drop (records older than "given" got everything they name)
        given = p.get("given") or [m for m in ("image", "audio", "question") if p.get(m)]
        if p.get("image") and "image" not in given:
            img += "<br><i>image not given to the decoder</i>"
        if p.get("audio") and "audio" in given:
            img += f'<br><i>heard: {esc(Path(str(p["audio"])).name)}</i>'  # a spoken question / speech
        unread = "" if "question" in given or not p.get("question") else " <i>(text not given)</i>"
        mark = "\u2713" if ok else "\u2717"
        cards.append(f'<div class="card {"ok" if ok else "wrong"}">{img}<b>Q:</b> {esc(p["question"])}{unread}<br><b>reference:</b> {esc(p["answer"])}<br>'
                     f'<b>generated:</b> <span class="{"ok-text" if ok else "bad-text"}">{esc(p["prediction"]) or "<i>(empty)</i>"}</span> '
                     f'{mark}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def summary_table(result: dict[str, Any], file: str) -> str:
    rows = [["exact match (%)", Cell(result["exact_match"], key="exact_match", file=file)],
            ["token F1 (%)", Cell(result["f1"], key="f1", file=file)],
            ["questions", Cell(result["n"], key="n", file=file)],
            ["distinct generated answers", Cell(result["distinct_answers"], key="distinct_answers", file=file)]]
    if "majority_answer" in result:
        rows.append([f"majority-answer baseline (always \u201c{result['majority_answer']}\u201d), exact match (%)",
                     Cell(result["majority_exact_match"], key="majority_exact_match", file=file)])
    return table(["metric", "value"], rows)


def vlm_sections(cfg: Any, evals: list, writer: FigureWriter, opts) -> list[Section]:
    sec = Section("Results", "results")
    secs = [sec]
    for k, ev in enumerate(evals):
        sec.h3(f"{ev.label} ({ev.file})")
        if ev.refresh_note:
            sec.note(ev.refresh_note)
        sec.add(summary_table(ev.result, ev.file))
        preds = ev.details.get("predictions") or []
        if not preds:
            continue
        tag = f"_{k}" if k else ""
        types = answer_types(preds)
        if len(set(types)) > 1:
            rows = grouped_metrics(preds, types)
            sec.add(writer.save(grouped_figure(rows, "answer type"), f"qa_answer_type{tag}", f"Exact match and F1 per answer type on {ev.label}."))
            sec.add(table(["answer type", "questions", "exact match (%)", "F1 (%)"], [[g, Cell(r["n"]), Cell(r["exact_match"]), Cell(r["f1"])] for g, r in rows]))
        what, groups = question_groups(preds)
        rows = grouped_metrics(preds, groups)
        if len(rows) > 1:
            sec.add(writer.save(grouped_figure(rows, what), f"qa_question_groups{tag}", f"Exact match and F1 per {what} on {ev.label} "
                                "(in templates, '_' stands for a word that is an answer somewhere in the data)."))
        labels = closed_set(preds)
        if labels:
            sec.add(writer.save(confusion_figure(preds, labels), f"qa_confusion{tag}",
                                f"Confusion matrix of the closed answer set ({len(labels)} answers) on {ev.label}; '(other)' collects predictions outside it."))
        if any(p.get("halt_steps") for p in preds):
            fig = halting_figure(preds, getattr(cfg.decoder, "n_sup", None))
            sec.add(writer.save(fig, f"trm_halting{tag}", f"TRM halting on {ev.label}: how many deep-supervision steps the decoder ran before its "
                                "Q head said halt (at the first answer token), and the exact match of each group."))
        s2 = Section(f"Sample predictions: {ev.label}", f"predictions{tag}")
        s2.para("Drawn at random (seeded), half of them errors when there are any: generated answer vs reference, green when they match exactly.")
        s2.add(prediction_cards(preds, opts.predictions, opts.seed, opts.thumb_px))
        secs.append(s2)
    return secs
