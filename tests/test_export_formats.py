"""Standard formats (edge_glass/export/formats.py): the text tower as a sentence-transformers
directory, save_pretrained / from_pretrained with a model card, push_to_hub failing fast without
a Hub, and LoRA decoders as PEFT adapter / merged LM directories. Real backbones (MiniLM,
EfficientNet-Lite0), real COCO photos and captions, easy-VQA; tiny runs trained once."""
from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

import edge_glass
from edge_glass.cli import main
from edge_glass.errors import EdgeGlassError
from helpers import save_tiny_qwen
from numerics import FP32_NET, FP32_OPS, assert_close_rel

torch.set_num_threads(1)


def train(root: Path, name: str, cfg: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(root / name), "--no-progress"]) == 0
    return root / name


def alignment_cfg(coco: Path, text_head: dict) -> dict:
    return {
        "name": "formats", "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer", "max_length": 16}},
        "model": {"dims": [32, 16], "heads": {"image": {"pooler": {"type": "mean"}}, "text": text_head}},
        "data": {"train": [f"coco:{coco}"], "max_groups": 24, "split": {"val": 2, "test": 6}},
        "train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 50, "log_every": 50, "threads": 1},
    }


def vlm_cfg(decoder: dict, **over) -> dict:
    cfg = {
        "task": "vlm", "name": "formats_vlm", "projector": {"pool": "mean", "hidden": 32}, "decoder": decoder,
        "data": {"train": ["easy-vqa:train"], "max_samples": 32, "val": 0.1, "test": 0.2},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3.0e-3, "checkpoint_every": 50, "log_every": 50, "threads": 1},
        "eval": {"max_new_tokens": 3, "samples": 2, "batch_size": 64},
    }
    cfg.update(over)
    return cfg


TEXT_HEADS = {
    "mean": {"pooler": {"type": "mean"}, "projection": {"hidden": 24, "dropout": 0.1}},
    "pooled": {"pooler": {"type": "pooled"}},
    "attention": {"pooler": {"type": "attention", "dim": 32, "heads": 2}},
}


