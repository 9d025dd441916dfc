import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_glass.errors import EdgeGlassError
from edge_glass.features.cache import FeatureCache, FeatureTable, ShardedFeatureTable
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


# --- the sharded (on-disk) table --------------------------------------------------------------------

CAPTIONS = ["a cat", "two people skiing down a snowy hill with poles", "a red bus parked by the road",
            "a plate of food", "a man riding a wave on top of a surfboard in the ocean", "dogs",
            "a kitchen with a stove, a sink and wooden cabinets", "a clock tower", "a child flying a kite on a beach",
            "an elephant", "a bowl of oranges and bananas on a table", "a train"]


def filled(enc, items, root, shard_size, batch_size=None):
    cache = FeatureCache(root, enc, dtype="float16", shard_size=shard_size)
    keyed = {enc.content_key(i): i for i in items}
    assert cache.fill(keyed, batch_size=batch_size or shard_size, progress=False) == {}
    return cache, list(keyed)


def reference_batch(cache, keys, rows):
    """What the in-RAM table gives, computed independently from safetensors' own loader: each
    item's stored tokens as float32, exact zeros past its length."""
    out, lengths, pooled = [], [], []
    for r in rows.tolist():
        shard, row = cache.index[keys[r]]
        data = load_file(str(shard))
        first = int(data["lengths"][:row].sum())
        out.append(data["tokens"][first : first + int(data["lengths"][row])].float())
        pooled.append(data["pooled"][row].float())
    t = max(len(o) for o in out)
    tokens = torch.zeros(len(out), t, out[0].shape[1])
    for i, o in enumerate(out):
        tokens[i, : len(o)] = o
    return tokens, torch.tensor([len(o) for o in out]), torch.stack(pooled)


def bits(x):
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("reader", ["pread", "mmap"])
def test_the_sharded_table_equals_the_in_ram_table_bitwise(reader, image_encoder, text_encoder, tmp_path, data_root):
    for enc, items, shard_size in ((image_encoder, images(data_root, 7), 3), (text_encoder, CAPTIONS, 5)):
        cache, keys = filled(enc, items, tmp_path, shard_size)
        assert len(cache.headers) >= 2  # several shards
        order = keys[::-1] + keys[:3]  # another order, and repeated keys
        table = cache.load(order, reader=reader)
        in_ram = cache.load(order, in_memory=True)
        assert isinstance(table, ShardedFeatureTable) and isinstance(in_ram, FeatureTable) and len(table) == len(in_ram) == len(order)
        for rows in (torch.arange(len(order)), torch.tensor([4, 0, 4, len(order) - 1]), torch.tensor([2]), torch.tensor([0, 1])):
            got, ram = table.batch(rows), in_ram.batch(rows)
            tokens, lengths, pooled = reference_batch(cache, order, rows)
            assert torch.equal(got.mask.sum(1), lengths) and torch.equal(got.mask, ram.mask)
            assert got.tokens.dtype == got.pooled.dtype == torch.float32
            assert torch.equal(bits(got.tokens), bits(tokens)) and torch.equal(bits(ram.tokens), bits(tokens))  # +0.0 padding too
            assert torch.equal(bits(got.pooled), bits(pooled)) and torch.equal(bits(ram.pooled), bits(pooled))
        first = table.batch(torch.arange(3))
        table.batch(torch.arange(3, len(order)))  # reuses its buffers: what it returned before must not change
        assert torch.equal(bits(first.tokens), bits(reference_batch(cache, order, torch.arange(3))[0]))
        again = pickle.loads(pickle.dumps(table))  # e.g. to a spawned worker: files reopen there
        assert torch.equal(bits(again.batch(torch.arange(3)).tokens), bits(first.tokens))
    assert len(set(table.lengths.tolist())) > 2  # the captions: ragged sequences were exercised


def mapped_rss_kb(paths) -> int:
    """Resident kB of this process's mappings of ``paths`` (/proc/self/smaps)."""
    names, total, current = {str(p) for p in paths}, 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line: range perms offset dev inode [path]
            current = head[5] if len(head) == 6 else None
        elif head[0] == "Rss:" and current in names:
            total += int(head[1])
    return total


def bytes_read_by_syscalls() -> int:
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


