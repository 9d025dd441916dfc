"""The notebooks are committed with their outputs stripped and read their settings from
EDGE_GLASS_NOTEBOOK_PARAMS; tests/report/test_notebooks_run.py runs each of them top to bottom on
tiny settings (it shares that folder's trained runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    """Outputs stay out of git (no nbstripout needed): clear them before committing, e.g. with
    jupyter nbconvert --clear-output --inplace notebooks/*.ipynb"""
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert set(nb.get("metadata", {})) <= {"kernelspec", "language_info"}, nb["metadata"]
    assert any("EDGE_GLASS_NOTEBOOK_PARAMS" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
