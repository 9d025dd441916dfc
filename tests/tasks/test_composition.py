"""Where parts meet: an alignment run's frozen image head in front of a decoder (phase 1 -> 2),
every task under bf16 autocast, QA splits across datasets, decoder ablations, devices."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from edge_glass.cli import main
from helpers import save_tiny_qwen


def train_cli(root: Path, name: str, cfg: dict, *extra: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / name
    assert main(["train", str(path), "--out", str(out), "--no-progress", *extra]) == 0
    return out


def alignment_cfg(coco_dir: Path, pooler: dict) -> dict:
    return {
        "name": "align", "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [32, 16], "heads": {"image": {"pooler": pooler, "projection": {"dropout": 0.1}}}},
        "data": {"train": [f"coco:{coco_dir}"], "split": {"val": 4, "test": 8}},
        "train": {"epochs": 2, "batch_size": 16, "checkpoint_every": 50, "log_every": 2, "threads": 1},
    }


def vlm_cfg(decoder: dict, **over) -> dict:
    cfg = {
        "task": "vlm", "name": "vlm", "projector": {"pool": "mean", "hidden": 32},
        "decoder": decoder,
        "data": {"train": ["easy-vqa:train"], "max_samples": 160, "val": 0.1, "test": 0.2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 2.0e-3, "checkpoint_every": 50, "log_every": 2, "threads": 1},
        "eval": {"max_new_tokens": 3, "samples": 2, "batch_size": 64},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


TRM = {"type": "trm", "d_model": 32, "n_layers": 1, "n_heads": 2, "n": 1, "T": 1, "n_sup": 1}
TINY = {"type": "tiny", "d_model": 32, "n_layers": 1, "n_heads": 2}
POOLERS = {
    "mean": {"type": "mean"},
    "attention": {"type": "attention", "heads": 2},
    "perceiver": {"type": "perceiver", "dim": 32, "latents": 4, "depth": 1, "heads": 2},
}


@pytest.fixture(scope="module")
def aligned_runs(coco_subset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligned")
    return {name: train_cli(root, f"align_{name}", alignment_cfg(coco_subset, p)) for name, p in POOLERS.items()}


# --- phase 1 -> phase 2 ----------------------------------------------------------------------------

@pytest.mark.parametrize("pooler,output,dim,tokens", [("mean", "auto", 16, (1, 16)), ("attention", "embedding", None, (1, 32)),
                                                      ("perceiver", "auto", None, (4, 32)), ("perceiver", "embedding", 16, (1, 16))])
def test_aligned_vision_gives_latents_or_the_matryoshka_embedding(aligned_runs, pooler, output, dim, tokens):
    import edge_glass
    from edge_glass.models.vlm import AlignedVision

    aligned = edge_glass.load(aligned_runs[pooler], device="cpu")
    vision = AlignedVision(aligned.core.heads["image"], output, dim)
    feats = aligned.encoders["image"].encode([Image_of(2), Image_of(3)])
    out = vision(feats)
    assert out.tokens.shape == (2, *tokens) and vision.out_dim == tokens[1] and out.mask.all()
    if vision.output == "embedding":  # the aligned embedding itself, unit norm, as the run embeds images
        ref = aligned.core.heads["image"].at_dim(feats, tokens[1])
        torch.testing.assert_close(out.tokens[:, 0], ref)
        assert torch.allclose(out.tokens.norm(dim=-1), torch.ones(2, 1))


def Image_of(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_aligned_vision_rejects_latents_without_a_perceiver_and_dims_out_of_range(aligned_runs):
    import edge_glass
    from edge_glass.errors import ConfigError
    from edge_glass.models.vlm import AlignedVision

    head = edge_glass.load(aligned_runs["mean"], device="cpu").core.heads["image"]
    with pytest.raises(ConfigError, match="Perceiver"):
        AlignedVision(head, "latents")
    with pytest.raises(ConfigError, match="outside 1..32"):
        AlignedVision(head, "embedding", 64)


@pytest.mark.parametrize("pooler", ["mean", "perceiver"])
def test_alignment_run_then_trm_on_its_aligned_image_head_then_eval(aligned_runs, tmp_path, pooler):
    pytest.importorskip("easy_vqa")
    run = train_cli(tmp_path, "trm", vlm_cfg(TRM, vision={"aligned_run": str(aligned_runs[pooler]), "aligned_dim": 16 if pooler == "mean" else None}))
    m = json.loads((run / "eval.json").read_text())
    assert m["n"] > 10 and 0 <= m["exact_match"] <= 100
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["exact_match"] == m["exact_match"]  # reloaded == trained
    import edge_glass
    from edge_glass.api import parameter_rows
    from edge_glass.runs import RunDir

    vlm = edge_glass.load(run, device="cpu")
    assert len(vlm.answer([Image_of(1)], ["what shape is in the image?"])) == 1
    rows = {r[0]: r for r in parameter_rows(RunDir(run).read_config(), run)}
    assert rows["vision.aligned_head (frozen)"][2] == 0 and rows["vision.aligned_head (frozen)"][1] > 0


# --- bf16 -----------------------------------------------------------------------------------------

def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["kind"] == "train"]


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 causal LM with a real byte-level BPE tokenizer, saved like a hub model."""
    return save_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), layers=1)