LINUX = Path("/proc/self/smaps").exists() and Path("/proc/self/io").exists()


@pytest.mark.parametrize("reader", ["pread", "mmap"])
def test_a_batch_reads_only_its_rows_and_keeps_none_of_them(reader, image_encoder, tmp_path, data_root, monkeypatch):
    files = images(data_root, 12)
    cache, keys = filled(image_encoder, files, tmp_path, shard_size=2)  # 6 shards of 2 images (49 x 1280 fp16 each)
    table = cache.load(keys, reader=reader, max_open=2)
    shard_of = [cache.index[k][0] for k in keys]
    rows = torch.tensor([5, 4])
    assert shard_of[4] == shard_of[5] != shard_of[0] and len(cache.headers) == 6
    assert table.opens == 0  # nothing is opened before a batch needs it
    item = 49 * 1280 * 2 + 1280 * 2  # an image's tokens + pooled vector, float16
    before = bytes_read_by_syscalls() if LINUX else 0
    first = table.batch(rows)
    if LINUX and reader == "pread":
        assert 2 * item <= bytes_read_by_syscalls() - before < 2 * item + 1024  # the two items' bytes (+ reading /proc/self/io)
    assert table.opens == 1 and table.bytes_read == 2 * item
    # the other shards are never read: delete them and the same batch still works ...
    for path in set(shard_of) - {shard_of[4]}:
        path.unlink()
    assert torch.equal(bits(table.batch(rows).tokens), bits(first.tokens))
    assert table.opens == 1 and table.bytes_read == 4 * item
    # ... and a batch that needs one of them names it
    with pytest.raises(EdgeGlassError, match=shard_of[0].name):
        table.batch(torch.tensor([4, 0]))
    # pages read for a batch do not stay in the process (they would count in its RSS); at most max_open shards are open
    cache, keys = filled(image_encoder, files, tmp_path / "again", shard_size=2)
    table = cache.load(keys, reader=reader, max_open=2)
    for r in range(0, len(keys), 3):
        table.batch(torch.arange(r, min(r + 3, len(keys))))
        assert len(table._open) <= 2
        if LINUX:
            assert mapped_rss_kb(cache.headers) == 0
    assert table.opens >= 6
    if LINUX and reader == "mmap":  # the check can fail: without the release the pages stay resident
        monkeypatch.setattr("edge_glass.features.cache._OpenShard.release", lambda self: None)
        table.batch(torch.arange(len(keys)))
        assert mapped_rss_kb(cache.headers) >= 2 * item // 1024


@pytest.mark.parametrize("reader", ["pread", "mmap"])
def test_a_damaged_shard_is_named_skipped_and_encoded_again(reader, text_encoder, tmp_path):
    cache, keys = filled(text_encoder, CAPTIONS[:6], tmp_path, shard_size=2, batch_size=1)
    before = cache.load(keys, in_memory=True).batch(torch.arange(6))
    shards = sorted(cache.headers)
    os.truncate(shards[0], shards[0].stat().st_size - 100)  # truncated
    shards[1].write_bytes(b"not a safetensors file at all")  # garbage
    with pytest.warns(UserWarning) as caught:
        fresh = FeatureCache(tmp_path, text_encoder, dtype="float16", shard_size=2)
    messages = " ".join(str(w.message) for w in caught)
    assert shards[0].name in messages and "truncated" in messages and shards[1].name in messages
    assert len(fresh.missing(keys)) == 4
    assert fresh.fill({text_encoder.content_key(c): c for c in CAPTIONS[:6]}, batch_size=1, progress=False) == {}
    after = fresh.load(keys, reader=reader).batch(torch.arange(6))
    assert torch.equal(after.mask, before.mask)
    assert_close_rel(after.tokens, before.tokens, FP32_NET, "re-encoded tokens")
    # a shard that shrinks under an open table: an error naming it, not a crash (reading a map past its file's end is SIGBUS)
    table = fresh.load(keys, reader=reader)
    table.batch(torch.arange(6))
    victim = fresh.index[keys[0]][0]
    os.truncate(victim, 64)
    with pytest.raises(EdgeGlassError, match=f"{victim.name}.*(truncated|changed on disk)"):
        table.batch(torch.tensor([0]))
