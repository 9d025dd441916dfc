"""Each notebook runs top to bottom in a fresh kernel (nbclient) on tiny settings passed as JSON in
EDGE_GLASS_NOTEBOOK_PARAMS, on the real data subsets and runs this folder's fixtures train once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY_TRAIN = ["train.epochs=1", "train.batch_size=16", "train.threads=1", "train.log_every=2", "train.checkpoint_every=1000"]


def execute(path: Path, params: dict, monkeypatch, tmp_path: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("EDGE_GLASS_NOTEBOOK_PARAMS", json.dumps(params))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    (tmp_path / path.name).write_text(nbformat.writes(nb))  # executed copy, for a look after a failure
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return nb, images


def notebook(stem: str) -> Path:
    return next(p for p in NOTEBOOKS if p.stem.startswith(stem))


def test_01_vision_text_alignment(coco_subset, monkeypatch, tmp_path):
    params = {"overrides": [f"data.train=[coco:{coco_subset}]", "data.split.val=4", "data.split.test=12", *TINY_TRAIN],
              "out": str(tmp_path / "qs"), "tsne_points": 60, "progress": False}
    _, images = execute(notebook("01"), params, monkeypatch, tmp_path)
    assert images >= 5 and (tmp_path / "qs" / "eval.json").is_file()


def test_02_trimodal_alignment(tri_run, spoken8, fsdd_subset, monkeypatch, tmp_path):
    params = {"overrides": [f"data.train=[jsonl:{spoken8}, fsdd:{fsdd_subset}]", "data.split.val=1", "data.split.test=3", "model.dims=[32, 16]",
                            "encoders.audio.batch_size=8", "loss.pairs=[image-text, audio-text]", "loss.pair_weights={}", *TINY_TRAIN],
              "out": str(tmp_path / "tri"), "digits": f"fsdd:{fsdd_subset}", "tsne_points": 60, "progress": False}
    nb, images = execute(notebook("02"), params, monkeypatch, tmp_path)
    assert images >= 6
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    pairs = next(line for line in text.splitlines() if line.startswith("trained pairs:"))
    assert "audio_to_image" in text and "'image'" in pairs and "('audio', 'image')" not in pairs and "('image', 'audio')" not in pairs  # emergent


def test_03_trm_vlm_qa(monkeypatch, tmp_path):
    pytest.importorskip("easy_vqa")
    tiny = ["data.max_samples=120", "decoder.d_model=32", "decoder.n_layers=1", "decoder.n_heads=2", "projector.hidden=32", "eval.max_new_tokens=3",
            *TINY_TRAIN]
    params = {"overrides": tiny, "baseline": ["decoder={type: tiny, d_model: 32, n_layers: 1, n_heads: 2}"],
              "out": str(tmp_path / "trm"), "baseline_out": str(tmp_path / "base"), "progress": False}
    nb, images = execute(notebook("03"), params, monkeypatch, tmp_path)
    assert images >= 5
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", []))
    assert html.count('<div class="card ') == 8


def test_04_alignment_evaluation(aligned_run, monkeypatch, tmp_path):
    params = {"run": str(aligned_run), "out": str(tmp_path / "report"), "tsne_points": 60}
    _, images = execute(notebook("04"), params, monkeypatch, tmp_path)
    assert images == len(list((tmp_path / "report" / "figures").glob("*.png"))) >= 5
