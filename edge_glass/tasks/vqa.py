"""The vlm task: answer questions about images with a decoder on frozen visual tokens.

Data: QA specs (edge_glass/data/qa.py) read, split by image (a dataset's own splits honoured,
e.g. easy-VQA's test set or vqa_yesno's dev/test), images encoded once into the feature cache.
Loss: next-token cross-entropy on the answer tokens only. Evaluation: answers generated token by
token (never teacher-forced), exact match and token F1, the majority-answer baseline, how many
distinct answers the model gives, and sample predictions.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.qa import SPLIT_NAMES, QAData, build_qa_data, qa_splits, read_qa, split_group
from ..decoders import DECODERS
from ..decoders.fusion import DECODER_FUSIONS
from ..data.vqa import DESCRIBE, QASample
from ..decoders.prompt import WordTokenizer, collate
from ..encoders import ENCODERS
from ..errors import EdgeGlassError
from ..eval.qa import qa_metrics
from ..models.vlm import VLM, AlignedVision, VisionProjector
from ..runs import RunDir
from ..train.data import feature_cache_dir
from . import Task

WORD_DECODERS = ("tiny", "trm")  # decoders trained from scratch on a word-level vocabulary


def vision_source(cfg: Any):
    """(frozen image encoder, aligned head or None) of a vlm config."""
    if cfg.vision.aligned_run:
        from ..api import load

        aligned = load(cfg.vision.aligned_run)
        return aligned.encoders["image"], AlignedVision(aligned.core.heads["image"])
    return ENCODERS.build(cfg.vision.encoder), None


def build_vlm(cfg: Any, tokenizer: WordTokenizer | None, vision: tuple | None = None) -> VLM:
    """The trainable model of a vlm config; ``vision`` = vision_source(cfg) if already built."""
    encoder, aligned = vision or vision_source(cfg)
    decoder = DECODERS.build(cfg.decoder, tokenizer) if cfg.decoder.type in WORD_DECODERS else DECODERS.build(cfg.decoder)
    fusion = DECODER_FUSIONS.build(cfg.fusion, decoder.d_model, len(decoder.blocks()))
    projector = None
    if fusion.uses_image:
        in_dim = aligned.out_dim if aligned is not None else encoder.token_dim
        projector = VisionProjector(cfg.projector, in_dim, decoder.d_model)
    return VLM(decoder, fusion, projector, aligned)


def load_weights(core: VLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a run's trainable state; everything missing must be frozen (a LoRA run's base LM)."""
    missing, unexpected = core.load_state_dict(state, strict=False)
    frozen = {n for n, p in core.named_parameters() if not p.requires_grad} | {n for n, _ in core.named_buffers()}
    if unexpected or set(missing) - frozen:
        raise EdgeGlassError(f"{where}: weights do not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")


def qa_results(core: VLM, data: QAData, batch_size: int, max_new_tokens: int, samples: int, majority: str | None) -> dict[str, Any]:
    preds: list[str] = []
    for s in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(s, min(s + batch_size, len(data))))
        preds += core.answer(batch.features if core.fusion.uses_image else None, batch.questions, max_new_tokens)
    refs = [s.answer for s in data.samples]
    result: dict[str, Any] = qa_metrics(preds, refs)
    result["distinct_answers"] = len(set(preds))
    if majority is not None:
        result["majority_answer"] = majority
        result["majority_exact_match"] = qa_metrics([majority] * len(refs), refs)["exact_match"]
    result["predictions"] = [{"image": s.image, "question": s.question, "answer": s.answer, "prediction": p}
                             for s, p in zip(data.samples[:samples], preds[:samples])]
    return result


def first_per_split(samples: list[QASample], n: int | None) -> list[QASample]:
    """The first n samples of each split the dataset defines (data.max_samples)."""
    if n is None:
        return samples
    out, count = [], Counter()
    for s in samples:
        count[s.split] += 1
        if count[s.split] <= n:
            out.append(s)
    return out


def format_qa(result: dict[str, Any], title: str) -> str:
    lines = [title, f"exact match {result['exact_match']:.2f}   F1 {result['f1']:.2f}   n {result['n']}   distinct answers {result['distinct_answers']}"]
    if "majority_answer" in result:
        lines.append(f"majority answer {result['majority_answer']!r}: exact match {result['majority_exact_match']:.2f}")
    for p in result.get("predictions", [])[:5]:
        lines.append(f"  Q: {p['question']}  A: {p['answer']}  predicted: {p['prediction']}")
    return "\n".join(lines)