@pytest.fixture(scope="session")
def aligned(coco_subset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats_align")
    return {name: train(root, f"align_{name}", alignment_cfg(coco_subset, head)) for name, head in TEXT_HEADS.items()}


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2 causal LM with a real byte-level BPE tokenizer (chat template), saved like a hub model."""
    return save_tiny_qwen(tmp_path_factory.mktemp("formats_qwen"), layers=2)


@pytest.fixture(scope="session")
def vlm_runs(aligned, tiny_qwen, tmp_path_factory) -> dict[str, Path]:
    """A LoRA run on a copy of an alignment run's image head (the copy can be moved away), and a
    tiny word-level decoder run on plain EfficientNet tokens."""
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("formats_vlm")
    head_run = Path(shutil.copytree(aligned["mean"], root / "aligned_copy"))
    lora = {"type": "lm", "model": str(tiny_qwen), "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}
    return {"lora": train(root, "lora", vlm_cfg(lora, vision={"aligned_run": str(head_run)})),
            "tiny": train(root, "tiny", vlm_cfg({"type": "tiny", "d_model": 32, "n_layers": 1, "n_heads": 2})),
            "aligned_copy": head_run}


@pytest.fixture(scope="session")
def captions(coco_subset) -> list[str]:
    """Real COCO captions (trailing spaces and all), plus one longer than max_length (16 tokens)."""
    anns = json.loads((coco_subset / "captions.json").read_text())["annotations"]
    texts = [a["caption"] for a in anns[:6]]
    return texts + [" ".join(a["caption"].strip() for a in anns[6:10])]


@pytest.fixture(scope="session")
def photos(data_root) -> list[Path]:
    return sorted((data_root / "coco1k" / "images").iterdir())[:3]


def load(run: Path):
    import edge_glass

    return edge_glass.load(run, device="cpu")


# --- 1. sentence-transformers -------------------------------------------------------------------

def test_text_tower_is_a_sentence_transformer_with_the_run_s_embeddings(aligned, captions, tmp_path):
    """Mean pooler + Linear-GELU-Linear head: the directory is built from ST's own modules, keeps
    max_length, and gives encode_texts' unit rows at the full dim, at an exported smaller dim
    (plain truncate_dim call), and at a load-time truncate_dim with normalize_embeddings=True."""
    from sentence_transformers import SentenceTransformer

    from edge_glass.export.formats import export_sentence_transformer

    model = load(aligned["mean"])
    t0 = time.perf_counter()
    full = export_sentence_transformer(model, tmp_path / "st")
    st = SentenceTransformer(str(full), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    assert st.max_seq_length == 16 and st.get_embedding_dimension() == 32
    assert len(st.tokenizer(captions[-1])["input_ids"]) > 16  # the long caption is really cut
    assert_close_rel(st.encode(captions, convert_to_tensor=True), model.encode_texts(captions, dim=32), FP32_NET, "ST full dim")

    cut = SentenceTransformer(str(full), truncate_dim=16, device="cpu")
    ref16 = model.encode_texts(captions, dim=16)
    raw = cut.encode(captions, convert_to_tensor=True)
    assert raw.shape == (len(captions), 16) and bool((raw.norm(dim=-1) < 0.999).all())  # ST truncates after Normalize
    assert_close_rel(cut.encode(captions, convert_to_tensor=True, normalize_embeddings=True), ref16, FP32_NET, "ST truncate_dim + normalize")

    small = export_sentence_transformer(model, tmp_path / "st16", dim=16)
    st16 = SentenceTransformer(str(small), truncate_dim=16, device="cpu")
    assert_close_rel(st16.encode(captions, convert_to_tensor=True), ref16, FP32_NET, "ST exported at dim 16")
    card = (small / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sentence-transformers" and front["license"] == "apache-2.0"
    assert "all-MiniLM-L6-v2" in card and "Apache-2.0" in card
    print(f"sentence-transformers exports + checks: {time.perf_counter() - t0:.1f} s")


def test_pooled_text_head_exports_the_backbone_s_own_sentence_embedding(aligned, captions, tmp_path):
    from sentence_transformers import SentenceTransformer

    from edge_glass.export.formats import export_sentence_transformer

    model = load(aligned["pooled"])
    st = SentenceTransformer(str(export_sentence_transformer(model, tmp_path / "st")), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
    assert_close_rel(st.encode(captions, convert_to_tensor=True), model.encode_texts(captions), FP32_NET, "ST pooled head")


def test_poolers_without_a_sentence_transformers_module_are_refused(aligned, tmp_path):
    from edge_glass.export.formats import export_sentence_transformer

    with pytest.raises(EdgeGlassError, match=r"model\.heads\.text\.pooler: type 'attention'"):
        export_sentence_transformer(load(aligned["attention"]), tmp_path / "st")
    assert not (tmp_path / "st").exists()


# --- 2. save_pretrained / from_pretrained ---------------------------------------------------------

def test_aligned_model_round_trips_through_a_hugging_face_directory(aligned, captions, photos, tmp_path):
    from edge_glass.export.formats import from_pretrained, save_pretrained

    model = load(aligned["mean"])
    out = save_pretrained(model, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "config.json").read_text())
    assert info["task"] == "alignment" and info["config"]["model"]["dims"] == [32, 16] and info["encoders"]["text"]["weights"]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "edge-glass" and front["license"] == "apache-2.0" and "edge-glass" in front["tags"]
    evals = json.loads((aligned["mean"] / "eval.json").read_text())
    for dim in ("32", "16"):
        for direction, vals in evals["dims"][dim].items():  # Recall@K per dim and direction, from eval.json
            assert f"| {dim} | {direction} | {vals['R@1']:.2f} | {vals['R@5']:.2f} | {vals['R@10']:.2f} |" in card
    assert "efficientnet-lite0" in card and "all-MiniLM-L6-v2" in card and "coco:" in card and "```yaml" in card

    again = from_pretrained(out, device="cpu")
    assert again.dims == model.dims and again.run_dir is None
    for dim in (32, 16):
        assert_close_rel(again.encode_images(photos, dim=dim), model.encode_images(photos, dim=dim), FP32_OPS, f"images at {dim}")
        assert_close_rel(again.encode_texts(captions, dim=dim), model.encode_texts(captions, dim=dim), FP32_OPS, f"texts at {dim}")
    save_pretrained(again, out)  # an earlier export is replaced (the card keeps its config, loses the run's results)
    assert "No evaluation results" in (out / "README.md").read_text()


def vlm_logits(vlm, images, questions) -> torch.Tensor:
    """Full decoder logits (B, P + L, V) for real images and questions, through the VLM's own parts."""
    from edge_glass.decoders.prompt import collate_prompts

    core = vlm.core
    with torch.no_grad():
        visual, vmask = core.visual(vlm.encoder.encode(images), len(images), core.device)
        prefix, pmask = core.fusion.prefix(visual, vmask)
        prompt = core.decoder.prompt
        batch = collate_prompts([prompt.prompt_ids(q) for q in questions], prompt.pad_id)
        with core.fusion.attached(core.decoder, visual, vmask):
            return core.decoder(prefix, batch["input_ids"], batch["attention_mask"], prefix_mask=pmask).logits


QUESTIONS = ["what shape is in the image?", "what color is the shape?", "is there a circle?"]


def test_lora_vlm_round_trips_without_its_alignment_run(vlm_runs, photos, tmp_path):
    """The directory holds the LoRA weights, projector and the aligned image head with its config:
    from_pretrained answers identically after the alignment run it was trained on is gone."""
    from edge_glass.export.formats import from_pretrained, save_pretrained

    vlm = load(vlm_runs["lora"])
    out = save_pretrained(vlm, tmp_path / "hf")
    info = json.loads((out / "config.json").read_text())
    assert info["task"] == "vlm" and info["aligned_vision"]["config"]["task"] == "alignment"
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert any("lora_" in k for k in keys) and any(k.startswith("vision.head.") for k in keys)
    assert not any(k.startswith("decoder.lm.") and "lora_" not in k for k in keys)  # the frozen base LM is not copied
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "other"  # the tiny test LM has no known licence
    assert "see the backbone's model card" in card and "exact match" in card

    moved = vlm_runs["aligned_copy"].with_name("moved_away")
    vlm_runs["aligned_copy"].rename(moved)
    try:
        again = from_pretrained(out, device="cpu")
    finally:
        moved.rename(vlm_runs["aligned_copy"])
    assert_close_rel(vlm_logits(again, photos, QUESTIONS), vlm_logits(vlm, photos, QUESTIONS), FP32_OPS, "VLM logits")
    assert again.answer(photos, QUESTIONS) == vlm.answer(photos, QUESTIONS)


def test_word_level_vlm_round_trips_with_its_vocabulary(vlm_runs, photos, tmp_path):
    from edge_glass.export.formats import from_pretrained, save_pretrained

    vlm = load(vlm_runs["tiny"])
    out = save_pretrained(vlm, tmp_path / "hf")
    assert json.loads((out / "word_tokenizer.json").read_text())["tokens"] == vlm.core.decoder.prompt.tokenizer.tokens
    again = from_pretrained(out, device="cpu")
    assert_close_rel(vlm_logits(again, photos, QUESTIONS), vlm_logits(vlm, photos, QUESTIONS), FP32_OPS, "tiny VLM logits")
    assert again.answer(photos, QUESTIONS) == vlm.answer(photos, QUESTIONS)


def test_from_pretrained_and_exports_refuse_what_they_cannot_use(aligned, tmp_path):
    from edge_glass.export.formats import export_sentence_transformer, from_pretrained, save_pretrained

    with pytest.raises(EdgeGlassError, match="no such directory"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeGlassError, match=r"config\.json: missing"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EdgeGlassError, match="not an Edge Glass model"):
        from_pretrained(tmp_path / "other")
    model = load(aligned["pooled"])
    for export in (lambda d: save_pretrained(model, d), lambda d: export_sentence_transformer(model, d)):  # a foreign folder is never replaced
        with pytest.raises(EdgeGlassError, match="not an Edge Glass export"):
            export(tmp_path / "other")
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {"model_type": "bert"}
    out = save_pretrained(model, tmp_path / "hf")
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(EdgeGlassError, match=r"model\.safetensors: empty file"):
        from_pretrained(out)


# --- push to the Hub ---------------------------------------------------------------------------

def test_push_to_hub_fails_fast_offline_and_on_an_endpoint_that_never_answers(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from edge_glass.export.formats import push_to_hub

    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "README.md").write_text("hello")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EdgeGlassError, match="HF_HUB_OFFLINE"):
        push_to_hub(folder, "someone/model")
    assert time.perf_counter() - t0 < 2

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.perf_counter()
        with pytest.raises(EdgeGlassError, match="cannot reach the Hugging Face Hub"):
            push_to_hub(folder, "someone/model", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.perf_counter() - t0 < 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    with pytest.raises(EdgeGlassError, match="cannot reach the Hugging Face Hub"):
        push_to_hub(folder, "someone/model", endpoint=f"http://127.0.0.1:{port}", timeout=1.0)


# --- 3. PEFT -------------------------------------------------------------------------------------

def lm_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="session")
def prompt_ids(vlm_runs):
    prompt = load(vlm_runs["lora"]).core.decoder.prompt
    return torch.tensor([prompt.prompt_ids(q) + prompt.answer_ids("circle") for q in QUESTIONS[:1]])


