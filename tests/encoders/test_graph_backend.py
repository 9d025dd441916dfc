"""`backend: onnxruntime` on frozen encoders: the backbone exported once into the cache and run in
ONNX Runtime gives the PyTorch features (real photos, captions, 8 kHz speech), under its own
cache key."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from edge_glass.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder
from edge_glass.encoders.text import SentenceTransformerConfig, SentenceTransformerEncoder
from edge_glass.encoders.whisper import WhisperAudioEncoder, WhisperEncoderConfig
from edge_glass.errors import EdgeGlassError
from edge_glass.paths import cache_root

KINDS = {
    "image": (EfficientNetLiteEncoder, EfficientNetLiteConfig),
    "text": (SentenceTransformerEncoder, SentenceTransformerConfig),
    "audio": (WhisperAudioEncoder, WhisperEncoderConfig),
}


@pytest.fixture(scope="module")
def inputs(data_root) -> dict[str, list]:
    prompts = [json.loads(line) for line in (data_root / "asterisk" / "transcripts.jsonl").read_text().splitlines()]
    return {
        "image": [str(p) for p in sorted((data_root / "coco1k" / "images").iterdir())[:5]],
        "text": ["a dog", "two people ride bicycles down a busy city street at night past a row of shops", "Seven."],
        "audio": [str(data_root / "fsdd" / "recordings" / "5_lucas_3.wav"), str(data_root / "asterisk" / prompts[0]["audio"]),
                  str(data_root / "fsdd" / "recordings" / "9_yweweler_40.wav")],
    }


@pytest.mark.parametrize("modality", list(KINDS))
def test_onnxruntime_backend_gives_the_torch_features(modality, inputs):
    cls, config = KINDS[modality]
    torch_enc, ort_enc = cls(config()), cls(config(backend="onnxruntime"))
    assert torch_enc.cache_id() != ort_enc.cache_id()  # features of the two backends never share cache rows
    assert "backend" not in torch_enc.fingerprint()  # torch's key is the key caches had before backends existed
    want, got = torch_enc.encode(inputs[modality]), ort_enc.encode(inputs[modality])
    assert torch.equal(got.mask, want.mask) and got.tokens.dtype == torch.float32
    assert not got.tokens[~got.mask].any()  # padding stays zero
    real = want.mask
    cos = torch.nn.functional.cosine_similarity(got.tokens[real], want.tokens[real], dim=-1)
    assert cos.min() >= 0.9999, (modality, cos.min())
    assert torch.nn.functional.cosine_similarity(got.pooled, want.pooled, dim=-1).min() >= 0.9999
    graph = cache_root() / "onnx" / f"{ort_enc.cache_id()}.onnx"
    assert graph.is_file()
    stamp = graph.stat().st_mtime_ns
    again = cls(config(backend="onnxruntime")).encode(inputs[modality][:1])  # a new encoder reuses the exported graph
    assert graph.stat().st_mtime_ns == stamp
    assert torch.nn.functional.cosine_similarity(again.pooled, want.pooled[:1], dim=-1).min() >= 0.9999


def test_the_backend_is_validated():
    with pytest.raises(ValidationError, match="backend onnxruntime runs the exported fp32 graph"):
        EfficientNetLiteConfig(backend="onnxruntime", autocast="bf16")
    with pytest.raises(ValidationError):
        EfficientNetLiteConfig(backend="tensorrt")


def test_the_backend_refuses_a_gpu_device():
    enc = EfficientNetLiteEncoder(EfficientNetLiteConfig(backend="onnxruntime"))
    enc._device_anchor = torch.empty(0, device="meta")  # any non-CPU device
    with pytest.raises(EdgeGlassError, match="runs on the CPU"):
        enc.graph_backend()


@pytest.mark.parametrize("modality", list(KINDS))
def test_an_exported_graph_runs_without_loading_the_network(modality, inputs):
    """The network loads only to export: a new encoder that finds the graph encodes without it
    (the text encoder tokenises with tokenizer.json, checked at export to give
    sentence-transformers' ids and masks)."""
    cls, config = KINDS[modality]
    cls(config(backend="onnxruntime")).encode(inputs[modality][:1])  # the graph exists from here on
    enc = cls(config(backend="onnxruntime"))
    want = cls(config()).encode(inputs[modality])
    got = enc.encode(inputs[modality])
    assert not enc._loaded
    assert torch.nn.functional.cosine_similarity(got.pooled, want.pooled, dim=-1).min() >= 0.9999
    if modality == "text":
        record = json.loads((cache_root() / "onnx" / f"{enc.cache_id()}.json").read_text())
        assert record == {"fast_tokenizer": True}


def test_the_fast_tokenizer_gives_sentence_transformers_ids(data_root, inputs):
    """On every coco1k caption, in length-sorted batches as the cache fills, and on the probe texts."""
    captions = json.loads((data_root / "coco1k" / "captions.json").read_text())["annotations"]
    texts = sorted({a["caption"] for a in captions}, key=len) + SentenceTransformerEncoder.PROBE_TEXTS
    reference = SentenceTransformerEncoder(SentenceTransformerConfig()).ensure_loaded()
    fast = SentenceTransformerEncoder(SentenceTransformerConfig(backend="onnxruntime"))
    fast.graph_ready({"fast_tokenizer": True})
    assert fast._tokenizer is not None and not fast._loaded
    for b in range(0, len(texts), 32):
        want, got = reference.graph_inputs(texts[b : b + 32]), fast.graph_inputs(texts[b : b + 32])
        assert all(torch.equal(w, g) for w, g in zip(want, got)), texts[b : b + 32]


def test_an_unchecked_tokenizer_falls_back_to_sentence_transformers(inputs):
    """A graph without a record (exported before records existed, or a damaged one) or whose
    record says the tokenizers differ: sentence-transformers tokenises, as before."""
    cls, config = KINDS["text"]
    cls(config(backend="onnxruntime")).encode(inputs["text"][:1])
    record = cache_root() / "onnx" / f"{cls(config(backend='onnxruntime')).cache_id()}.json"
    saved = record.read_text()
    want = cls(config()).encode(inputs["text"])
    try:
        for text in ("", "not json", json.dumps({"fast_tokenizer": False})):
            record.write_text(text)
            enc = cls(config(backend="onnxruntime"))
            got = enc.encode(inputs["text"])
            assert enc._loaded and enc._tokenizer is None
            assert torch.nn.functional.cosine_similarity(got.pooled, want.pooled, dim=-1).min() >= 0.9999
    finally:
        record.write_text(saved)
