"""Evaluation of an NL-MM network on an NLMMData, per dataset (the spec that prefixes a group):

    retrieval     Recall@K both ways for every modality pair the dataset has (image-text, audio-text,
                  image-audio), at every Matryoshka dim; the gallery is every distinct item (all five
                  captions of a photo, each distinct clip), a query's positives every item it is paired with
    captions      (samples with an image and a text) captions generated greedily from the image's memory,
                  never teacher-forced: token F1 / exact match against the best reference of the image,
                  BLEU-1..4 and CIDEr (pycocoevalcap's COCO scorers, lower-cased word tokens)
    transcripts   (samples with audio and text and no image) transcripts generated from the audio's memory:
                  token F1, exact match, word error rate
    digits        (FSDD clips) spoken-digit accuracy from audio alone: closed set, each clip against the
                  embeddings of the texts "zero".."nine"; and the generated transcript's exact match

Test-time training (``adapt``): "sequence" adapts online within each sequence (as trained); "none"
sets the adapters' inner learning rate to 0; "stream" carries each adapter's fast weight across the
evaluated items in order (one item at a time), e.g. across the clips of a voice never heard in training.
The mode applies to the image and audio encoders (the inputs whose distribution shifts); texts are
always adapted per sequence, as trained.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Sequence

import torch

from ..data.fsdd import DIGIT_WORDS, parse_recording
from ..decoders.prompt import WordTokenizer
from ..eval.qa import qa_metrics, word_error_rate
from ..eval.retrieval import recall_at_k
from .data import NLMMData
from .model import NLMM

Tensor = torch.Tensor
ROWS = {"image": "image_rows", "audio": "audio_rows", "text": "text_rows"}
PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))


def dataset_of(group: str) -> str:
    return group.split("|", 1)[0] if "|" in group else "data"


def to(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def adaptation(net: NLMM, mode: str, modalities=None):
    """Within the block the TTT adapters of ``modalities`` (default all) follow ``mode``
    ("sequence" | "none" | "stream"); the others adapt per sequence, as trained."""
    chosen = set(modalities or net.modalities)
    adapters = [enc.ttt for m, enc in net.encoders.items() if enc.ttt is not None and m in chosen]
    saved = [a.eta for a in adapters]
    old = (net.ttt_mode, net.stream_modalities)
    try:
        if mode == "none":
            for a in adapters:
                a.eta = 0.0
        net.ttt_mode, net.stream_modalities = mode, chosen
        net.reset_stream()
        yield
    finally:
        for a, eta in zip(adapters, saved):
            a.eta = eta
        net.ttt_mode, net.stream_modalities = old
        net.reset_stream()


def first_rows(data: NLMMData, modality: str, among: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(distinct store rows of a modality, the first sample index showing each), in order."""
    rows = getattr(data, ROWS[modality])
    idx = torch.arange(len(data)) if among is None else among
    seen: dict[int, int] = {}
    for i in idx.tolist():
        r = int(rows[i])
        if r >= 0 and r not in seen:
            seen[r] = i
    return torch.tensor(list(seen.keys()), dtype=torch.long), torch.tensor(list(seen.values()), dtype=torch.long)


@torch.no_grad()
def embed_samples(net: NLMM, data: NLMMData, modality: str, index: Tensor, batch_size: int) -> dict[int, Tensor]:
    out: dict[int, list[Tensor]] = defaultdict(list)
    for s in range(0, len(index), batch_size):
        batch = to(data.batch(index[s : s + batch_size]), net.device)
        for d, e in net.embeddings(batch, modality).items():
            out[d].append(e.cpu())
    return {d: torch.cat(v) for d, v in out.items()}


