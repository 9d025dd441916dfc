"""``edge-glass export RUN --format torchscript`` (edge_glass/export/torchscript.py): a TRM vlm run
trained on real easy-VQA questions (EfficientNet-Lite0 features) exported as one TorchScript
module whose answers equal ``edge_glass.load(run).answer`` in a process that cannot import Edge
Glass; the halting loop is in the scripted graph and stops at data-dependent steps; runs the
scripted path does not cover are refused by name."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import edge_glass
from edge_glass.cli import main
from edge_glass.errors import EdgeGlassError
from edge_glass.export.torchscript import MANIFEST, held_out_samples, load_torchscript, reference_trace, script_vlm
from numerics import FP32_NET, assert_close_rel

torch.set_num_threads(1)

TRM = {"type": "trm", "d_model": 32, "n_layers": 1, "n_heads": 2, "n": 1, "T": 2, "n_sup": 3, "halting": True}


@pytest.fixture(scope="module")
def trm_run(tmp_path_factory) -> Path:
    """A TRM decoder (halting on) on the first 24 easy-VQA questions of each official split."""
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("ts_runs")
    cfg = {
        "task": "vlm", "name": "ts_trm", "projector": {"pool": "mean", "hidden": 32}, "decoder": TRM,
        "data": {"train": ["easy-vqa"], "max_samples": 24, "val": 0.1},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3.0e-3, "checkpoint_every": 50, "log_every": 50, "threads": 1},
        "eval": {"max_new_tokens": 3, "samples": 2, "batch_size": 64},
    }
    (root / "trm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "trm.yaml"), "--out", str(root / "trm"), "--no-progress"]) == 0
    return root / "trm"


@pytest.fixture(scope="module")
def exported(trm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ts_export") / "trm"
    assert main(["export", str(trm_run), "--out", str(out), "--format", "torchscript"]) == 0
    return out


@pytest.fixture(scope="module")
def model(trm_run):
    return edge_glass.load(trm_run, device="cpu")


@pytest.fixture(scope="module")
def samples(model):
    return held_out_samples(model, 12)


STANDALONE = textwrap.dedent("""
    import json, re, sys
    sys.modules["edge_glass"] = None  # Edge Glass cannot be imported here
    try:
        import edge_glass  # noqa: F401
        raise SystemExit("edge_glass was importable")
    except ImportError:
        pass
    import torch
    from tokenizers import Tokenizer

    d = sys.argv[1]
    man = json.load(open(f"{d}/edge_glass_export.json"))
    module = torch.jit.load(f"{d}/{man['module']}")
    tok = Tokenizer.from_file(f"{d}/{man['tokenizer']['file']}")
    sp = man["special_tokens"]
    questions = json.load(open(sys.argv[2]))
    pixels = torch.load(sys.argv[3])
    rows = [tok.encode(q).ids for q in questions]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), sp["pad_id"], dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = True
    with torch.no_grad():
        out, logits, steps = module.trace_from_pixels(pixels, ids, mask, man["max_new_tokens"])
        assert torch.equal(module(pixels, ids, mask), out)
    answers = []
    for row in out.tolist():
        row = row[: row.index(sp["eos_id"])] if sp["eos_id"] in row else row
        words = [tok.id_to_token(i) for i in row if i >= sp["n_special"]]
        answers.append(re.sub(r" ([.,!?;:])", r"\\1", " ".join(words)).strip())
    print(json.dumps({"prompts": rows, "answers": answers, "steps": steps.tolist()}))
