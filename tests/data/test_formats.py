import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_glass.data.formats import parse_spec, read_dataset
from edge_glass.data.samples import DataReport
from edge_glass.data.split import split_groups, split_samples
from edge_glass.errors import DataError


def test_coco1k_reads_every_caption_and_cleans_whitespace(data_root):
    report = DataReport()
    samples = read_dataset("coco:coco1k", report)
    assert len(samples) == 5069 and not report.skipped
    assert len({s.group for s in samples}) == 1013
    assert all(s.text == " ".join(s.text.split()) for s in samples)  # trailing spaces collapsed


def make_flickr(root, data_root, rows, header="image,caption"):
    (root / "images").mkdir(parents=True)
    files = sorted((data_root / "coco1k" / "images").iterdir())[:3]
    for i, f in enumerate(files):
        shutil.copy(f, root / "images" / f"{1000 + i}_abc.jpg")
    (root / "captions.txt").write_text("\n".join([header, *rows]) + "\n")


def test_flickr8k_format_with_commas_quotes_and_bad_rows(tmp_path, data_root):
    rows = [
        "1000_abc.jpg,A child in a pink dress is climbing up a set of stairs .",
        '1000_abc.jpg,"A girl, smiling, climbs the stairs ."',
        "1001_abc.jpg,A dog runs, then jumps , over a log .",
        "1002_abc.jpg,   ",
        "9999_abc.jpg,An image that is not there .",
    ]
    make_flickr(tmp_path, data_root, rows)
    report = DataReport()
    samples = read_dataset(f"flickr8k:{tmp_path}", report)
    assert [s.text for s in samples] == [
        "A child in a pink dress is climbing up a set of stairs .",
        "A girl, smiling, climbs the stairs .",
        "A dog runs, then jumps , over a log .",
    ]
    assert samples[0].group == samples[1].group == "1000_abc.jpg"
    assert sorted(s.reason for s in report.skipped) == ["empty caption", "image file not found"]
    assert any(":6" in s.source for s in report.skipped)  # line numbers point into captions.txt


def test_flickr8k_requires_its_header(tmp_path, data_root):
    make_flickr(tmp_path, data_root, ["1000_abc.jpg,a caption"], header="img,text")
    with pytest.raises(DataError, match="image,caption"):
        read_dataset(f"flickr8k:{tmp_path}")


def test_jsonl_paths_are_relative_to_the_file_and_bad_lines_are_skipped(tmp_path, data_root):
    src = min((data_root / "coco1k" / "images").iterdir())
    (tmp_path / "img").mkdir()
    shutil.copy(src, tmp_path / "img" / "a.jpg")
    lines = [json.dumps({"image": "img/a.jpg", "text": "a photo  "}), "{not json", json.dumps({"image": "img/a.jpg", "text": ""}),
             json.dumps({"image": "img/gone.jpg", "text": "x"}), json.dumps({"text": "only text"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    report = DataReport()
    samples = read_dataset(f"jsonl:{tmp_path / 'd.jsonl'}", report)
    assert len(samples) == 1 and samples[0].image == str(tmp_path / "img" / "a.jpg") and samples[0].text == "a photo"
    reasons = sorted(s.reason.split(" (")[0] for s in report.skipped)
    assert reasons == ["bad JSON line", "empty caption", "image file not found", "needs at least two of image, audio, text"]


def test_jsonl_line_that_is_not_utf8_is_skipped_with_its_line_and_byte(tmp_path, data_root):
    src = min((data_root / "coco1k" / "images").iterdir())
    shutil.copy(src, tmp_path / "a.jpg")

    def line(text: str) -> bytes:
        return json.dumps({"image": "a.jpg", "text": text}, ensure_ascii=False).encode()

    data = b"\xef\xbb\xbf" + line("na\u00efve caf\u00e9") + b"\n" + line("x").replace(b"x", b"\xff\xfe") + b"\n" + line("last")
    (tmp_path / "d.jsonl").write_bytes(data)
    report = DataReport()
    samples = read_dataset(f"jsonl:{tmp_path / 'd.jsonl'}", report)
    assert [s.text for s in samples] == ["na\u00efve caf\u00e9", "last"]
    assert [s.source for s in samples] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:3"]
    [bad] = report.skipped
    assert bad.source == f"{tmp_path / 'd.jsonl'}:2" and bad.reason.startswith("not UTF-8 (byte 0xff")
    assert report.read[f"jsonl:{tmp_path / 'd.jsonl'}"] == 3


def test_pixmo_style_parquet_with_bytes_paths_and_unreachable_urls(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_BACKOFF", "0.01")
    src = sorted((data_root / "coco1k" / "images").iterdir())[:2]
    shutil.copy(src[1], tmp_path / "local.jpg")
    table = pa.table({
        "image": [src[0].read_bytes(), None, None],
        "caption": ["bytes row", "", "x"],
    })
    pq.write_table(table, tmp_path / "bytes.parquet")
    report = DataReport()
    samples = read_dataset(f"parquet:{tmp_path / 'bytes.parquet'}", report)
    assert len(samples) == 1 and isinstance(samples[0].image, bytes)
    pq.write_table(pa.table({"image_url": ["http://127.0.0.1:9/a.jpg", "https://127.0.0.1:9/b.jpg", "local.jpg"],
                             "caption": ["u1", "u2", "a local file"]}), tmp_path / "urls.parquet")
    report = DataReport()
    samples = read_dataset(f"parquet:{tmp_path / 'urls.parquet'}", report)
    assert [s.text for s in samples] == ["a local file"]
    assert [s.reason for s in report.skipped] == ["image URL failed: connection refused after 3 tries"] * 2
    assert [s.input for s in report.skipped] == ["http://127.0.0.1:9/a.jpg", "https://127.0.0.1:9/b.jpg"]


def test_unknown_format_and_missing_path_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="FORMAT:PATH"):
        parse_spec("tsv:foo")
    with pytest.raises(DataError, match="does not exist"):
        parse_spec(f"coco:{tmp_path / 'nope'}")


def test_split_is_by_group_deterministic_and_stable():
    groups = [f"img{i}" for i in range(100)]
    a = split_groups(groups, val=10, test=0.2, seed=0)
    assert (len(a["test"]), len(a["val"]), len(a["train"])) == (20, 10, 70)
    assert not (a["test"] & a["val"]) and not (a["train"] & a["test"])
    assert split_groups(list(reversed(groups)), 10, 0.2, 0) == a
    assert split_groups(groups, 10, 0.2, seed=1)["test"] != a["test"]


def test_no_image_is_in_two_splits(data_root):
    samples = read_dataset("coco:coco1k")
    parts = split_samples(samples, val=100, test=200, seed=0)
    seen = [{s.group for s in p} for p in parts.values()]
    assert sum(len(g) for g in seen) == len(set().union(*seen)) == 1013
    assert len({s.group for s in parts["test"]}) == 200
