"""Image URL downloads against a real HTTP server on 127.0.0.1: retries for transient failures
only, a reason per failed URL, parallel fetches, and a cache that a re-run reads instead."""
from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from edge_glass.data.download import OFFLINE, UrlFetcher, download_shards
from edge_glass.errors import DataError
from edge_glass.data.formats import read_dataset
from edge_glass.data.samples import DataReport
from edge_glass.paths import cache_root

TIMEOUT = 0.4  # seconds per socket operation; /slow stalls far longer


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.active = self.max_active = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and hung up is expected here


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
            self.server.active += 1
            self.server.max_active = max(self.server.max_active, self.server.active)
        try:
            self.respond(path, hits)
        finally:
            with self.server.lock:
                self.server.active -= 1

    def respond(self, path: str, hits: int) -> None:
        if path == "/slow.png":
            self.server.stop.wait(10 * TIMEOUT)  # far past the client's timeout (ended at teardown)
        elif path.startswith("/delay/"):
            time.sleep(0.2)
        if path == "/missing.png":
            return self.send_error(404)
        if path == "/forbidden.png":
            return self.send_error(403)
        if path == "/busy.png":
            return self.send_error(429)
        if path == "/flaky.png" and hits == 1:
            return self.send_error(500)
        body = b"\x89PNG\r\n\x1a\n this is not really a png" if path == "/corrupt.png" else self.server.files.get(path)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if path.endswith(".png") else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_TRIES", "3")
    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_BACKOFF", "0.05")
    files = {"/good.png": png_bytes((200, 10, 10)), "/flaky.png": png_bytes((10, 200, 10)),
             **{f"/delay/{i}.png": png_bytes((i, i, i)) for i in range(6)}}
    srv = Server(files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def dead_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parquet_urls_retry_transient_failures_report_each_reason_and_cache(tmp_path, server, data_root):
    photo = min((data_root / "coco1k" / "images").iterdir())
    server.files["/photo.jpg"] = photo.read_bytes()
    rows = [  # three dead links first: the good ones after them must still be fetched
        ("/missing.png", "a 404"), ("/forbidden.png", "a 403"), ("/corrupt.png", "corrupt bytes"),
        ("/slow.png", "too slow"), ("/good.png", "a red square"), ("/photo.jpg", "a coco photo"),
        ("/flaky.png", "500 then fine"), ("/busy.png", "always 429"), ("/good.png", "the same url again"),
        ("/good.png", "   "),
    ]
    path = tmp_path / "pixmo.parquet"
    pq.write_table(pa.table({"image_url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), path)

    report = DataReport()
    start = time.monotonic()
    samples = read_dataset(f"parquet:{path}", report)
    assert time.monotonic() - start < 30
    assert [s.text for s in samples] == ["a red square", "a coco photo", "500 then fine", "the same url again"]
    assert [s.source for s in samples] == [f"{path} row {i}" for i in (4, 5, 6, 8)]
    downloads = cache_root() / "downloads"
    assert all(s.image.startswith(str(downloads)) for s in samples)
    assert Path(samples[1].image).read_bytes() == photo.read_bytes()
    reasons = {s.input.rsplit("/", 1)[-1]: s.reason for s in report.skipped}
    assert reasons["missing.png"] == "image URL failed: HTTP 404"
    assert reasons["forbidden.png"] == "image URL failed: HTTP 403"
    assert reasons["corrupt.png"].startswith("image URL failed: not an image (")
    assert reasons["slow.png"] == "image URL failed: timed out after 3 tries"
    assert reasons["busy.png"] == "image URL failed: HTTP 429 after 3 tries"
    assert [s.reason for s in report.skipped if s.source == f"{path} row 9"] == ["empty caption"]
    assert all(str(path) in s.source for s in report.skipped)
    assert server.hits == {"/missing.png": 1, "/forbidden.png": 1, "/corrupt.png": 1, "/slow.png": 3,
                           "/good.png": 1, "/photo.jpg": 1, "/flaky.png": 2, "/busy.png": 3}

    before = dict(server.hits)
    again = read_dataset(f"parquet:{path}", DataReport())
    assert [s.image for s in again] == [s.image for s in samples]
    for cached in ("/good.png", "/photo.jpg", "/flaky.png"):
        assert server.hits[cached] == before[cached]  # read from the cache, not the server
    assert server.hits["/missing.png"] == 2  # failures are tried again on a re-run


def test_urls_are_fetched_in_parallel(tmp_path, server):
    urls = [server.url(f"/delay/{i}.png") for i in range(6)]
    results = UrlFetcher(workers=4, timeout=5, cache_dir=tmp_path).fetch_all(urls)
    assert all(p is not None and p.is_file() for p, _ in results.values())
    assert server.max_active >= 2


def test_offline_only_when_no_host_answers(tmp_path, server):
    dead = [f"http://127.0.0.1:{dead_port()}/{i}.png" for i in range(3)]
    offline = UrlFetcher(workers=1, tries=1, offline_hosts=2, cache_dir=tmp_path / "a").fetch_all([dead[0], dead[1], dead[2]])
    assert [r for _, r in offline.values()] == ["image URL failed: connection refused after 1 try"] * 2 + [OFFLINE]

    answered = UrlFetcher(workers=1, tries=1, offline_hosts=2, cache_dir=tmp_path / "b").fetch_all(
        [server.url("/missing.png"), *dead])
    assert [r for _, r in answered.values()] == ["image URL failed: HTTP 404"] + ["image URL failed: connection refused after 1 try"] * 3


# -- edge-glass download: URL tables straight into webdataset shards ---------------------------

def test_download_into_shards_resizes_reports_each_failure_and_never_refetches_a_finished_shard(tmp_path, server, data_root):
    import dataclasses
    import json

    from edge_glass.media.images import image_bytes

    photo = min((data_root / "coco1k" / "images").iterdir())
    server.files["/photo.jpg"] = photo.read_bytes()  # 224x224: kept byte for byte
    big = io.BytesIO()
    Image.open(photo).resize((800, 600)).save(big, format="PNG")
    server.files["/big.png"] = big.getvalue()  # resized to 512x384, stored as JPEG
    rows = [("/good.png", "a red square"), ("/photo.jpg", "a coco photo"), ("/good.png", "the same url again"),  # shard 0
            ("/missing.png", "a 404"), ("/slow.png", "too slow"), ("/big.png", "a big photo"),                  # shard 1
            ("/corrupt.png", "corrupt bytes"), ("/flaky.png", "500 then fine"), ("/photo.jpg", "   ")]          # shard 2
    path = tmp_path / "pixmo.parquet"
    pq.write_table(pa.table({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), path)
    out = tmp_path / "shards"

    index = download_shards(f"parquet:{path}", out, shard_size=3, image_size=512)
    assert (index["written"], index["kept"], index["fetched"]) == (3, 0, 7)
    samples = read_dataset(f"wds:{out}")
    assert [s.text for s in samples] == ["a red square", "a coco photo", "the same url again", "a big photo", "500 then fine"]
    assert [s.group for s in samples] == [server.url(p) for p in ("/good.png", "/photo.jpg", "/good.png", "/big.png", "/flaky.png")]
    assert image_bytes(samples[1].image) == photo.read_bytes() and image_bytes(samples[0].image) == server.files["/good.png"]
    resized = Image.open(io.BytesIO(image_bytes(samples[3].image)))
    assert (resized.format, resized.size) == ("JPEG", (512, 384)) and samples[3].image.name.endswith(".jpg")
    assert samples[0].image is samples[2].image  # one record: the URL fetched once for both captions

    failures = {f["row"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert {r: f["reason"].split(" (")[0] for r, f in failures.items()} == {
        3: "image URL failed: HTTP 404", 4: "image URL failed: timed out after 3 tries",
        6: "image URL failed: not an image", 8: "empty caption"}
    assert all(f["url"] == server.url(rows[r][0]) and f["source"] == f"{path} row {r}" for r, f in failures.items())
    assert index["skipped"] == 4 and index["skipped_by_reason"]["image URL failed: HTTP 404"] == 1
    assert json.loads((out / "index.json").read_text())["samples"] == 5
    assert server.hits == {"/good.png": 1, "/photo.jpg": 1, "/missing.png": 1, "/slow.png": 3, "/big.png": 1,
                           "/corrupt.png": 1, "/flaky.png": 2}

    before = dict(server.hits)
    again = download_shards(f"parquet:{path}", out, shard_size=3, image_size=512)
    assert (again["written"], again["fetched"]) == (0, 0) and server.hits == before  # nothing fetched again

    (out / "shard-000001.tar").unlink()  # as if the run had been killed while fetching shard 1
    download_shards(f"parquet:{path}", out, shard_size=3, image_size=512)
    assert server.hits - Counter(before) == Counter({"/missing.png": 1, "/slow.png": 3, "/big.png": 1})  # shard 1's URLs only
    assert [s.text for s in read_dataset(f"wds:{out}")] == [s.text for s in samples]

    def bare(ss):
        return [dataclasses.replace(s, image=None) for s in ss]

    assert bare(samples) == bare(read_dataset(f"parquet:{path}"))  # the samples parquet: reads, images aside
    with pytest.raises(DataError, match="other settings .*image_size"):
        download_shards(f"parquet:{path}", out, shard_size=3, image_size=256)


@pytest.mark.parametrize("hosts", [4, 1])
def test_download_offline_is_a_clear_error_at_once(tmp_path, monkeypatch, hosts):
    from edge_glass.cli import main

    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_TRIES", "2")
    monkeypatch.setenv("EDGE_GLASS_DOWNLOAD_BACKOFF", "0.05")
    ports = [dead_port() for _ in range(hosts)]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": [f"http://127.0.0.1:{ports[i % hosts]}/{i}.jpg" for i in range(12)],
                             "caption": [f"photo {i}" for i in range(12)]}), path)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no image host could be reached \(offline\?\); shard 0 was not written"):
        download_shards(f"parquet:{path}", tmp_path / "out", shard_size=6)
    assert time.monotonic() - start < 10
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "index.json").exists()
    assert main(["download", f"parquet:{path}", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