""")


def test_exported_module_answers_like_the_run_without_edge_glass(exported, model, samples, tmp_path):
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["format"] == "torchscript" and manifest["decoder"] == "trm"
    assert manifest["parity"]["answers_equal"] and manifest["parity"]["samples"] > 0
    assert manifest["preprocess"]["size"] == model.encoder.input_size()
    assert manifest["max_new_tokens"] == 3 and manifest["special_tokens"]["eos_id"] == model.core.decoder.prompt.eos_id
    assert not list(exported.parent.glob(".*tmp"))  # built aside and renamed into place
    images, questions = [s.image for s in samples], [s.question for s in samples]
    enc = model.encoder
    torch.save(enc.collate([enc.prepare(im) for im in images]), tmp_path / "pixels.pt")
    (tmp_path / "q.json").write_text(json.dumps(questions))
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(exported), str(tmp_path / "q.json"), str(tmp_path / "pixels.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = model.answer(images, questions)
    assert got["answers"] == reference
    assert got["prompts"] == [model.core.decoder.prompt.prompt_ids(q) for q in questions]
    ref_logits, ref_steps = reference_trace(model, images, questions, 3)
    assert got["steps"] == ref_steps.tolist()
    # the convenience loader, from image files, and its logits against PyTorch's
    ts = load_torchscript(exported)
    assert ts.answer(images, questions) == reference
    ids, logits, steps = ts.trace(images, questions)
    assert_close_rel(logits, ref_logits, FP32_NET, "scripted vs PyTorch next-token logits")


def test_halting_loop_is_in_the_graph_and_stops_where_the_data_says(model, samples):
    decoder = model.core.decoder
    scripted = script_vlm(model)
    assert "prim::Loop" in str(scripted.decoder.think.graph)  # a real loop with a data-dependent exit, not unrolled
    assert "any" in scripted.decoder.think.code
    images, questions = [s.image for s in samples], [s.question for s in samples]
    pixels = model.encoder.collate([model.encoder.prepare(im) for im in images])
    saved = {k: v.clone() for k, v in decoder.q_head.state_dict().items()}
    try:
        # a Q head that halts some rows after the first supervision step and not others (the trained one
        # barely moved from "never halt"): a random direction, the bias in the widest gap between the rows' values
        ids, mask = load_prompts(decoder, questions)
        with torch.no_grad():
            decoder.q_head.weight.copy_(torch.randn(decoder.q_head.weight.shape, generator=torch.Generator().manual_seed(0)))
            decoder.q_head.bias.zero_()
            prefix, pmask = model.core.visual(model.encoder.encode(images), len(images), torch.device("cpu"))
            x, full = decoder.context(prefix, ids, mask, pmask)
            prepared = decoder.net.prepare(full)
            y, z = decoder.deep_recursion(x, *decoder.init_state(x), prepared)
            q = decoder.q_logits(y[:, -1:])[:, 0].sort().values
            lo, hi = len(q) // 5, len(q) - len(q) // 5
            gap = int((q[lo + 1 : hi] - q[lo : hi - 1]).argmax()) + lo
            decoder.q_head.bias.fill_(-float(q[gap] + q[gap + 1]) / 2)
        ref_logits, ref_steps = reference_trace(model, images, questions, 3)
        assert len(set(ref_steps[:, 0].tolist())) > 1, "the Q head should halt rows at different steps"
        scripted = script_vlm(model)  # holds the new Q head
        with torch.no_grad():
            out, logits, steps = scripted.trace_from_pixels(pixels, ids, mask, 3)
        assert torch.equal(steps, ref_steps)  # the same rows stop at the same steps as in PyTorch
        assert [decoder.prompt.decode(r) for r in out.tolist()] == model.answer(images, questions)
        assert_close_rel(logits, ref_logits, FP32_NET, "logits with a data-dependent halting head")
        # one row alone: its own halting step, not the batch's
        with torch.no_grad():
            alone = scripted.trace_from_pixels(pixels[:1], ids[:1, -int(mask[0].sum()):], mask[:1, -int(mask[0].sum()):], 1)[2]
        assert int(alone[0, 0]) == int(ref_steps[0, 0])
    finally:
        decoder.q_head.load_state_dict(saved)


def load_prompts(decoder, questions):
    from edge_glass.decoders.prompt import collate_prompts

    b = collate_prompts([decoder.prompt.prompt_ids(q) for q in questions], decoder.prompt.pad_id)
    return b["input_ids"], b["attention_mask"]


def test_tiny_decoder_scripts_with_the_same_answers(model, samples):
    """A tiny decoder in the same VLM (random weights: only the scripted path is under test)."""
    from edge_glass.decoders.tiny import TinyDecoder, TinyDecoderConfig

    trm = model.core.decoder
    torch.manual_seed(0)
    model.core.decoder = TinyDecoder(TinyDecoderConfig(d_model=32, n_layers=2, n_heads=2), trm.tokenizer).eval()
    try:
        images, questions = [s.image for s in samples[:6]], [s.question for s in samples[:6]]
        pixels = model.encoder.collate([model.encoder.prepare(im) for im in images])
        ids, mask = load_prompts(model.core.decoder, questions)
        with torch.no_grad():
            out, logits, _ = script_vlm(model).trace_from_pixels(pixels, ids, mask, 3)
        assert [model.core.decoder.prompt.decode(r) for r in out.tolist()] == model.answer(images, questions)
        assert_close_rel(logits, reference_trace(model, images, questions, 3)[0], FP32_NET, "tiny decoder logits")
    finally:
        model.core.decoder = trm


def test_unsupported_runs_are_refused_by_name(trm_run, tmp_path):
    cfg = yaml.safe_load((trm_run / "config.yaml").read_text())
    for name, change, message in [
        ("lora", {"decoder": {"type": "lm", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "lora_r": 4}},
         r"decoder.type 'lm' is not supported; supported decoders: trm, tiny"),
        ("cross", {"fusion": {"type": "cross_attention"}}, r"fusion.type 'cross_attention' is not supported"),
    ]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, **change}))
        with pytest.raises(EdgeGlassError, match=message):
            edge_glass.export_run(run, tmp_path / f"{name}_out", format="torchscript")
        assert not (tmp_path / f"{name}_out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(EdgeGlassError, match="not an Edge Glass export"):
        edge_glass.export_run(trm_run, tmp_path / "full", format="torchscript")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_a_parity_miss_fails_the_export_and_leaves_nothing(trm_run, tmp_path, monkeypatch):
    from edge_glass.export import torchscript

    monkeypatch.setattr(torchscript, "PARITY_RTOL", -1.0)  # no difference can pass
    monkeypatch.setattr(torchscript, "PARITY_SAMPLES", 4)
    with pytest.raises(EdgeGlassError, match="logits differ from PyTorch's"):
        edge_glass.export_run(trm_run, tmp_path / "out", format="torchscript")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
