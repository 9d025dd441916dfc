"""Webdataset shards on real coco1k photos and Asterisk prompts: a round trip gives back the very
samples of the source, streaming splits shards across ranks and workers exactly once and resumes
at the exact next sample (also after SIGKILL), bad records are skipped and counted, and a run
trained from the shards ends with the metrics of a run trained from the source."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import coco_first
from helpers import write_config

from edge_glass.data.formats import read_dataset
from edge_glass.data.samples import DataReport
from edge_glass.data.shards import FileSlice, ShardStream, iter_shards, shard_paths, split_identity, torch_dataset, write_shards
from edge_glass.errors import DataError
from edge_glass.media.audio import audio_bytes, load_audio
from edge_glass.media.images import image_bytes, open_image


def bare(samples):
    """Samples without their media (compared separately, as bytes)."""
    return [dataclasses.replace(s, image=None, audio=None) for s in samples]


def ids(samples):
    return [(s.source, s.text) for s in samples]


@pytest.fixture(scope="module")
def coco20(data_root, tmp_path_factory) -> Path:
    return coco_first(data_root, 20, tmp_path_factory.mktemp("coco20"))


@pytest.fixture(scope="module")
def shards(coco20, tmp_path_factory) -> Path:
    """The 20 photos (100 captions) in 10 shards of 2 records."""
    out = tmp_path_factory.mktemp("shards") / "coco20"
    write_shards(f"coco:{coco20}", out, shard_size=2)
    return out


def test_round_trip_gives_back_the_source_samples_with_lazy_media(coco20, shards):
    src = read_dataset(f"coco:{coco20}")
    report = DataReport()
    back = read_dataset(f"wds:{shards}", report)
    assert len(src) == len(back) == 100 and not report.skipped
    assert bare(back) == bare(src)  # order, group, source, split, text
    assert all(isinstance(s.image, FileSlice) and s.image.size < 64_000 for s in back)  # references, not bytes
    assert [image_bytes(s.image) for s in back] == [Path(s.image).read_bytes() for s in src]
    assert open_image(back[0].image).size == (224, 224)

    index = json.loads((shards / "index.json").read_text())
    assert index["wids_version"] == 1 and index["source"] == f"coco:{coco20}"
    assert [e["url"] for e in index["shardlist"]] == [f"shard-{k:06d}.tar" for k in range(10)]
    assert {e["nsamples"] for e in index["shardlist"]} == {2} and index["records"] == 20 and index["samples"] == 100
    assert index["skipped"] == 0 and (shards / "failures.jsonl").read_text() == ""
    with tarfile.open(shards / "shard-000000.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(names[0]).read())
    assert names == ["000000000.json", "000000000.jpg", "000000005.json", "000000005.jpg"]  # one record per photo
    assert meta["texts"] == [s.text for s in src[:5]] and meta["group"] == src[0].group and meta["positions"] == [0, 1, 2, 3, 4]
    assert not list(shards.glob(".*"))  # no temporary files left

    subset = read_dataset(f"wds:{shards}/shard-{{000000..000001}}.tar")
    assert bare(subset) == bare(src[:20])
    assert split_identity(f"wds:{shards}") == f"coco:{coco20}"


def test_a_rerun_keeps_finished_shards_and_other_settings_are_refused(coco20, shards, tmp_path):
    out = tmp_path / "again"
    write_shards(f"coco:{coco20}", out, shard_size=8)
    (out / "shard-000001.tar").unlink()  # as if killed while writing it
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    index = write_shards(f"coco:{coco20}", out, shard_size=8)
    assert (index["written"], index["kept"]) == (1, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in stamps} == stamps
    assert bare(read_dataset(f"wds:{out}")) == bare(read_dataset(f"coco:{coco20}"))
    with pytest.raises(DataError, match="other settings .*shard_size"):
        write_shards(f"coco:{coco20}", out, shard_size=5)


def test_audio_real_extensions_and_corrupt_inputs(data_root, coco20, tmp_path):
    """Audio clips and a PNG named .jpg keep their bytes under their real extension; a corrupt
    image is skipped and counted at shard time, never written."""
    prompts = [json.loads(line) for line in (data_root / "asterisk" / "transcripts.jsonl").read_text().splitlines()[:3]]
    photos = sorted((coco20 / "images").iterdir())[:2]
    png = tmp_path / "really_a_png.jpg"
    Image.open(photos[0]).save(png, format="PNG")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[1].read_bytes()[:3000])  # truncated JPEG
    rows = [{"audio": str(data_root / "asterisk" / p["audio"]), "text": p["text"]} for p in prompts]
    rows += [{"image": str(png), "text": "a png"}, {"image": str(broken), "text": "cut short"}, {"image": str(photos[1]), "text": "whole"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = DataReport()
    index = write_shards(f"jsonl:{manifest}", tmp_path / "out", report=report)
    assert [(s.reason.split(" (")[0], s.input) for s in report.skipped] == [("corrupt image", str(broken))]
    assert index["skipped"] == 1 and index["skipped_by_reason"] == {"corrupt image": 1}
    assert [json.loads(line)["input"] for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()] == [str(broken)]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        exts = [n.split(".", 1)[1] for n in tf.getnames() if not n.endswith(".json")]
    assert exts == ["wav", "wav", "wav", "png", "jpg"]

    src = [s for s in read_dataset(f"jsonl:{manifest}") if s.text != "cut short"]
    back = read_dataset(f"wds:{tmp_path / 'out'}")
    assert bare(back) == bare(src)
    assert [audio_bytes(s.audio) for s in back[:3]] == [Path(s.audio).read_bytes() for s in src[:3]]
    assert (load_audio(back[0].audio) == load_audio(src[0].audio)).all()
    assert image_bytes(back[3].image) == png.read_bytes()


def test_ranks_and_workers_cover_every_sample_once_in_a_shuffled_shard_order(shards):
    everything = ids(read_dataset(f"wds:{shards}"))
    for epoch in (0, 1):
        parts = {(r, w): ids(iter_shards(f"wds:{shards}", rank=r, world=2, worker=w, num_workers=2, epoch=epoch, seed=7))
                 for r in range(2) for w in range(2)}
        assert all(parts.values())
        assert Counter(x for p in parts.values() for x in p) == Counter(everything)  # no duplicate, no omission
    orders = {e: ShardStream(f"wds:{shards}", rank=0, world=1, worker=0, num_workers=1, epoch=e, seed=7).shards() for e in (0, 1, 2)}
    assert len({tuple(o) for o in orders.values()}) == 3 and all(sorted(o) == sorted(orders[0]) for o in orders.values())
    assert ShardStream(f"wds:{shards}", rank=0, world=1, worker=0, num_workers=1, epoch=1, seed=7).shards() == orders[1]

    from torch.utils.data import DataLoader

    loader = DataLoader(torch_dataset(f"wds:{shards}", epoch=3), batch_size=4, num_workers=2, collate_fn=list)
    got = [x for batch in loader for x in ids(batch)]
    assert Counter(got) == Counter(everything)
    assert all(isinstance(s.image, bytes) for s in next(iter(loader)))


def test_resume_from_a_saved_state_continues_with_exactly_the_next_sample(shards):
    kw = dict(rank=1, world=2, worker=0, num_workers=2, epoch=4, seed=1)
    full = ids(iter_shards(f"wds:{shards}", **kw))
    assert len(full) == 20  # shards 2 and 6 of 10 (consumer 2 of 4), 10 captions each
    for k in (0, 3, 5, 11, len(full) - 1, len(full)):
        stream = ShardStream(f"wds:{shards}", **kw)
        it = iter(stream)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(stream.state()))  # a small JSON-able dict
        assert state["consumed"] == k and set(state) == {"epoch", "seed", "split", "shard", "offset", "consumed"}
        rest = ids(ShardStream(f"wds:{shards}", state=state, **{**kw, "epoch": None}))
        assert ids(head) + rest == full, k
    with pytest.raises(DataError, match="consumer"):
        list(ShardStream(f"wds:{shards}", state=state, **{**kw, "worker": 1}))


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from edge_glass.atomic import atomic_write_json
    from edge_glass.data.shards import ShardStream
    spec, log, state_file, pause = sys.argv[1:5]
    state = json.load(open(state_file)) if os.path.exists(state_file) else None
    stream = ShardStream(spec, rank=0, world=1, worker=0, num_workers=1, epoch=2, seed=5, state=state)
    with open(log, "a") as f:
        for s in stream:
            f.write(json.dumps([s.source, s.text]) + "\\n")
            f.flush()
            atomic_write_json(state_file, stream.state())
            time.sleep(float(pause))
""")


