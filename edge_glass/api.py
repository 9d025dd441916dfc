"""Using a trained run from Python (and the CLI's eval / embed / info verbs). Thin: every verb
looks the run's task up in the one registry (edge_glass.tasks) and calls it.

    model = edge_glass.load("runs/quickstart")                    # device="cuda" to run there
    img = model.encode_images(["a.jpg", pil_image], dim=128)    # (2, 128), unit rows
    txt = model.encode_texts(["a dog on a beach"])               # (1, 512) at the largest dim
    scores = img @ txt.T

    edge_glass.export_run("runs/quickstart", "export/qs", dim=128, int8=True)   # ONNX towers for edge_glass.runtime
    model = edge_glass.from_pretrained("hf/qs")                  # a save_pretrained / format="hf" directory
    edge_glass.api.report("runs/quickstart")                     # runs/quickstart/report/report.html + figures
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.samples import DataReport
from .errors import EdgeGlassError
from .runs import RunDir
from .tasks import task_class, task_for


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(run_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a trained run directory (its config.yaml + model.safetensors; no YAML needed) on
    ``device`` (default: CUDA if available): an AlignedModel for alignment runs (``.encode_*``),
    a VisionLanguageModel for vlm runs (``.answer``), whatever its task's ``load_run`` returns."""
    run = RunDir(run_dir)
    return task_class(run.read_config().task).load_run(run, resolve_device(device))


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Metrics of a run on a dataset spec (default: the run's own test split), as its task
    defines them; ``skipped`` counts unusable samples and ``skipped_samples`` names them."""
    model = load(run_dir, device)
    report = DataReport()
    result = task_for(model.cfg).evaluate_run(model, data, report, progress)
    result["skipped"] = len(report.skipped)
    if report.skipped:
        result["skipped_by_reason"] = dict(report.reasons())
        result["skipped_samples"] = [s.__dict__ for s in report.skipped]
    return result


def parameter_rows(cfg: Any, run_dir: Path | None = None) -> list[tuple[str, int, int]]:
    """(module, total, trainable) parameter counts of an experiment, frozen backbones included."""
    return task_for(cfg).parameter_rows(run_dir)


EXPORT_FORMATS = ("onnx", "torchscript", "torch-export", "sentence-transformers", "hf", "peft")


def export(run_dir: str | Path, out: str | Path, format: str = "onnx", dim: int | None = None, int8: bool = False,
           merge: bool = False, threads: int | None = None) -> Path:
    """Write a trained run in another format into ``out`` and return it:

    onnx                   one tower per modality for ``edge_glass.runtime.ExportedModel`` (no torch needed);
                           ``dim`` truncates (Matryoshka), ``int8`` adds int8 graphs where they pay
    torchscript            a TRM / tiny vlm run's whole answer path (recursion, halting, greedy decoding) as one
                           ``torch.jit.load`` module + tokenizer (``edge_glass.export.torchscript.load_torchscript``)
    sentence-transformers  the text tower as a SentenceTransformer directory (alignment runs)
    hf                     save_pretrained: config.json + model.safetensors + a model card README.md
    peft                   a LoRA decoder as a PEFT adapter (``merge``: a merged causal LM) + its projector
    torch-export           an NL-MM run's embedding path per modality as torch.export programs (+ TorchScript),
                           parity-checked (edge_glass.export.nlmm); ``torchscript`` on an NL-MM run writes the same
    """
    from .export import formats, onnx

    if format not in EXPORT_FORMATS:
        raise EdgeGlassError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "torch-export" or (format == "torchscript" and RunDir(run_dir).read_config().task == "nlmm"):
        from .export.nlmm import export_nlmm

        return export_nlmm(run_dir, out, dim=dim)
    if format == "torchscript":
        from .export.torchscript import export_torchscript

        return export_torchscript(run_dir, out)
    if format == "onnx":
        onnx.export_run(run_dir, out, dim=dim, int8=int8, threads=threads)
        return Path(out)
    model = load(run_dir, "cpu")
    if format == "sentence-transformers":
        return formats.export_sentence_transformer(model, out, dim)
    if format == "hf":
        return formats.save_pretrained(model, out)
    return formats.save_peft_adapter(model, out, merge=merge)


def from_pretrained(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """A model from a ``save_pretrained`` (``export --format hf``) directory, on ``device``."""
    from .export.formats import from_pretrained as _from_pretrained

    return _from_pretrained(path, resolve_device(device))


def push_to_hub(path: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload an exported directory to the Hugging Face Hub; fails at once when no Hub is reachable."""
    from .export.formats import push_to_hub as _push

    return _push(Path(path), repo_id, private=private, token=token)


def report(run_dir: str | Path, data: str | list[str] | None = None, out: str | Path | None = None, progress: bool = True,
           device: str | torch.device | None = None, **options: Any) -> Path:
    """Evaluate a run as ``evaluate`` does (on each of ``data``: dataset specs; default the run's
    test split, its data.eval sets and, for FSDD-trained alignment runs, FSDD's test takes), write
    the metrics (``out``/eval*.json, the run's eval*.json refreshed), draw the figures (PNG + SVG
    under ``out``/figures) and return ``out``/report.html (default ``out``: RUN/report), one
    self-contained page. A directory holding ablation.json gets the comparison of its variants.
    ``options``: fields of edge_glass.report.ReportOptions (tsne_points=800, queries=8, ...)."""
    from .report import ReportOptions, build_report

    unknown = sorted(set(options) - set(ReportOptions.__dataclass_fields__))
    if unknown:
        raise EdgeGlassError(f"report: unknown option {', '.join(unknown)}; known: {', '.join(ReportOptions.__dataclass_fields__)}")
    specs = [data] if isinstance(data, str) else data
    return build_report(run_dir, specs, out, progress=progress, device=resolve_device(device), options=ReportOptions(**options))