def retrieval(net: NLMM, data: NLMMData, a: str, b: str, ks: list[int], batch_size: int) -> dict[str, Any] | None:
    ra, rb = getattr(data, ROWS[a]), getattr(data, ROWS[b])
    both = torch.nonzero((ra >= 0) & (rb >= 0)).flatten()
    if len(both) < 2:
        return None
    rows_a, first_a = first_rows(data, a, both)
    rows_b, first_b = first_rows(data, b, both)
    pos_a = {r: i for i, r in enumerate(rows_a.tolist())}
    pos_b = {r: i for i, r in enumerate(rows_b.tolist())}
    positives = torch.zeros(len(rows_a), len(rows_b), dtype=torch.bool)
    for i in both.tolist():
        positives[pos_a[int(ra[i])], pos_b[int(rb[i])]] = True
    ea, eb = embed_samples(net, data, a, first_a, batch_size), embed_samples(net, data, b, first_b, batch_size)
    dims = {str(d): {f"{a}_to_{b}": recall_at_k(ea[d], eb[d], positives, ks), f"{b}_to_{a}": recall_at_k(eb[d], ea[d], positives.t(), ks)}
            for d in sorted(ea, reverse=True)}
    top = dims[str(max(ea))]
    return {**top, f"n_{a}": len(rows_a), f"n_{b}": len(rows_b), "dims": dims}


@torch.no_grad()
def generate_from(net: NLMM, data: NLMMData, modality: str, index: Tensor, tokenizer: WordTokenizer, batch_size: int,
                  max_new_tokens: int) -> list[str]:
    texts = []
    for s in range(0, len(index), batch_size):
        batch = to(data.batch(index[s : s + batch_size]), net.device)
        streams = net.encode_all(batch, [modality])
        ctx, mask = net.context(streams, [modality])
        for ids in net.generate(ctx, mask, tokenizer.bos_id, tokenizer.eos_id, max_new_tokens):
            texts.append(tokenizer.decode(ids))
    return texts


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr (x100) of predictions against reference lists, on lower-cased word tokens."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:  # pragma: no cover - a core dependency
        return {}
    tok = lambda t: " ".join(WordTokenizer.split(t)) or "<empty>"  # noqa: E731
    res = {i: [tok(p)] for i, p in enumerate(predictions)}
    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{i + 1}": round(100 * b, 2) for i, b in enumerate(bleu)}, "cider": round(100 * float(cider), 2)}


def captions(net: NLMM, data: NLMMData, tokenizer: WordTokenizer, ecfg: Any) -> dict[str, Any] | None:
    ri, rt = data.image_rows, data.text_rows
    both = torch.nonzero((ri >= 0) & (rt >= 0)).flatten()
    if not len(both):
        return None
    rows, first = first_rows(data, "image", both)
    refs: dict[int, list[str]] = defaultdict(list)
    for i in both.tolist():
        refs[int(ri[i])].append(data.samples[i].text or "")
    preds = generate_from(net, data, "image", first, tokenizer, ecfg.batch_size, ecfg.max_new_tokens)
    references = [refs[int(r)] for r in rows]
    out = {**qa_metrics(preds, references), **caption_scores(preds, references), "n_images": len(rows),
           "distinct_captions": len(set(preds))}
    out["samples"] = [{"image": str(data.samples[int(i)].image), "prediction": p, "references": r}
                      for i, p, r in zip(first[: ecfg.samples].tolist(), preds, references)]
    return out


def transcripts(net: NLMM, data: NLMMData, tokenizer: WordTokenizer, ecfg: Any) -> dict[str, Any] | None:
    idx = torch.nonzero((data.audio_rows >= 0) & (data.text_rows >= 0) & (data.image_rows < 0)).flatten()
    if not len(idx):
        return None
    preds = generate_from(net, data, "audio", idx, tokenizer, ecfg.batch_size, ecfg.max_new_tokens)
    refs = [data.samples[i].text or "" for i in idx.tolist()]
    out = {**qa_metrics(preds, refs), **word_error_rate(preds, refs), "n": len(idx)}
    out["samples"] = [{"audio": str(data.samples[i].audio), "prediction": p, "reference": r}
                      for i, p, r in zip(idx[: ecfg.samples].tolist(), preds, refs)]
    return out


@torch.no_grad()
def class_embeddings(net: NLMM, data: NLMMData, tokenizer: WordTokenizer, words: Sequence[str]) -> dict[int, Tensor]:
    """{dim: (len(words), dim) unit rows}: the text embedding of each class name (zero-shot classes)."""
    enc = [[tokenizer.bos_id, *tokenizer.encode(w), tokenizer.eos_id] for w in words]
    L = max(map(len, enc))
    B = len(words)
    batch = {"text": torch.tensor([e + [tokenizer.pad_id] * (L - len(e)) for e in enc]),
             "text_lengths": torch.tensor([len(e) for e in enc]), "text_mask": torch.ones(B, dtype=torch.bool)}
    for m in ("image", "audio"):
        batch[f"{m}_mask"] = torch.zeros(B, dtype=torch.bool)
    if "text" in net.feature_in:  # the text encoder reads a frozen backbone's features of the class names
        batch.update(data.features.encode("text", list(words)))
    return {d: e.cpu() for d, e in net.embeddings(to(batch, net.device), "text").items()}