def test_a_stream_killed_with_sigkill_resumes_at_its_saved_state(shards, tmp_path):
    spec = f"wds:{shards}"
    full = [list(x) for x in ids(iter_shards(spec, rank=0, world=1, worker=0, num_workers=1, epoch=2, seed=5))]
    log, state_file = tmp_path / "log.jsonl", tmp_path / "state.json"
    args = [sys.executable, "-c", CHILD, spec, str(log), str(state_file)]
    proc = subprocess.Popen([*args, "0.02"], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 30):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(state_file.read_text())
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert 25 <= state["consumed"] < len(full) and seen[:state["consumed"]] == full[:state["consumed"]]  # killed mid-stream
    log.write_text("".join(json.dumps(x) + "\n" for x in seen[:state["consumed"]]))  # what the state vouches for
    subprocess.run([*args, "0"], check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert [json.loads(line) for line in log.read_text().splitlines()] == full


def _rewrite(tar: Path, change) -> None:
    """Rewrite a shard member by member; ``change(name, data)`` returns new bytes, or None to drop it."""
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar, "w") as tf:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_bad_records_inside_shards_are_skipped_and_counted(coco20, tmp_path):
    out = tmp_path / "bad"
    write_shards(f"coco:{coco20}", out, shard_size=4)
    with tarfile.open(out / "shard-000000.tar") as tf:
        jpgs = [n for n in tf.getnames() if n.endswith(".jpg")]
    garbage, truncated, no_json = jpgs[0], jpgs[1], jpgs[2].replace(".jpg", ".json")
    _rewrite(out / "shard-000000.tar", lambda n, d: b"\x00" * len(d) if n == garbage else d[:2000] if n == truncated
             else None if n == no_json else d)

    report = DataReport()
    listed = read_dataset(f"wds:{out}", report)  # listing reads a few bytes of each medium
    assert len(listed) == 100 - 5 - 5 and len(report.skipped) == 5 + 1  # a record without json: its texts are unknown
    assert Counter(s.reason for s in report.skipped) == {"not a recognised image format": 5, "record has no json": 1}
    assert all(s.source.startswith(str(out / "shard-000000.tar")) for s in report.skipped)

    report = DataReport()
    streamed = list(iter_shards(f"wds:{out}", rank=0, world=1, worker=0, num_workers=1, report=report))  # decodes each
    assert len(streamed) == 100 - 5 - 5 - 5
    assert Counter(s.reason.split(" (")[0] for s in report.skipped) == {"not a recognised image format": 5, "corrupt image": 5,
                                                                       "record has no json": 1}
    cut = {x for s, x in zip(listed, ids(listed)) if s.image.name == truncated}
    assert len(cut) == 5 and Counter(ids(streamed)) == Counter(x for x in ids(listed) if x not in cut)

    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:3000])  # a shard cut mid-record
    report = DataReport()
    rest = list(iter_shards(f"wds:{out}", rank=0, world=1, worker=0, num_workers=1, report=report))
    assert len(rest) < len(streamed) and any("unreadable shard data" in s.reason for s in report.skipped)
    report = DataReport()
    assert len(read_dataset(f"wds:{out}", report)) < len(listed)
    assert "shard damaged (unexpected end of data)" in {s.reason for s in report.skipped}
    assert "image truncated" in {s.reason.split(" (")[0] for s in report.skipped}  # the record cut in two
    with pytest.raises(DataError, match="does not exist"):
        shard_paths(str(tmp_path / "nowhere"))


