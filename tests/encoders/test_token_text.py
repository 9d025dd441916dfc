"""A trainable encoder beside the frozen ones: trained with the heads, saved in the run, never cached."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from edge_glass.cli import main
from edge_glass.encoders.token_text import TokenTextConfig, TokenTextEncoder


def test_token_text_masks_padding_and_initialises_from_minilm_embeddings():
    enc = TokenTextEncoder(TokenTextConfig(dim=384, layers=1, heads=4, dropout=0.0, init_embeddings=True)).eval()
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(enc.model_dir)).get_input_embeddings().weight
    assert torch.equal(enc.embed.weight, ref)
    short = enc.encode(["a dog"])
    both = enc.encode(["a dog", "a much longer caption about a dog running on the beach"])
    assert both.tokens.shape[1] > short.tokens.shape[1] and both.mask[0].sum() == short.mask[0].sum()
    # padding does not change the short text's tokens (keys are masked); float32, different shapes
    n = int(short.mask[0].sum())
    err = (both.tokens[0, :n] - short.tokens[0, :n]).abs().max() / short.tokens.abs().max()
    assert err < 1e-5 and (both.tokens[0, n:] == 0).all()


def test_alignment_trains_a_token_text_encoder_with_the_heads(coco_subset, tmp_path):
    cfg = {
        "name": "trainable", "encoders": {"image": {"type": "efficientnet_lite"},
                                          "text": {"type": "token_text", "dim": 64, "layers": 1, "heads": 2, "dropout": 0.0}},
        "model": {"dims": [32]},
        "data": {"train": [f"coco:{coco_subset}"], "split": {"val": 4, "test": 8}},
        "train": {"epochs": 4, "batch_size": 16, "lr": 2.0e-3, "checkpoint_every": 100, "log_every": 2, "threads": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]) == 0
    loss = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == "train"]
    assert loss[-1] < loss[0]
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("encoders.text.embed") for k in state)  # the encoder's trained weights are in the run
    fresh = TokenTextEncoder(TokenTextConfig(**cfg["encoders"]["text"]))
    assert not torch.equal(state["encoders.text.embed.weight"], fresh.embed.weight)
    import edge_glass

    model = edge_glass.load(out, device="cpu")
    assert model.encoders["text"] is model.core.encoders["text"]
    emb = model.encode_texts(["a man riding a horse", "a plate of food"])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2))
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text()) ["text_to_image"] == json.loads((out / "eval.json").read_text())["text_to_image"]
    from edge_glass.paths import cache_root

    cached = [p.name for p in (cache_root() / "features").iterdir()] if (cache_root() / "features").is_dir() else []
    assert not any(name.startswith("text-token_text") for name in cached)


def test_dim_must_match_the_tokenizer_model_to_initialise_from_it():
    from edge_glass.errors import ConfigError

    with pytest.raises(ConfigError, match="set dim: 384"):
        TokenTextEncoder(TokenTextConfig(dim=64, init_embeddings=True))
