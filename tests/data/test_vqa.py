"""QA readers on the real files: easy-VQA (pip easy-vqa), coco1k VQA yes/no JSONL, COCO captions
as QA; bad rows are skipped and counted with their source."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from edge_glass.data.qa import qa_splits
from edge_glass.data.vqa import (
    DESCRIBE,
    QASample,
    captions_as_qa,
    easy_vqa_answers,
    easy_vqa_dir,
    read_coco_captions_qa,
    read_easy_vqa,
    read_qa_jsonl,
)
from edge_glass.errors import DataError
from edge_glass.paths import data_root


@pytest.fixture(scope="module")
def coco1k() -> Path:
    root = data_root() / "coco1k"
    if not (root / "vqa_yesno.jsonl").is_file():
        pytest.skip(f"coco1k data not found under {data_root()} (set EDGE_GLASS_DATA)")
    return root


@pytest.fixture(scope="module")
def easy_vqa():
    try:
        easy_vqa_dir()
    except DataError as exc:
        pytest.skip(str(exc))
    return read_easy_vqa()


def test_easy_vqa_official_split_sizes_and_answers(easy_vqa):
    samples, skipped = easy_vqa
    assert skipped == []
    counts = Counter(s.split for s in samples)
    assert counts == {"train": 38575, "test": 9673}  # the package README's numbers
    answers = easy_vqa_answers()
    assert len(answers) == 13 and {"yes", "no", "circle", "teal"} <= set(answers)
    assert {s.answer for s in samples} == set(answers)
    first = samples[0]
    assert (first.question, first.answer, first.split) == ("what is the blue shape?", "rectangle", "train")
    assert Path(first.image).is_absolute() and first.image.endswith("train/images/0.png") and Path(first.image).is_file()
    assert len(read_easy_vqa("test")[0]) == 9673


def test_easy_vqa_missing_images_are_skipped_with_the_row(tmp_path, easy_vqa):
    root = tmp_path / "data"
    (root / "test" / "images").mkdir(parents=True)
    (root / "answers.txt").write_text("yes\nno\n")
    (root / "test" / "images" / "0.png").write_bytes(b"png")
    (root / "test" / "questions.json").write_text(json.dumps(
        [["is it red?", "yes", 0], ["is it blue?", "no", 1], ["", "no", 0], "junk"]))
    samples, skipped = read_easy_vqa("test", root=root)
    assert [s.question for s in samples] == ["is it red?"]
    assert [(s.source, s.reason.split(" (")[0]) for s in skipped] == [
        ("easy_vqa/test/questions.json[1]", "image not found"),
        ("easy_vqa/test/questions.json[2]", "empty question"),
        ("easy_vqa/test/questions.json[3]", "row is not [question, answer, image_id]"),
    ]
    with pytest.raises(DataError, match="split 'dev'"):
        read_easy_vqa("dev", root=root)


def test_coco1k_yesno_jsonl_resolves_images_and_keeps_splits(coco1k):
    samples, skipped = read_qa_jsonl(coco1k / "vqa_yesno.jsonl")
    assert skipped == [] and len(samples) == 1464
    assert Counter(s.split for s in samples) == {"train": 964, "dev": 260, "test": 240}
    assert {s.answer for s in samples} == {"yes", "no"}
    assert all(Path(s.image).is_file() and Path(s.image).parent == (coco1k / "images").resolve() for s in samples)
    assert samples[0].source == "vqa_yesno.jsonl:1"
    assert len(read_qa_jsonl(coco1k / "vqa_yesno.jsonl", split="dev")[0]) == 260
    assert len(read_qa_jsonl("coco1k/vqa_yesno.jsonl")[0]) == 1464  # relative to the data root


def test_given_splits_are_kept_per_question_and_hashed_splits_never_share_an_image(coco1k):
    samples, _ = read_qa_jsonl(coco1k / "vqa_yesno.jsonl")
    # vqa_yesno splits questions: some photos carry train and test questions; the split is honoured
    assert Counter(qa_splits(samples, 20, 40, seed=0)) == {"train": 964, "val": 260, "test": 240}
    unsplit = [replace(s, split=None) for s in samples]
    where = qa_splits(unsplit, 20, 40, seed=0)
    images = {name: {s.image for s, w in zip(unsplit, where) if w == name} for name in ("train", "val", "test")}
    assert (len(images["val"]), len(images["test"])) == (20, 40)
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])


def test_jsonl_bad_rows_are_skipped_and_counted(tmp_path, coco1k):
    image = next((coco1k / "images").iterdir())
    rows = [
        json.dumps({"image": image.name, "question": "Is it a cat?", "answer": "no"}),  # found via image_root
        json.dumps({"image": str(image), "question": "  How many?  ", "answer": 2, "split": "dev"}),
        json.dumps({"image": "missing.jpg", "question": "q?", "answer": "a"}),
        json.dumps({"image": str(image), "question": "   ", "answer": "a"}),
        json.dumps({"image": str(image), "question": "q?", "answer": ["a", "b"]}),
        json.dumps({"question": "q?", "answer": "a"}),
        "{not json",
        "[1, 2]",
        "",
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(rows) + "\n")
    samples, skipped = read_qa_jsonl(path, image_root=coco1k / "images")
    assert samples == [
        QASample(str(image.resolve()), "Is it a cat?", "no", "train", "qa.jsonl:1"),
        QASample(str(image.resolve()), "How many?", "2", "dev", "qa.jsonl:2"),
    ]
    assert [(s.source, s.reason.split(" (")[0]) for s in skipped] == [
        ("qa.jsonl:3", "image not found"), ("qa.jsonl:4", "empty question"), ("qa.jsonl:5", "empty answer"),
        ("qa.jsonl:6", "no image path"), ("qa.jsonl:7", "invalid JSON"), ("qa.jsonl:8", "line is not a JSON object"),
    ]
    with pytest.raises(DataError, match="not found"):
        read_qa_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_line_that_is_not_utf8_is_skipped_and_the_rest_kept(tmp_path, coco1k):
    image = next((coco1k / "images").iterdir())
    good = [json.dumps({"image": str(image), "question": q, "answer": "yes"}, ensure_ascii=False).encode()
            for q in ("Is it caf\u00e9?", "Is it red?")]
    bad = b'{"image": "x.jpg", "question": "caf\xe9?", "answer": "no"}'  # Latin-1, not UTF-8
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\r\n".join([good[0], bad, good[1]]) + b"\r\n")
    samples, skipped = read_qa_jsonl(path)
    assert [(s.question, s.source) for s in samples] == [("Is it caf\u00e9?", "qa.jsonl:1"), ("Is it red?", "qa.jsonl:3")]
    assert [(s.source, s.reason) for s in skipped] == [("qa.jsonl:2", f"not UTF-8 (byte 0xe9 at byte {bad.index(0xe9) + 1} of the line)")]
    assert "caf\\xe9" in skipped[0].input


def test_coco_captions_become_describe_questions(coco1k):
    samples, skipped = read_coco_captions_qa(coco1k / "captions.json")
    assert skipped == [] and len(samples) == 5069
    assert all(s.question == DESCRIBE and s.answer == s.answer.strip() and s.answer for s in samples)
    assert len({s.image for s in samples}) == 1013 and all(Path(s.image).is_file() for s in samples[:50])
    assert samples[0].source.startswith("captions.json annotation ")


def test_caption_pairs_accept_tuples_and_sample_objects(tmp_path, coco1k):
    from edge_glass.data.samples import Sample

    image = str(next((coco1k / "images").iterdir()))
    pairs = [(image, "A dog.  "), (image, "", "row 2"), (str(tmp_path / "gone.jpg"), "A cat."),
             Sample(group="g", source="flickr line 9", image=image, text="Two birds")]
    samples, skipped = captions_as_qa(pairs, split="dev")
    assert [(s.answer, s.split, s.source) for s in samples] == [("A dog.", "dev", "captions[0]"), ("Two birds", "dev", "flickr line 9")]
    assert [(s.source, s.reason.split(" (")[0]) for s in skipped] == [("row 2", "empty answer"), ("captions[2]", "image not found")]