def test_lora_decoder_exports_as_a_peft_adapter_with_projector_and_prompt_description(vlm_runs, tiny_qwen, prompt_ids, photos, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edge_glass.export.formats import save_peft_adapter
    from edge_glass.models.vlm import VisionProjector

    vlm = load(vlm_runs["lora"])
    out = save_peft_adapter(vlm, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    base_logits = lm_logits(base, prompt_ids)
    peft_lm = PeftModel.from_pretrained(base, str(out)).eval()
    trained = lm_logits(vlm.core.decoder.lm, prompt_ids)
    assert_close_rel(lm_logits(peft_lm, prompt_ids), trained, FP32_OPS, "PEFT adapter logits")
    assert (trained - base_logits).abs().max() > 100 * FP32_OPS * trained.abs().max()  # the adapters matter: not a vacuous check

    info = json.loads((out / "vlm_prompt.json").read_text())
    decoder = vlm.core.decoder
    assert info["prompt"]["style"] == "chat" and info["prompt"]["example_ids"] == decoder.prompt.prompt_ids(info["prompt"]["example_question"])
    assert info["prompt"]["example_text"] == decoder.prompt.render(info["prompt"]["example_question"])
    side = load_file(str(out / "projector.safetensors"))
    projector = VisionProjector(vlm.cfg.projector, info["projector"]["in_dim"], info["projector"]["out_dim"])
    projector.load_state_dict({k[len("projector."):]: v for k, v in side.items() if k.startswith("projector.")})
    feats = vlm.core.vision(vlm.encoder.encode(photos))  # the aligned image head's tokens, as the run feeds the projector
    with torch.no_grad():
        assert_close_rel(projector.eval()(feats)[0], vlm.core.projector(feats)[0], FP32_OPS, "projector from projector.safetensors")
    assert any(k.startswith("vision.head.") for k in side)


def test_merged_lora_decoder_is_a_plain_causal_lm_and_the_live_model_is_untouched(vlm_runs, tiny_qwen, prompt_ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_glass.export.formats import save_peft_adapter

    vlm = load(vlm_runs["lora"])
    before = lm_logits(vlm.core.decoder.lm, prompt_ids)
    adapter = save_peft_adapter(vlm, tmp_path / "adapter")
    merged_dir = save_peft_adapter(vlm, tmp_path / "merged", merge=True)
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "projector.safetensors").is_file()
    assert torch.equal(lm_logits(vlm.core.decoder.lm, prompt_ids), before)  # merging worked on a copy
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen), str(adapter)).eval()
    assert_close_rel(lm_logits(merged, prompt_ids), lm_logits(with_adapter, prompt_ids), FP32_NET, "merged vs base + adapter")