@pytest.mark.parametrize("kind", ["alignment", "tiny", "trm", "lm"])
def test_every_task_trains_under_bf16_autocast_and_it_changes_the_arithmetic(kind, coco_subset, tiny_qwen_dir, tmp_path):
    if kind == "alignment":
        cfg = alignment_cfg(coco_subset, POOLERS["perceiver"])
        cfg["train"]["epochs"] = 1
    else:
        pytest.importorskip("easy_vqa")
        decoder = {"tiny": TINY, "trm": TRM, "lm": {"type": "lm", "model": str(tiny_qwen_dir), "lora_r": 4, "lora_dropout": 0.0}}[kind]
        cfg = vlm_cfg(decoder, data={"max_samples": 64}, train={"epochs": 3})
    fp32 = train_cli(tmp_path, "fp32", cfg)
    bf16 = train_cli(tmp_path, "bf16", cfg, "--set", "train.mixed_precision=bf16")
    a, b = losses(fp32), losses(bf16)
    assert len(a) == len(b) >= 2 and all(torch.isfinite(torch.tensor(b)))
    assert a != b, "bf16 autocast left every loss bitwise equal to fp32: it did not reach the model"
    assert abs(a[0] - b[0]) <= 0.05 * abs(a[0])  # same model, same batch, bf16 rounding only (~3 significant digits)
    assert (bf16 / "eval.json").is_file()


# --- QA splits across datasets --------------------------------------------------------------------

def test_qa_splits_are_per_dataset_and_hold_out_images_across_datasets():
    from edge_glass.data.vqa import QASample
    from edge_glass.tasks.vlm import split_per_dataset

    given = [QASample(f"img{i}.jpg", "is it?", "yes", ["train", "dev", "test"][i % 3], f"vqa:{i}") for i in range(30)]
    captions = [QASample(f"img{i}.jpg", "Describe this image.", f"caption {i}", "train", f"cap:{i}") for i in range(100)]
    where = split_per_dataset({"vqa": given, "captions": captions}, val=0.1, test=0.2, seed=0)
    assert where["vqa"] == [["train", "val", "test"][i % 3] for i in range(30)]  # given splits as they are
    cap = where["captions"]
    assert {"train", "val", "test"} <= set(cap)  # the hashed dataset keeps held-out splits of its own
    held = {s.image: w for s, w in zip(given, where["vqa"]) if w != "train"}
    for s, w in zip(captions, cap):
        if s.image in held:  # held out by vqa: never trained on through the captions
            assert w != "train", f"{s.image} is held out ({held[s.image]}) by vqa but trained on in captions"


# --- ablations ------------------------------------------------------------------------------------

def test_decoder_ablation_writes_ablation_json_and_a_comparison_table(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    cfg = vlm_cfg(TINY, data={"max_samples": 64})
    cfg["variants"] = {"small": {}, "question_only": {"fusion": {"type": "none"}}}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "abl"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(results) == {"small", "question_only"} and all("exact_match" in r for r in results.values())
    out = capsys.readouterr().out
    assert "question_only" in out and "EM" in out


# --- devices --------------------------------------------------------------------------------------

def test_load_puts_frozen_encoders_and_heads_on_the_requested_device(aligned_runs):
    import edge_glass

    model = edge_glass.load(aligned_runs["mean"], device="meta")  # "meta": a device that is not the CPU, on any machine
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    assert devices == {"meta"}
    assert all(e.device.type == "meta" for e in model.encoders.values())


def test_training_on_cuda_without_a_gpu_is_a_config_error(coco_subset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(alignment_cfg(coco_subset, POOLERS["mean"])))
    assert main(["train", str(path), "--out", str(tmp_path / "r"), "--set", "train.device=cuda", "--no-progress"]) == 2


def test_a_lora_run_with_tied_embeddings_resumes_from_its_checkpoint(tiny_qwen_dir, tmp_path):
    """The frozen base LM is not in the checkpoint; its tied lm_head (one tensor, two names) must
    count as frozen too, or --resume refuses the checkpoint (found by scripts/gpu_check.py)."""
    pytest.importorskip("easy_vqa")
    cfg = vlm_cfg({"type": "lm", "model": str(tiny_qwen_dir), "lora_r": 4, "lora_dropout": 0.0}, data={"max_samples": 64})
    run = train_cli(tmp_path, "lora", cfg)
    assert list((run / "checkpoints").glob("step-*"))
    path = tmp_path / "lora.yaml"
    assert main(["train", str(path), "--out", str(run), "--resume", "--no-progress"]) == 0
    import edge_glass

    assert len(edge_glass.load(run, device="cpu").answer([Image_of(0)], ["what color is the shape?"])) == 1
