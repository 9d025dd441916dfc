"""Evaluation you can look at: ``edge-glass report RUN`` -> one self-contained report.html with
its figures (PNG + SVG) and the eval JSON it was drawn from.

    from edge_glass.report import build_report, ReportOptions
    build_report("runs/qs", out="runs/qs/report", options=ReportOptions(tsne_points=500))

    from edge_glass.report import views          # the same figures one by one (notebooks)
    views.training_curves("runs/qs")
"""
from . import views
from .build import EvalSet, ReportOptions, build_report, default_specs, evaluate

__all__ = ["EvalSet", "ReportOptions", "build_report", "default_specs", "evaluate", "views"]
