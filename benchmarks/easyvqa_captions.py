"""Write a cross-dataset retrieval set from easy-VQA's test images: captions "a <color> <shape>"
derived from the official questions/answers (pip package easy-vqa).

    python benchmarks/easyvqa_captions.py --out /tmp/easyvqa_captions.jsonl
    edge-glass eval RUN --data jsonl:/tmp/easyvqa_captions.jsonl
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path


def captions(split: str = "test") -> list[dict]:
    root = Path(importlib.util.find_spec("easy_vqa").submodule_search_locations[0]) / "data" / split
    shape, color = {}, {}
    for question, answer, image in json.loads((root / "questions.json").read_text()):
        if m := re.fullmatch(r"what is the colou?r of the (circle|rectangle|triangle)\?", question):
            shape[image], color[image] = m.group(1), answer
        elif m := re.fullmatch(r"what is the (\w+) shape\?", question):
            color[image], shape[image] = m.group(1), answer
    return [{"image": str(root / "images" / f"{i}.png"), "text": f"a {color[i]} {shape[i]}"} for i in sorted(shape) if i in color]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    rows = captions(args.split)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} image-caption pairs ({len({r['text'] for r in rows})} distinct captions) to {args.out}")


if __name__ == "__main__":
    main()
