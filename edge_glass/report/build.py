"""``edge-glass report RUN``: evaluate a run with the code ``edge-glass eval`` runs (the task's
``evaluate_run``), write the metrics as eval JSON (the run's eval.json refreshed), draw the
figures and assemble one self-contained report.html."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..atomic import atomic_write_json, atomic_write_text
from ..data.formats import parse_spec
from ..data.samples import DataReport
from ..errors import EdgeGlassError
from ..runs import RunDir, slug
from ..tasks import task_class, task_for
from . import ablation, alignment, common, vlm
from .figures import FigureWriter
from .media import MediaDir
from .html import Section, esc, page


@dataclass
class ReportOptions:
    """What the report draws, and how much of it (large data stays fast)."""

    tsne_points: int = 800  # t-SNE on at most this many items (a seeded subsample)
    tsne_lines: int = 150  # matched samples joined by lines in the t-SNE
    queries: int = 8  # sample queries per retrieval direction
    top_k: int = 5
    heatmap_pairs: int = 10
    predictions: int = 12  # sample predictions shown (vlm)
    thumb_px: int = 96  # thumbnails' longer side
    seed: int = 0
    formats: tuple[str, ...] = ("png", "svg")
    refresh_run_eval: bool = True  # also write the metrics into the run directory (RUN/eval*.json)


@dataclass
class EvalSet:
    """One evaluated dataset: the run's test split (spec None) or a --data spec."""

    spec: str | None
    label: str
    file: str  # eval.json | eval_<slug>.json (in the report folder and the run directory)
    result: dict[str, Any]
    details: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    refresh_note: str = ""


class Phases:
    """Wall time of each phase of the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-glass")
    except PackageNotFoundError:
        return "(not installed)"


def eval_file(spec: str | None) -> str:
    """The name ``edge-glass train`` gives an evaluation: eval.json for the test split, eval_<slug>.json for a dataset."""
    return "eval.json" if spec is None else f"eval_{slug(spec)}.json"


def default_specs(cfg: Any) -> list[str | None]:
    """The run's test split, the datasets it evaluated after training (data.eval) and, for an
    alignment run trained on FSDD, that dataset's own test takes (spoken-digit accuracy per class)."""
    specs: list[str | None] = [None, *getattr(cfg.data, "eval", [])]
    if cfg.task == "alignment":
        specs += [s for s in cfg.data.train if parse_spec(s)[0].startswith("fsdd") and s not in specs]
    return specs


def evaluate(model: Any, spec: str | None, progress: bool) -> EvalSet:
    """The metrics ``edge-glass eval RUN [--data SPEC]`` computes (the task's evaluate_run, with
    the skipped samples counted the same way), plus what the figures need."""
    cfg = model.cfg
    report, details = DataReport(), {}
    result = task_for(cfg).evaluate_run(model, spec, report, progress, details=details)
    result["skipped"] = len(report.skipped)
    if report.skipped:
        result["skipped_by_reason"] = dict(report.reasons())
        result["skipped_samples"] = [s.__dict__ for s in report.skipped]
    label = f"the test split of {', '.join(cfg.data.train)}" if spec is None else spec
    return EvalSet(spec, label, eval_file(spec), result, details, [s.__dict__ for s in report.skipped])


