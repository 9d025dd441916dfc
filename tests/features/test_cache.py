import shutil

import torch

from edge_glass.features.cache import FeatureCache
from edge_glass.features.pipeline import build_paired_data
from edge_glass.data.samples import DataReport, Sample
from edge_glass.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder
from edge_glass.encoders.text import SentenceTransformerConfig, SentenceTransformerEncoder
from numerics import FP32_NET, assert_close_rel


def images(data_root, n, start=0):
    return [str(f) for f in sorted((data_root / "coco1k" / "images").iterdir())[start : start + n]]


def test_cached_features_equal_live_encoding(image_encoder, text_encoder, tmp_path, data_root):
    files = images(data_root, 5)
    texts = ["a cat on a sofa", "two people skiing down a snowy hill with poles"]
    for enc, items in ((image_encoder, files), (text_encoder, texts)):
        cache = FeatureCache(tmp_path, enc, dtype="float32", shard_size=2)
        keyed = {enc.content_key(i): i for i in items}
        assert cache.fill(keyed, batch_size=3, progress=False) == {}
        table = cache.load(list(keyed))
        got = table.batch(torch.arange(len(items)))
        live = enc.encode(items)
        # the cache encoded in batches of 3, live encoding all at once: other batch shapes through a
        # deep network (EfficientNet-Lite, MiniLM), so float32 rounding relative to the values' scale
        name = type(enc).__name__
        assert_close_rel(got.tokens, live.tokens, FP32_NET, f"{name} cached vs live tokens")
        assert torch.equal(got.mask, live.mask)
        assert_close_rel(got.pooled, live.pooled, FP32_NET, f"{name} cached vs live pooled")
    assert not list(tmp_path.rglob("*.tmp"))  # shards are renamed into place


def test_a_filled_cache_never_loads_the_backbone(image_encoder, tmp_path, data_root):
    files = images(data_root, 3)
    FeatureCache(tmp_path, image_encoder).fill({image_encoder.content_key(f): f for f in files}, 8, progress=False)
    fresh = EfficientNetLiteEncoder(EfficientNetLiteConfig())  # a new process's encoder: weights not loaded
    cache = FeatureCache(tmp_path, fresh)
    assert cache.fill({fresh.content_key(f): f for f in files}, 8, progress=False) == {}
    assert not fresh._loaded


def test_cache_invalidates_on_preprocessing_weights_or_content_change(image_encoder, tmp_path, data_root):
    base = FeatureCache(tmp_path, image_encoder)
    assert FeatureCache(tmp_path, EfficientNetLiteEncoder(EfficientNetLiteConfig(image_size=192))).dir != base.dir
    assert FeatureCache(tmp_path, EfficientNetLiteEncoder(EfficientNetLiteConfig(model="efficientnet-lite2"))).dir != base.dir
    assert FeatureCache(tmp_path, SentenceTransformerEncoder(SentenceTransformerConfig(max_length=32))).dir != \
        FeatureCache(tmp_path, SentenceTransformerEncoder(SentenceTransformerConfig())).dir
    # same bytes under a new name hit, new bytes under the old name miss
    src = images(data_root, 2)
    f = tmp_path / "x.jpg"
    shutil.copy(src[0], f)
    base.fill({image_encoder.content_key(str(f)): str(f)}, 4, progress=False)
    shutil.copy(src[0], tmp_path / "renamed.jpg")
    assert base.missing([image_encoder.content_key(str(tmp_path / "renamed.jpg"))]) == []
    shutil.copy(src[1], f)
    assert base.missing([image_encoder.content_key(str(f))]) != []


def test_bad_inputs_are_skipped_counted_and_named(image_encoder, text_encoder, tmp_path, data_root):
    good = images(data_root, 3)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(good[0], "rb").read()[:500])
    samples = [Sample(group=g, source=f"row {i}", image=g, text=f"caption {i}") for i, g in enumerate(good)]
    samples.append(Sample(group="c", source="row 3", image=str(corrupt), text="a corrupt picture"))
    samples.append(Sample(group="m", source="row 4", image=str(tmp_path / "missing.jpg"), text="a missing picture"))
    report = DataReport()
    data = build_paired_data(samples, {"image": image_encoder, "text": text_encoder}, report, tmp_path / "cache", progress=False)
    assert len(data) == 3
    assert {s.source: s.reason.split(" (")[0] for s in report.skipped} == {"row 3": "corrupt image", "row 4": "image file not found"}
    assert report.to_dict()["skipped_count"] == 2
    batch = data.batch(torch.arange(3))
    assert batch.features["image"].tokens.shape == (3, 49, 1280)
