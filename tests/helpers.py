"""Small builders shared by the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import yaml


def write_config(path: Path, coco_dir: Path, **train) -> Path:
    """A tiny image-text alignment config (Perceiver image head, dims 64/32) on a COCO-format folder."""
    cfg = {
        "name": "tiny",
        "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
        "model": {"dims": [64, 32], "heads": {"image": {"pooler": {"type": "perceiver", "dim": 64, "latents": 8, "depth": 1, "heads": 4}}}},
        "data": {"train": [f"coco:{coco_dir}"], "split": {"val": 4, "test": 8}},
        "train": {"epochs": 3, "batch_size": 16, "checkpoint_every": 5, "log_every": 3, "threads": 1, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def save_tiny_qwen(out: Path, layers: int = 1) -> Path:
    """A tiny random Qwen2 causal LM with a real byte-level BPE tokenizer (chat template), saved like a hub model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from decoders.conftest import QWEN2_TEMPLATE, bpe_tokenizer  # tests/ is on sys.path

    tok = bpe_tokenizer(QWEN2_TEMPLATE)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_losses(run_dir: Path) -> list[float]:
    """The loss of every logged training step of a run directory (metrics.jsonl)."""
    import json

    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(l)["kind"] == "train"]


def torchrun_train(cfg: Path, out: Path, port_base: int = 29500):
    """`torchrun --nproc_per_node 2 -m edge_glass.cli train CFG --out OUT` (a free-ish port per test process)."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port_base + os.getpid() % 1000), "-m", "edge_glass.cli",
           "train", str(cfg), "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, check=False, capture_output=True, text=True)


def relative_weight_gap(a_file: Path, b_file: Path) -> float:
    """|a - b| / |a| over every tensor of two safetensors files (same keys), as one vector."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert set(a) == set(b)
    va, vb = torch.cat([a[k].flatten().double() for k in sorted(a)]), torch.cat([b[k].flatten().double() for k in sorted(b)])
    return ((va - vb).norm() / va.norm()).item()