class VQATask(Task):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.tokenizer: WordTokenizer | None = None
        self.majority: str | None = None
        self.records = {}

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        return self.cfg.decoder.type == "lm"  # LoRA-frozen parts and the unused lm_head rows

    def load(self, report, progress: bool) -> dict[str, Any]:
        cfg = self.cfg
        encoder, _ = vision_source(cfg)
        samples, extra = [], {}
        for spec in cfg.data.train:
            samples += first_per_split(read_qa(spec, report), cfg.data.max_samples)
        for spec in cfg.data.eval:
            extra[spec] = first_per_split(read_qa(spec, report), cfg.data.max_samples)
        everything = samples + [s for part in extra.values() for s in part]
        data = build_qa_data(everything, encoder, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)

        def part(members: list) -> QAData:
            ids = {id(s) for s in members}
            return data.select([i for i, s in enumerate(data.samples) if id(s) in ids])

        train_part = part(samples)
        where = qa_splits(train_part.samples, cfg.data.val, cfg.data.test, cfg.data.seed)
        out = {name: train_part.select([i for i, w in enumerate(where) if w == name]) for name in ("train", "val", "test")}
        out.update({f"eval:{spec}": part(members) for spec, members in extra.items()})
        answers = Counter(s.answer for s in out["train"].samples)
        self.majority = answers.most_common(1)[0][0] if answers else None
        if cfg.decoder.type in WORD_DECODERS:
            self.tokenizer = WordTokenizer.build(t for s in out["train"].samples for t in (s.question, s.answer))
        self.records = {"split.json": {name: sorted({split_group(s) for s in d.samples}) for name, d in out.items() if name in ("val", "test")},
                        "encoders.json": {"image": encoder.fingerprint()}, "qa.json": {"majority_answer": self.majority}}
        for name, d in out.items():
            report.kept[name] += len(d)
        return out

    def build(self) -> nn.Module:
        return build_vlm(self.cfg, self.tokenizer)

    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        prompt = core.decoder.prompt
        enc = collate([prompt.encode(q, a) for q, a in zip(batch.questions, batch.answers)], prompt.pad_id)
        device = next(core.decoder.parameters()).device
        feats = batch.features.to(device) if core.fusion.uses_image else None
        out = model(feats, enc["input_ids"].to(device), enc["attention_mask"].to(device), enc["labels"].to(device))
        return out.loss, out.metrics

    def evaluate(self, core: nn.Module, data: Any, limit: int | None = None) -> dict[str, Any]:
        if limit is not None and len(data) > limit:
            data = data.select(list(range(limit)))
        e = self.cfg.eval
        result = qa_results(core, data, e.batch_size, e.max_new_tokens, e.samples, self.majority)
        result["trainable_parameters"] = sum(p.numel() for p in core.parameters() if p.requires_grad)
        return result

    def score(self, result: dict[str, Any]) -> float:
        return result["exact_match"] + result["f1"]

    def table(self, result: dict[str, Any], title: str) -> str:
        return format_qa(result, title)

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        return core.trainable_state()

    def save_files(self, run) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(run.file("tokenizer.json"))


# --- a trained run, from Python and the CLI ------------------------------------------------------

class VisionLanguageModel(nn.Module):
    """A trained vlm run: frozen vision encoder -> (aligned head) -> projector -> decoder."""

    def __init__(self, cfg: Any, encoder, core: VLM, majority: str | None = None, run_dir: Path | None = None):
        super().__init__()
        self.cfg, self.encoder, self.core, self.majority, self.run_dir = cfg, encoder, core.eval(), majority, run_dir

    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Paths/bytes/PIL images and one question each -> generated answers."""
        if len(images) != len(questions):
            raise EdgeGlassError(f"answer: {len(images)} images but {len(questions)} questions")
        feats = self.encoder.encode(list(images)) if self.core.fusion.uses_image else None
        return self.core.answer(feats, list(questions), max_new_tokens or self.cfg.eval.max_new_tokens)

    def describe(self, images: Sequence[Any]) -> list[str]:
        return self.answer(images, [DESCRIBE] * len(images))


def load_vlm(run: RunDir) -> VisionLanguageModel:
    cfg = run.read_config()
    tok_file = run.file("tokenizer.json")
    tokenizer = WordTokenizer.load(tok_file) if tok_file.exists() else None
    vision = vision_source(cfg)
    core = build_vlm(cfg, tokenizer, vision)
    load_weights(core, run.load_weights(), str(run.path))
    majority = run.read_json("qa.json").get("majority_answer") if run.file("qa.json").exists() else None
    return VisionLanguageModel(cfg, vision[0], core, majority, run.path)


def evaluate_vlm(model: VisionLanguageModel, spec: str | None, report, progress: bool = True) -> dict[str, Any]:
    """EM / F1 on a QA spec (its own test split when it names one), or on the run's own test split
    (split.json) without one."""
    cfg = model.cfg
    if spec:  # a dataset that names its test split is evaluated on that split only, as for retrieval
        samples = read_qa(spec, report)
        test = [s for s in samples if SPLIT_NAMES.get(s.split or "") == "test"]
        samples = test or samples
    else:
        test = set(RunDir(model.run_dir).read_json("split.json").get("test", []))
        samples = [s for sp in cfg.data.train for s in first_per_split(read_qa(sp, report), cfg.data.max_samples) if split_group(s) in test]
        if not samples:
            raise EdgeGlassError(f"{model.run_dir}: its test split is empty; pass --data")
    data = build_qa_data(samples, model.encoder, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)
    e = cfg.eval
    return qa_results(model.core, data, e.batch_size, e.max_new_tokens, e.samples, model.majority)