def _numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for k, v in obj.items():
            out.update(_numbers(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def write_eval(run: RunDir, out: Path, ev: EvalSet, refresh: bool) -> None:
    """OUT/<file> holds exactly what ``edge-glass eval --json`` writes; the run's copy is refreshed
    (keys the report does not compute, such as trainable_parameters, kept) and a change against
    the training-time numbers is noted."""
    result = dict(ev.result)
    predictions = result.pop("predictions", None)
    atomic_write_json(out / ev.file, result)
    if ev.details.get("predictions") is not None:
        atomic_write_json(out / ev.file.replace(".json", "_predictions.json"), ev.details["predictions"])
    elif predictions is not None:
        atomic_write_json(out / ev.file.replace(".json", "_predictions.json"), predictions)
    if not refresh:
        return
    target = run.file(ev.file)
    old: dict[str, Any] = {}
    if target.is_file():
        try:
            old = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
    before, after = _numbers(old), _numbers(result)
    changed = {k: (before[k], v) for k, v in after.items() if k in before and abs(before[k] - v) > 1e-9 and not k.startswith("skipped")}
    if old and changed:
        k, (a, b) = max(changed.items(), key=lambda kv: abs(kv[1][0] - kv[1][1]))
        ev.refresh_note = f"{len(changed)} numbers differ from the earlier {ev.file} (largest: {k} {a} -> {b}); the file now holds these."
    try:
        atomic_write_json(target, {**old, **result} if isinstance(old, dict) else result)
    except EdgeGlassError as err:  # a read-only run directory: the report folder still has the file
        ev.refresh_note = f"{target} not refreshed: {err}"


def build_report(run_dir: str | Path, data: Sequence[str] | None = None, out: str | Path | None = None, progress: bool = True,
                 device: torch.device | str = "cpu", options: ReportOptions | None = None) -> Path:
    """Write OUT/report.html (default OUT: RUN/report) with its figures and eval JSON; returns the HTML's path."""
    opts = options or ReportOptions()
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise EdgeGlassError(f"{run.path}: no such run directory")
    out_dir = Path(out) if out else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not out_dir.is_dir():
        raise EdgeGlassError(f"--out {out_dir}: not a folder")
    writer = FigureWriter(out_dir, opts.formats)
    phases = Phases()
    t0 = time.time()
    if run.file("ablation.json").is_file() and not run.file("config.yaml").is_file():
        with phases("comparison figures"):
            results = run.read_json("ablation.json")
            sections = ablation.ablation_sections(run.path, results, writer)
        title = f"Ablation report: {run.path.name}"
        meta = [f"{run.path.resolve()}: {len(results)} variants ({', '.join(results)})"]
    else:
        with phases("load the run"):
            cfg = run.read_config()
            model = task_class(cfg.task).load_run(run, device)
        specs: list[str | None] = list(data) if data else default_specs(cfg)
        evals = []
        for spec in specs:
            with phases(f"evaluate on {spec or 'the test split'}"):
                ev = evaluate(model, spec, progress)
                write_eval(run, out_dir, ev, opts.refresh_run_eval)
            evals.append(ev)
        sections = []
        if cfg.task == "alignment":
            sections += alignment_sections(model, evals, writer, opts, progress, phases)
        else:
            with phases("figures and tables"):
                if cfg.task == "vlm":
                    sections += vlm.vlm_sections(cfg, evals, writer, opts)
                else:  # a task without report figures of its own: its metrics as they are
                    sections.append(Section("Results", "results").add(f"<pre>{esc(json.dumps([e.result for e in evals], indent=1))}</pre>"))
        with phases("training curves"):
            sections.append(common.training_section(run, cfg.task, writer))
        with phases("parameter counts"):
            sections.append(common.parameters_section(task_for(cfg).parameter_rows(run.path)))
        sections.append(common.data_section(run, {e.label: e.skipped for e in evals}))
        sections.append(common.config_section(run))
        title = f"Edge Glass report: {cfg.name} ({cfg.task})"
        meta = [f"run {run.path.resolve()}", "evaluated on: " + "; ".join(f"{e.label} ({e.file})" for e in evals)]
    sections.append(common.timing_section(run, phases.seconds))
    meta.append(f"written {time.strftime('%Y-%m-%d %H:%M:%S')} by edge-glass {_version()} in {time.time() - t0:.1f} s")
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, page(title, meta, sections))
    return html_path


def alignment_sections(model: Any, evals: list[EvalSet], writer: FigureWriter, opts: ReportOptions, progress: bool, phases: Phases) -> list[Section]:
    res = Section("Retrieval", "retrieval")
    with phases("recall figures"):
        _retrieval_results(res, evals, writer)
    sections = [res]
    first = next((e for e in evals if e.details.get("data") is not None and len(e.details["data"])), None)
    if first is not None:
        with phases("embed the shared space"):
            space = alignment.Space.build(model, first.details["data"], model.cfg.eval.batch_size, progress)
        if len(space.pairs()):
            with phases("t-SNE, modality gap, heatmaps"):
                sections += alignment.space_sections(space, first.label, writer, opts)
            with phases("sample queries"):
                sections.append(alignment.samples_section(space, first.result, first.label, opts, MediaDir(writer.dir.parent)))
    return sections


def _retrieval_results(res: Section, evals: list[EvalSet], writer: FigureWriter) -> None:
    for ev in evals:
        res.h3(f"{ev.label} ({ev.file})")
        if ev.refresh_note:
            res.note(ev.refresh_note)
        fig = alignment.recall_curves_figure(ev.result, ev.label)
        if fig is None:
            res.note("no retrieval pairs in this data")
        else:
            res.add(writer.save(fig, f"recall_vs_dim{'_' + slug(ev.spec) if ev.spec else ''}",
                                f"Recall@K against the Matryoshka dim on {ev.label}, every retrieval direction (a text query is correct when its "
                                "own image/clip is among the K nearest; an image or clip query when any of its texts is)."))
            res.add(alignment.recall_table(ev.result, ev.file))
        if "digits" in ev.result:
            res.add(f"<h3>Spoken digits on {esc(ev.label)}</h3>")
            res.add(alignment.digits_html(ev.result["digits"], ev.file, writer, f"digits{'_' + slug(ev.spec) if ev.spec else ''}"))