def test_training_from_shards_ends_with_the_metrics_of_training_from_the_source(coco20, shards, tmp_path):
    from edge_glass.config import load_config
    from edge_glass.train.loop import train

    def run(spec: str, name: str) -> dict:
        cfg_path = write_config(tmp_path / f"{name}.yaml", coco20, epochs=1, log_every=1)
        raw = yaml.safe_load(cfg_path.read_text())
        raw["data"]["train"] = [spec]
        cfg_path.write_text(yaml.safe_dump(raw))
        train(load_config(cfg_path), tmp_path / name, progress=False)
        return json.loads((tmp_path / name / "eval.json").read_text())

    source, sharded = run(f"coco:{coco20}", "source"), run(f"wds:{shards}", "sharded")
    assert json.loads((tmp_path / "source" / "split.json").read_text())[f"coco:{coco20}"] == \
        json.loads((tmp_path / "sharded" / "split.json").read_text())[f"wds:{shards}"]
    assert source["dims"] == sharded["dims"]


def test_the_shard_command(coco20, tmp_path, capsys):
    from edge_glass.cli import main

    assert main(["shard", f"coco:{coco20}", "--out", str(tmp_path / "s"), "--shard-size", "7", "--no-progress"]) == 0
    assert f"100 samples in 20 records, 3 shards in {tmp_path / 's'} (3 written, 0 already done)" in capsys.readouterr().out
    assert len(read_dataset(f"wds:{tmp_path / 's'}")) == 100
    assert main(["shard", f"coco:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_training_run_from_shards_killed_mid_epoch_resumes_to_the_same_metrics(coco20, shards, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from test_training import _kill_after, _latest_step, run

    cfg_path = write_config(tmp_path / "wds.yaml", coco20, epochs=2, batch_size=8, checkpoint_every=3, log_every=1)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"]["train"] = [f"wds:{shards}"]
    cfg_path.write_text(yaml.safe_dump(raw))
    run("train", str(cfg_path), "--out", str(tmp_path / "straight"), "--no-progress")
    steps = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert steps["steps_per_epoch"] > 3  # the checkpoint of step 3 is inside the first epoch
    args = ["train", str(cfg_path), "--out", str(tmp_path / "killed"), "--no-progress"]
    _kill_after(args, tmp_path / "killed", min_step=3, delay=0.0)
    assert 3 <= _latest_step(tmp_path / "killed") < steps["steps"]
    run(*args, "--resume")
    assert json.loads((tmp_path / "killed" / "eval.json").read_text()) == json.loads((tmp_path / "straight" / "eval.json").read_text())
