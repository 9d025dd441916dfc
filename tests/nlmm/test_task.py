"""NL-MM as an Edge Glass task, end to end through the CLI on real coco1k photos + captions and
FSDD recordings: the run directory, evaluation, SIGKILL + resume ending bitwise equal, 2 processes
== 1 at the same global batch, the Python API (caption / transcribe / embed / adapt), info and the
shipped configs."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from edge_glass.config import load_config, variant_config
from edge_glass.errors import InputError
from edge_glass.train.logging import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[2]
EDGE_GLASS = [sys.executable, "-m", "edge_glass.cli"]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_training import _kill_after, _latest_step  # noqa: E402
from helpers import relative_weight_gap, torchrun_train, train_losses  # noqa: E402


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*EDGE_GLASS, *args], check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-glass {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def nlmm_config(path: Path, coco: Path, fsdd: Path, **train) -> Path:
    cfg = {
        "task": "nlmm", "name": "nlmm_test", "seed": 0,
        "model": {"d_model": 32, "heads": 2, "depth": {"text": 1, "image": 1, "audio": 1}, "memory_slots": 4, "decoder_depth": 1,
                  "embed_dims": [32, 8], "chunk_size": 16, "ttt": {"rank": 4, "mini_batch": 2},
                  "cms": [{"name": "fast", "period": 1, "lr": 0.02}, {"name": "slow", "period": 3, "lr": 0.005}]},
        "data": {"train": [f"coco:{coco}", f"fsdd:{fsdd}"], "split": {"val": 4, "test": 8}, "image_size": 32, "n_mels": 16,
                 "max_audio_seconds": 1.0, "max_text_tokens": 12, "vocab_min_count": 1, "workers": 1},
        "train": {"epochs": 2, "batch_size": 16, "checkpoint_every": 4, "log_every": 2, "threads": 1, **train},
        "ema": 0.9,
        "eval": {"batch_size": 32, "max_new_tokens": 8, "val_limit": 24},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def nlmm_run(coco_subset, fsdd_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("nlmm")
    cfg = nlmm_config(root / "nlmm.yaml", coco_subset, fsdd_subset)
    out = root / "run"
    proc = run("train", str(cfg), "--out", str(out), "--no-progress")
    return cfg, out, proc.stdout


def test_a_run_directory_has_every_metric_per_dataset(nlmm_run):
    _, out, stdout = nlmm_run
    for name in ("config.yaml", "model.safetensors", "tokenizer.json", "nlmm.json", "split.json", "eval.json", "summary.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    result = json.loads((out / "eval.json").read_text())
    coco, fsdd = (next(v for k, v in result["datasets"].items() if k.startswith(p)) for p in ("coco:", "fsdd:"))
    assert set(coco["image-text"]["dims"]) == {"32", "8"} and coco["image-text"]["n_image"] == 8
    assert {"f1", "bleu4", "cider", "samples"} <= set(coco["captions"])
    assert fsdd["digits"]["n"] == 40 and fsdd["digits"]["chance"] == 10.0  # takes 0-1 of two speakers: the official test split
    assert "audio-text" in fsdd and "image-text" not in fsdd
    assert set(result["headline"]) == {"R@1", "caption_f1", "digit_accuracy"}
    assert "spoken digits" in stdout and "captions" in stdout
    train_lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert {"loss_text", "loss_image", "loss_audio", "loss_contrastive"} <= set(train_lines[-1])
    assert train_lines[-1]["level_updates"]["slow"] == train_lines[-1]["step"] // 3  # the slow level updated every 3 steps


def test_eval_on_a_dataset_spec_and_info_per_module(nlmm_run, fsdd_subset, data_root, tmp_path):
    cfg, out, _ = nlmm_run
    proc = run("eval", str(out), "--data", f"fsdd:{fsdd_subset}", "--no-progress")
    assert "spoken digits" in proc.stdout
    (tmp_path / "images").mkdir()  # a Flickr8k directory, one image broken: skipped, counted, named
    for i, f in enumerate(sorted((data_root / "coco1k" / "images").iterdir())[300:304]):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(f.read_bytes())
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines = ["image,caption"] + [f"{i}.jpg,A photo number {i}." for i in range(4)] + ["broken.jpg,a broken image"]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    proc = run("eval", str(out), "--data", f"flickr8k:{tmp_path}", "--json", str(tmp_path / "f.json"), "--no-progress")
    m = json.loads((tmp_path / "f.json").read_text())
    flickr = next(iter(m["datasets"].values()))
    assert flickr["image-text"]["n_image"] == 4 and flickr["captions"]["n_images"] == 4 and m["skipped"] == 1
    assert "broken.jpg" in proc.stdout
    info = run("info", str(out)).stdout
    for part in ("image encoder", "audio encoder", "text encoder", "central memory (+ CMS levels)", "text decoder", "image decoder", "audio decoder"):
        assert part in info, part


def test_the_python_api_captions_transcribes_embeds_and_adapts(nlmm_run, coco_subset, fsdd_subset, tmp_path):
    import edge_glass

    _, out, _ = nlmm_run
    model = edge_glass.load(out, "cpu")
    photos = sorted((coco_subset / "images").iterdir())[:3]
    clips = sorted((fsdd_subset / "recordings").glob("*_george_0.wav"))[:4]
    caps = model.caption(images=[str(p) for p in photos])
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    both = model.caption(images=[str(p) for p in photos[:2]], audio=[str(c) for c in clips[:2]])
    assert len(both) == 2
    said = model.transcribe([str(c) for c in clips])
    assert len(said) == 4
    e = model.embed("image", [str(p) for p in photos], dim=8)
    assert e.shape == (3, 8) and torch.allclose(e.norm(dim=1), torch.ones(3), rtol=1e-5)
    t = model.embed("text", ["a dog", "two cats"])
    assert t.shape == (2, 32)
    before = model.embed("audio", [str(clips[0])])
    model.adapt([str(c) for c in clips[1:]], "audio")
    adapted = model.embed("audio", [str(clips[0])])
    model.reset()
    again = model.embed("audio", [str(clips[0])])
    assert not torch.allclose(adapted, before, atol=1e-6)
    assert torch.allclose(again, before, atol=1e-6)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(clips[0].read_bytes()[:60])
    with pytest.raises(InputError, match="broken.wav"):
        model.transcribe([str(bad)])
    with pytest.raises(InputError, match="not one of the trained dims"):
        model.embed("image", [str(photos[0])], dim=5)


def test_sigkill_and_resume_ends_bitwise_equal_to_an_uninterrupted_run(nlmm_run, tmp_path):
    cfg, straight, _ = nlmm_run  # checkpoints every 4 steps; the slow CMS level updates every 3
    killed = tmp_path / "killed"
    args = ["train", str(cfg), "--out", str(killed), "--no-progress"]
    _kill_after(args, killed, min_step=4, delay=random.Random(1).uniform(0, 0.3))  # mid-period: 4 % 3 != 0
    assert _latest_step(killed) >= 4
    run(*args, "--resume")
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())

    def lines(p):
        return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in (p / "metrics.jsonl").read_text().splitlines()]

    assert lines(killed) == lines(straight)


def test_two_processes_match_one_at_the_same_global_batch(nlmm_run, tmp_path):
    cfg, one, _ = nlmm_run
    proc = torchrun_train(cfg, tmp_path / "two", port_base=29700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(one), rel=1e-4)
    assert relative_weight_gap(one / "model.safetensors", tmp_path / "two" / "model.safetensors") < 1e-3


def test_the_shipped_configs_validate_and_the_plain_baseline_matches_the_parameter_count():
    from edge_glass.tasks import task_for

    base = load_config(ROOT / "configs" / "nlmm_base.yaml")
    assert (base.model.d_model, base.model.heads, base.model.memory_slots, len(base.model.cms), base.model.ttt.enabled) == (512, 8, 32, 3, True)
    assert set(base.model.depth.values()) == {6}
    abl = load_config(ROOT / "configs" / "nlmm_ablation.yaml", ["data.max_vocab=2000"])
    assert set(abl.variants) == {"full", "no_fast_weights", "no_cms", "no_central_memory", "no_ttt", "adamw_not_dmgd", "plain_transformer"}
    counts = {v: sum(r[1] for r in task_for(variant_config(abl, v)).parameter_rows()) for v in ("full", "plain_transformer")}
    assert abs(counts["plain_transformer"] - counts["full"]) / counts["full"] < 0.02  # 1.2% at this vocabulary
    tiny = load_config(ROOT / "configs" / "nlmm_tiny.yaml")
    assert tiny.task == "nlmm" and tiny.model.cms[0].optimizer == "dmgd"


def test_torch_export_programs_embed_like_the_run(nlmm_run, tmp_path):
    from numerics import FP32_NET, assert_close_rel

    import edge_glass
    from edge_glass.export.nlmm import example_inputs, example_samples

    _, out, _ = nlmm_run
    proc = run("export", str(out), "--out", str(tmp_path / "exp"), "--format", "torch-export")
    assert "exported to" in proc.stdout
    manifest = json.loads((tmp_path / "exp" / "edge_glass_export.json").read_text())
    assert set(manifest["programs"]) == {"image", "audio", "text"}
    model = edge_glass.load(out, "cpu")
    n = manifest["batch"]
    for m in ("audio", "text", "image"):
        exported = torch.export.load(str(tmp_path / "exp" / manifest["programs"][m]["file"]))
        program = exported.module()
        held = sum(v.numel() for v in exported.state_dict.values())  # only this modality's path, no decoders
        path = sum(p.numel() for p in model.net.embedding_path(m).parameters())
        assert held == path < sum(p.numel() for p in model.net.parameters()) * 0.7, (m, held, path)
        ex = example_inputs(model, m, n)  # padded to the program's static shape (audio to 1 s, text to 14 tokens)
        items = [getattr(s, m) for s in example_samples(model, m, n)]
        with torch.no_grad():
            got = program(*ex.values())
        ref = model.embed(m, items)  # the PyTorch model, its own batching and padding
        assert got.shape == ref.shape == (len(items), 32)
        assert_close_rel(got, ref, FP32_NET, f"{m} program vs model.embed")
        ts = tmp_path / "exp" / f"embed_{m}.torchscript.pt"
        if ts.exists():
            with torch.no_grad():
                assert_close_rel(torch.jit.load(str(ts))(*ex.values()), ref, FP32_NET, f"{m} torchscript vs model.embed")

    # captions from photos and transcripts from speech with the exported memory + decoder programs
    from edge_glass.decoders.prompt import WordTokenizer
    from edge_glass.export.nlmm import generate

    tokenizer = WordTokenizer.load(tmp_path / "exp" / "word_tokenizer.json")
    assert set(manifest["generation"]) == {"image", "audio"}
    for m, g in manifest["generation"].items():
        context = torch.export.load(str(tmp_path / "exp" / g["context"])).module()
        decoder = torch.export.load(str(tmp_path / "exp" / g["decoder"])).module()
        ids = generate(context, decoder, tuple(example_inputs(model, m, n).values()), g["bos_id"], g["eos_id"], g["pad_id"],
                       g["max_new_tokens"])
        items = [getattr(s, m) for s in example_samples(model, m, n)]
        ref = model.caption(**{"images" if m == "image" else "audio": items})
        assert [tokenizer.decode(i) for i in ids] == ref, m
        assert manifest["parity"][f"caption_decoder_{m}"]["ratio"] <= 1e-4


def test_encoders_on_frozen_backbone_features(coco_subset, fsdd_subset, tmp_path):
    """backbones.image / backbones.text: those NL-MM encoders read EfficientNet-Lite0 / MiniLM token
    features (encoded once into the feature cache), audio still trains from raw log-mel; the run
    trains, evaluates, loads and embeds new inputs through the same backbones."""
    import os

    import edge_glass
    from edge_glass.nlmm.model import FeatureTokens

    cfg_path = nlmm_config(tmp_path / "bb.yaml", coco_subset, fsdd_subset, epochs=1)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["backbones"] = {"image": {"type": "efficientnet_lite", "model": "efficientnet-lite0"},
                        "text": {"type": "sentence_transformer", "model": "all-MiniLM-L6-v2"}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run("train", str(cfg_path), "--out", str(out), "--no-progress")
    info = json.loads((out / "nlmm.json").read_text())
    assert info["feature_dims"] == {"image": 1280, "text": 384} and set(info["backbones"]) == {"image", "text"}
    cache = Path(os.environ["EDGE_GLASS_CACHE"]) / "features"
    assert any(p.name.startswith("image-efficientnet_lite") for p in cache.iterdir())  # encoded once, cached

    model = edge_glass.load(out, "cpu")
    net = model.net
    assert isinstance(net.feature_in["image"], FeatureTokens) and net.image_tokens is None  # no raw patch embedding
    assert net.audio_tokens is not None and "audio" not in net.feature_in  # audio from raw log-mel
    weights = load_file(out / "model.safetensors")
    assert "net.feature_in.image.proj.weight" in weights and not any(k.startswith("net.image_tokens") for k in weights)
    photos = sorted((coco_subset / "images").iterdir())[:3]
    e = model.embed("image", photos)
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=-1), torch.ones(3), rtol=1e-4)
    assert len(model.caption(images=photos)) == 3
    t = model.embed("text", ["a dog on a couch", "two people on a beach"], dim=8)
    assert t.shape == (2, 8)
    with pytest.raises(InputError):
        model.embed("image", [tmp_path / "missing.jpg"])
    result = json.loads((out / "eval.json").read_text())
    assert any("image-text" in v for v in result["datasets"].values())
    proc = run("export", str(out), "--out", str(tmp_path / "exp"), "--format", "torch-export")
    manifest = json.loads((tmp_path / "exp" / "edge_glass_export.json").read_text())
    assert set(manifest["programs"]) == {"audio"} and set(manifest["not_exported"]) == {"image", "text"}


def test_backbone_config_errors_name_the_key(tmp_path):
    from edge_glass.errors import ConfigError

    base = {"task": "nlmm", "data": {"train": ["coco:x"]}}
    for backbones, needle in (({"audio": {"type": "efficientnet_lite", "model": "efficientnet-lite0"}}, "backbones.audio"),
                              ({"text": {"type": "token_text"}}, "trainable")):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "backbones": backbones}))
        with pytest.raises(ConfigError, match=needle):
            load_config(path)


def test_image_shift_benchmark_runs_every_mode(nlmm_run, tmp_path):
    """benchmarks/nlmm_ttt_images.py on a photo-trained run: easy-VQA shapes with the image adapters
    off / per image / streamed; every metric in range, and switching the adapters off changes the
    embedding path (the modes are not one computation)."""
    _, out, _ = nlmm_run
    report = tmp_path / "shift.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nlmm_ttt_images.py"), str(out), "--n", "120", "--json", str(report)],
                   check=True, capture_output=True, text=True)
    result = json.loads(report.read_text())
    assert result["n_shifted"] == 120 and result["n_photos"] == 8 and set(result["results"]) == {"none", "sequence", "stream"}
    for row in result["results"].values():
        assert 0 < row["recon_mse"] < 10 and 0 < row["photos_recon_mse"] < 10
        for k in ("probe_shape", "probe_color", "zeroshot_shape", "zeroshot_color"):
            assert 0 <= row[k] <= 100
    assert result["results"]["none"]["recon_mse"] != result["results"]["sequence"]["recon_mse"]