@torch.no_grad()
def digits(net: NLMM, data: NLMMData, tokenizer: WordTokenizer, ecfg: Any, index: Tensor) -> dict[str, Any] | None:
    recs = [(i, parse_recording(data.samples[i].group)) for i in index.tolist()]
    recs = [(i, r) for i, r in recs if r is not None and data.audio_rows[i] >= 0]
    if not recs:
        return None
    idx = torch.tensor([i for i, _ in recs])
    target = torch.tensor([r.digit for _, r in recs])
    audio = embed_samples(net, data, "audio", idx, ecfg.batch_size)
    classes = class_embeddings(net, data, tokenizer, DIGIT_WORDS)
    d = max(audio)
    pred = (audio[d] @ classes[d].cpu().t()).argmax(1)
    per_speaker: dict[str, list[bool]] = defaultdict(list)
    for (_, r), ok in zip(recs, (pred == target).tolist()):
        per_speaker[r.speaker].append(ok)
    heard = generate_from(net, data, "audio", idx, tokenizer, ecfg.batch_size, 4)
    said = sum(h.strip() == DIGIT_WORDS[int(t)] for h, t in zip(heard, target))
    return {"accuracy": round(100.0 * float((pred == target).float().mean()), 2), "chance": 10.0, "n": len(recs),
            "transcript_accuracy": round(100.0 * said / len(recs), 2),
            "per_speaker": {s: round(100.0 * sum(v) / len(v), 2) for s, v in sorted(per_speaker.items())}}


def evaluate_nlmm(net: NLMM, data: NLMMData, tokenizer: WordTokenizer, ecfg: Any, adapt: str | None = None) -> dict[str, Any]:
    """Every metric of the module doc, per dataset: {"datasets": {spec: {...}}, "n": samples}."""
    was = net.training
    net.eval()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(data.samples):
        groups[dataset_of(s.group)].append(i)
    out: dict[str, Any] = {"n": len(data), "adapt": adapt or ecfg.adapt, "datasets": {}}
    try:
        with adaptation(net, adapt or ecfg.adapt, [m for m in net.modalities if m != "text"]):
            for spec, members in groups.items():
                part = data.select(members)
                res: dict[str, Any] = {"n": len(part)}
                for a, b in PAIRS:
                    if a in net.modalities and b in net.modalities and (r := retrieval(net, part, a, b, ecfg.ks, ecfg.batch_size)):
                        res[f"{a}-{b}"] = r
                if "image" in net.modalities and (c := captions(net, part, tokenizer, ecfg)):
                    res["captions"] = c
                if "audio" in net.modalities:
                    if (t := transcripts(net, part, tokenizer, ecfg)) and not spec.startswith("fsdd"):
                        res["transcripts"] = t
                    if spec.startswith("fsdd") and (dg := digits(net, part, tokenizer, ecfg, torch.arange(len(part)))):
                        res["digits"] = dg
                out["datasets"][spec] = res
    finally:
        net.train(was)
    return out


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers that sum into the validation score: mean R@1 of every retrieval direction,
    caption token F1, transcript token F1 and digit accuracy, over the datasets."""
    vals: dict[str, list[float]] = defaultdict(list)
    for res in result["datasets"].values():
        for key, r in res.items():
            if "-" in key and isinstance(r, dict):
                a, b = key.split("-")
                vals["R@1"].append((r[f"{a}_to_{b}"]["R@1"] + r[f"{b}_to_{a}"]["R@1"]) / 2)
        if "captions" in res:
            vals["caption_f1"].append(res["captions"]["f1"])
        if "transcripts" in res:
            vals["transcript_f1"].append(res["transcripts"]["f1"])
        if "digits" in res:
            vals["digit_accuracy"].append(res["digits"]["accuracy"])
    return {k: round(sum(v) / len(v), 2) for k, v in vals.items()}