def test_runs_without_lora_adapters_are_refused(vlm_runs, aligned, tmp_path):
    from edge_glass.export.formats import save_peft_adapter

    with pytest.raises(EdgeGlassError, match="decoder.type: 'tiny'"):
        save_peft_adapter(load(vlm_runs["tiny"]), tmp_path / "a")
    with pytest.raises(EdgeGlassError, match="needs a vlm run"):
        save_peft_adapter(load(aligned["pooled"]), tmp_path / "b", merge=True)
    assert not list(tmp_path.iterdir())


# --- the CLI verbs ---------------------------------------------------------------------------------

def test_the_export_verb_writes_every_format_and_from_pretrained_reads_hf(aligned, vlm_runs, captions, photos, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    run = next(iter(aligned.values()))
    model = load(run)
    assert main(["export", str(run), "--format", "sentence-transformers", "--dim", "16", "--out", str(tmp_path / "st")]) == 0
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert_close_rel(torch.from_numpy(st.encode(captions)), model.encode_texts(captions, dim=16), FP32_NET, "ST export via the CLI")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    again = edge_glass.from_pretrained(tmp_path / "hf", device="cpu")
    assert_close_rel(again.encode_images([str(p) for p in photos]), model.encode_images([str(p) for p in photos]), FP32_OPS, "hf via the CLI")
    assert main(["export", str(vlm_runs["lora"]), "--format", "peft", "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "projector.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "no")]) == 2  # an alignment run has no LoRA
    assert "error:" in capsys.readouterr().err and not (tmp_path / "no").exists()
