"""Looking at a report page in headless Chromium: broken figures and media, its numbers, a screenshot."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def lookup(obj: Any, key: str) -> Any:
    for part in key.split("/"):
        obj = obj[part]
    return obj


def open_page(browser, html: Path, screenshot: Path) -> dict[str, Any]:
    """Load the page from disk (file://, no server), wait for every image and audio element, save
    a full-page screenshot; returns what the page shows."""
    browser.get(html.resolve().as_uri())
    deadline = time.time() + 30
    while time.time() < deadline:
        state = browser.execute_script(
            "return {images: Array.from(document.images).every(i => i.complete),"
            " audio: Array.from(document.querySelectorAll('audio')).every(a => a.readyState >= 1 || a.error)}")
        if state["images"] and state["audio"]:
            break
        time.sleep(0.2)
    info = browser.execute_script("""
        const imgs = Array.from(document.images);
        return {
          images: imgs.length,
          broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
          figures: Array.from(document.querySelectorAll('img[data-figure]')).map(i => [i.dataset.figure, i.naturalWidth, i.naturalHeight]),
          audio: Array.from(document.querySelectorAll('audio')).map(a => [a.title, a.readyState, a.duration, a.error ? a.error.code : 0]),
          numbers: Array.from(document.querySelectorAll('[data-key]')).map(e => [e.dataset.file, e.dataset.key, e.textContent.trim()]),
          external: Array.from(document.querySelectorAll('[src]')).map(e => e.getAttribute('src')).filter(s => !s.startsWith('data:')),
          overflow: document.documentElement.scrollWidth > window.innerWidth + 1,
          height: document.documentElement.scrollHeight,
          text: document.body.innerText,
        };""")
    browser.set_window_size(1280, min(int(info["height"]) + 40, 12000))
    browser.save_screenshot(str(screenshot))
    browser.set_window_size(1280, 900)
    info["dir"] = html.parent
    return info


def check_page(info: dict[str, Any], run_dir: Path) -> int:
    """No broken figure or clip, nothing fetched from elsewhere, and every marked number equals the
    run's evaluation JSON (rounded as shown). Returns how many numbers were checked."""
    assert info["images"] > 0 and not info["broken"], info["broken"]
    assert all(w > 0 and h > 0 for _, w, h in info["figures"]), info["figures"]
    # nothing from a server or the internet: data: URIs, or files beside the page (audio clips)
    assert all(":" not in src and not src.startswith("/") and (info["dir"] / src).is_file() for src in info["external"]), info["external"]
    assert all(state >= 1 and duration > 0 and not err for _, state, duration, err in info["audio"]), info["audio"]
    files: dict[str, Any] = {}
    for file, key, text in info["numbers"]:
        data = files.setdefault(file, json.loads((run_dir / file).read_text()))
        value = lookup(data, key)
        shown = float(text.replace(",", ""))
        digits = len(text.split(".")[1]) if "." in text else 0
        assert abs(shown - float(value)) <= 0.5 * 10 ** -digits + 1e-9, (file, key, text, value)
    return len(info["numbers"])
