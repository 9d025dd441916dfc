"""The vlm task: answer questions about images with a decoder on frozen visual tokens.

Data: QA specs (edge_glass/data/qa.py) read and split per dataset (a dataset's own splits
honoured, e.g. easy-VQA's test set or vqa_yesno's dev/test; the rest hashed by image, and an
image one dataset holds out is held out by the hashed datasets too), images encoded once into
the feature cache. Vision: a frozen backbone, or an alignment run's frozen encoder + image head
(``vision.aligned_run``). Loss: next-token cross-entropy on the answer tokens only. Evaluation:
answers generated token by token (never teacher-forced), exact match and token F1, the
majority-answer baseline, how many distinct answers the model gives, and sample predictions.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.qa import SPLIT_NAMES, qa_splits, read_qa, split_group
from ..data.samples import DataReport
from ..data.vqa import QASample
from ..decoders import DECODERS
from ..decoders.fusion import DECODER_FUSIONS
from ..decoders.prompt import WordTokenizer, collate
from ..encoders import ENCODERS
from ..errors import EdgeGlassError
from ..eval.qa import qa_metrics
from ..features.cache import feature_cache_dir
from ..features.qa import QAData, build_qa_data
from ..models.vlm import VLM, AlignedVision, VisionLanguageModel, VisionProjector
from ..runs import RunDir
from .alignment import AlignmentTask
from .base import Task, count_parameters, register_task

WORD_DECODERS = ("tiny", "trm")  # decoders trained from scratch on a word-level vocabulary


# --- model ---------------------------------------------------------------------------------------

def vision_source(cfg: Any, device: torch.device | str = "cpu"):
    """(frozen image encoder, aligned head or None) of a vlm config, on ``device``."""
    v = cfg.vision
    if v.aligned_run:
        aligned = AlignmentTask.load_run(RunDir(v.aligned_run), device)
        if "image" not in aligned.encoders:
            raise EdgeGlassError(f"vision.aligned_run: {v.aligned_run} has no image encoder (it has {', '.join(aligned.encoders)})")
        return aligned.encoders["image"], AlignedVision(aligned.core.heads["image"], v.aligned_output, v.aligned_dim)
    return ENCODERS.build(v.encoder).to(device), None


def build_vlm(cfg: Any, tokenizer: WordTokenizer | None, vision: tuple) -> VLM:
    """The trainable model of a vlm config; ``vision`` = vision_source(cfg)."""
    encoder, aligned = vision
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
    frozen = {n for n, p in core.named_parameters(remove_duplicate=False) if not p.requires_grad} | {n for n, _ in core.named_buffers()}  # tied weights under every name
    if unexpected or set(missing) - frozen:
        raise EdgeGlassError(f"{where}: weights do not fit the model (missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")


# --- data ----------------------------------------------------------------------------------------

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


def split_per_dataset(parts: dict[str, list[QASample]], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """{spec: split of each of its samples}. Each dataset is split on its own (its given splits
    honoured, the rest hashed by image); then, in a dataset that gives no val/test split of its
    own, a training sample whose image another dataset holds out follows it there (test before
    val), so no held-out image is trained on through a second dataset (captions of a VQA test
    photo, say). Datasets with their own splits keep them as they are."""
    where = {spec: qa_splits(samples, val, test, seed) for spec, samples in parts.items()}
    held: dict[str, str] = {}
    for spec, samples in parts.items():
        for s, w in zip(samples, where[spec]):
            if w == "test" or (w == "val" and s.image not in held):
                held[s.image] = w
    for spec, samples in parts.items():
        hashed = not any(SPLIT_NAMES.get(s.split) for s in samples)  # the dataset gives no val/test of its own
        if hashed and len(parts) > 1:
            where[spec] = [held.get(s.image, w) if w == "train" else w for s, w in zip(samples, where[spec])]
    return where


def qa_results(core: VLM, data: QAData, batch_size: int, max_new_tokens: int, samples: int, majority: str | None,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    """EM / F1 of generated answers. ``details`` (a dict) receives every sample's prediction under
    "predictions", each with "halt_steps" (supervision steps per generated token) for a TRM decoder."""
    preds: list[str] = []
    halt: list[list[int]] = []
    trace = details is not None and hasattr(core.decoder, "step_trace")
    for s in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(s, min(s + batch_size, len(data))))
        if trace:
            core.decoder.step_trace = []
        try:
            preds += core.answer(batch.features if core.fusion.uses_image else None, batch.questions, max_new_tokens)
            if trace:
                halt += torch.stack(core.decoder.step_trace, 1).tolist() if core.decoder.step_trace else [[] for _ in batch.questions]
        finally:
            if trace:
                core.decoder.step_trace = None
    refs = [s.answer for s in data.samples]
    if details is not None:
        details["predictions"] = [{"image": s.image, "question": s.question, "answer": s.answer, "prediction": p, "source": s.source,
                                   **({"halt_steps": h} if trace else {})} for s, p, h in zip(data.samples, preds, halt or [None] * len(preds))]
    result: dict[str, Any] = qa_metrics(preds, refs)
    result["distinct_answers"] = len(set(preds))
    if majority is not None:
        result["majority_answer"] = majority
        result["majority_exact_match"] = qa_metrics([majority] * len(refs), refs)["exact_match"]
    result["predictions"] = [{"image": s.image, "question": s.question, "answer": s.answer, "prediction": p}
                             for s, p in zip(data.samples[:samples], preds[:samples])]
    return result


def format_qa(result: dict[str, Any], title: str) -> str:
    lines = [title, f"exact match {result['exact_match']:.2f}   F1 {result['f1']:.2f}   n {result['n']}   distinct answers {result['distinct_answers']}"]
    if "majority_answer" in result:
        lines.append(f"majority answer {result['majority_answer']!r}: exact match {result['majority_exact_match']:.2f}")
    for p in result.get("predictions", [])[:5]:
        lines.append(f"  Q: {p['question']}  A: {p['answer']}  predicted: {p['prediction']}")
    return "\n".join(lines)


def compare_qa(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'variant':<24}{'EM':>8}{'F1':>8}{'distinct':>10}{'trainable':>12}"]
    for name, r in results.items():
        if r:
            lines.append(f"{name:<24}{r['exact_match']:>8.2f}{r['f1']:>8.2f}{r['distinct_answers']:>10}{r.get('trainable_parameters', 0):>12,}")
    return "\n".join(lines)


@register_task
class VLMTask(Task):
    name = "vlm"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.tokenizer: WordTokenizer | None = None
        self.majority: str | None = None
        self._vision: tuple | None = None

    @property
    def vision(self) -> tuple:
        if self._vision is None:
            self._vision = vision_source(self.cfg, self.device)
        return self._vision

    @classmethod
    def find_unused_parameters(cls, cfg: Any) -> bool:
        return cfg.decoder.type == "lm"  # LoRA-frozen parts and the unused lm_head rows

    # -- training
    def load(self, report, progress: bool) -> dict[str, Any]:
        cfg = self.cfg
        encoder = self.vision[0]
        parts = {spec: first_per_split(read_qa(spec, report), cfg.data.max_samples) for spec in cfg.data.train}
        extra = {spec: first_per_split(read_qa(spec, report), cfg.data.max_samples) for spec in cfg.data.eval}
        where = split_per_dataset(parts, cfg.data.val, cfg.data.test, cfg.data.seed)
        everything = [s for p in parts.values() for s in p] + [s for p in extra.values() for s in p]
        data = build_qa_data(everything, encoder, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)
        split_of = {id(s): w for spec, p in parts.items() for s, w in zip(p, where[spec])}
        spec_of = {id(s): spec for spec, p in parts.items() for s in p}

        def members(keep) -> QAData:
            return data.select([i for i, s in enumerate(data.samples) if keep(s)])

        out = {name: members(lambda s, n=name: split_of.get(id(s)) == n) for name in ("train", "val", "test")}
        for spec, p in extra.items():
            ids = {id(s) for s in p}
            out[f"eval:{spec}"] = members(lambda s, ids=ids: id(s) in ids)
        answers = Counter(s.answer for s in out["train"].samples)
        self.majority = answers.most_common(1)[0][0] if answers else None
        if cfg.decoder.type in WORD_DECODERS:
            self.tokenizer = WordTokenizer.build(t for s in out["train"].samples for t in (s.question, s.answer))
        split_record = {spec: {name: sorted({split_group(s) for s in out[name].samples if spec_of[id(s)] == spec}) for name in ("val", "test")}
                        for spec in parts}
        self.records = {"split.json": split_record, "encoders.json": {"image": encoder.fingerprint()}, "qa.json": {"majority_answer": self.majority}}
        for name, d in out.items():
            report.kept[name] += len(d)
        return out

    def build(self) -> nn.Module:
        return build_vlm(self.cfg, self.tokenizer, self.vision)

    def loss(self, model: nn.Module, core: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        prompt = core.decoder.prompt
        enc = collate([prompt.encode(q, a) for q, a in zip(batch.questions, batch.answers)], prompt.pad_id)
        device = core.device
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

    def state_to_save(self, core: nn.Module) -> dict[str, torch.Tensor]:
        return core.trainable_state()

    def save_files(self, run) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(run.file("tokenizer.json"))

    # -- a trained run
    @classmethod
    def load_run(cls, run: RunDir, device: torch.device | str = "cpu") -> VisionLanguageModel:
        cfg = run.read_config()
        tok_file = run.file("tokenizer.json")
        tokenizer = WordTokenizer.load(tok_file) if tok_file.exists() else None
        vision = vision_source(cfg, device)
        core = build_vlm(cfg, tokenizer, vision)
        load_weights(core, run.load_weights(), str(run.file("model.safetensors")))
        majority = run.read_json("qa.json").get("majority_answer") if run.file("qa.json").exists() else None
        return VisionLanguageModel(cfg, vision[0], core, majority, run.path).to(device)

    def evaluate_run(self, model: VisionLanguageModel, spec: str | None, report, progress: bool = True,
                     details: dict[str, Any] | None = None) -> dict[str, Any]:
        """EM / F1 on a QA spec (its own test split when it names one), or on the run's own test
        split (split.json) without one. ``details`` (a dict) receives every sample's prediction
        (see qa_results)."""
        cfg = model.cfg
        if spec:
            samples = read_qa(spec, report)
            samples = [s for s in samples if SPLIT_NAMES.get(s.split or "") == "test"] or samples
        else:
            record = RunDir(model.run_dir).read_json("split.json")
            samples = []
            for sp in cfg.data.train:
                test = set(record["test"] if isinstance(record.get("test"), list) else record.get(sp, {}).get("test", []))  # runs before 0.2: one list
                samples += [s for s in first_per_split(read_qa(sp, report), cfg.data.max_samples) if split_group(s) in test]
            if not samples:
                raise EdgeGlassError(f"{model.run_dir}: its test split is empty; pass --data")
        data = build_qa_data(samples, model.encoder, report, feature_cache_dir(cfg), cfg.cache.dtype, progress)
        e = cfg.eval
        return qa_results(model.core, data, e.batch_size, e.max_new_tokens, e.samples, model.majority, details)

    def parameter_rows(self, run_dir=None) -> list[tuple[str, int, int]]:
        cfg = self.cfg
        if cfg.decoder.type in WORD_DECODERS:  # the vocabulary comes from the training questions
            self.tokenizer = WordTokenizer.load(Path(run_dir) / "tokenizer.json") if run_dir else WordTokenizer.build(
                t for spec in cfg.data.train for s in read_qa(spec, DataReport()) for t in (s.question, s.answer))
        encoder, aligned = self.vision
        core = self.build()
        rows = [count_parameters(f"vision.encoder ({encoder.cfg.type}, frozen)", encoder.ensure_loaded())]
        if aligned is not None:
            rows.append(count_parameters("vision.aligned_head (frozen)", aligned))
        return rows + [count_parameters("projector", core.projector), count_parameters(f"fusion ({cfg.fusion.type})", core.fusion),
                       count_parameters(f"decoder ({cfg.decoder.type})", core.decoder)]

    # -- results
    def table(self, result: dict[str, Any], title: str) -> str:
        return format_qa(result, title)

    def compare(self, results: dict[str, dict[str, Any]]) -> str:
        return compare_qa(results)
