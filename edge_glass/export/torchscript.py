"""``edge-glass export RUN --out DIR --format torchscript``: a word-level vlm run (TRM or tiny
decoder) as one TorchScript module, for the control flow ONNX cannot express: the TRM decoder's
recursion and its data-dependent halting, and greedy decoding until every row has ended.

    DIR/vqa.torchscript.pt       torch.jit.load(...): frozen image backbone (traced; a convnet has no
                                 control flow) -> aligned head (traced, if the run has one) -> pooling +
                                 projector -> decoder (scripted: loops, halting and the EOS stop are in
                                 the graph, not unrolled)
    DIR/tokenizer.json           the run's word vocabulary as a ``tokenizers`` Tokenizer: encode(question).ids
                                 is the prompt (<bos> words <sep>)
    DIR/word_tokenizer.json      the same vocabulary in Edge Glass's own format
    DIR/edge_glass_export.json   the manifest: methods and their inputs, image preprocessing constants,
                                 special token ids, max_new_tokens, how to detokenize, the parity check

The module's methods (all take left-padded prompts: input_ids (B, L) int64, attention_mask (B, L) bool):

    forward(pixels (B, 3, S, S) float32, input_ids, attention_mask, max_new_tokens) -> ids (B, N) int64
    generate_from_features(tokens (B, T, D), token_mask (B, T) bool, pooled (B, D), input_ids, attention_mask,
                           max_new_tokens) -> ids
    trace_from_pixels / trace_from_features(...)  -> (ids (B, N), logits (B, N, V) float32, halt steps (B, N) int64)
    encode_image(pixels) -> (tokens, token_mask, pooled): the frozen backbone's features

ids: each row's tokens up to and including its first EOS, then pad ids, as ``Decoder.generate``.
Loading needs torch and ``tokenizers`` only (``load_torchscript`` below is a convenience that
imports nothing else from Edge Glass unless it is handed image files to preprocess).

Every export is checked before the directory appears (built aside, renamed into place): on the
run's own held-out samples (test split, then val, then train) the loaded module's answers must
equal ``edge_glass.load(run).answer(...)`` exactly, its per-token logits must agree within
PARITY_RTOL of their scale, and a TRM decoder must halt after the same number of supervision
steps for every generated token.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "torchscript"
FORMAT_VERSION = 1
MODULE_FILE = "vqa.torchscript.pt"
TOKENIZER_FILE = "tokenizer.json"
WORD_TOKENIZER_FILE = "word_tokenizer.json"
MANIFEST = "edge_glass_export.json"  # formats.MARKER: the folder may be replaced by a later export
SUPPORTED_DECODERS = ("trm", "tiny")
SUPPORTED_FUSIONS = ("prefix", "none")
PARITY_SAMPLES = 32
PARITY_RTOL = 1e-4  # tests/numerics.py FP32_NET: a multi-layer network; the scripted ops are the same ops


# --- scriptable re-expressions of the trained modules (they hold the trained parameters) ------------

@torch.jit.script
def _positions_from_mask(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.jit.script
def _causal_attention_mask(mask: Tensor) -> Tensor:
    S = mask.size(1)
    causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask[:, None, :]
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


@torch.jit.script
def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


@torch.jit.script
def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)


class ScriptRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class ScriptBlock(nn.Module):
    """layers.Block in inference mode (dropout off)."""

    __constants__ = ['post_norm', 'n_heads']

    def __init__(self, block: nn.Module):
        super().__init__()
        self.post_norm = bool(block.post_norm)
        self.n_heads = int(block.attn.n_heads)
        self.norm1, self.norm2 = ScriptRMSNorm(block.norm1), ScriptRMSNorm(block.norm2)
        self.qkv, self.out = block.attn.qkv, block.attn.out
        self.gate_up, self.down = block.mlp.gate_up, block.mlp.down

    def attn(self, x: Tensor, attn_mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, D = x.size(0), x.size(1), x.size(2)
        qkv = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = _apply_rotary(qkv[0], cos, sin), _apply_rotary(qkv[1], cos, sin), qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, S, D))

    def mlp(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, x: Tensor, attn_mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, attn_mask, cos, sin))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), attn_mask, cos, sin)
        return x + self.mlp(self.norm2(x))


class ScriptBlockStack(nn.Module):
    """layers.BlockStack: ``prepare(mask)`` once, then ``forward`` as often as the recursion needs."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([ScriptBlock(b) for b in stack.blocks])
        self.register_buffer("inv_freq", stack.rotary.inv_freq.detach().clone())

    def prepare(self, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        angles = _positions_from_mask(mask).float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return _causal_attention_mask(mask), angles.cos()[:, None], angles.sin()[:, None]

    def forward(self, h: Tensor, attn_mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h, attn_mask, cos, sin)
        return h


def _join(prefix: Tensor, text: Tensor, prefix_mask: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    return torch.cat([prefix.to(text.dtype), text], dim=1), torch.cat([prefix_mask.to(torch.bool), mask.to(torch.bool)], dim=1)


class ScriptTRM(nn.Module):
    """decoders.trm.TRMDecoder at inference: the supervision loop runs until every row's Q logit at
    its last position is > 0 (or n_sup steps), each step T latent recursions of n + 1 passes of f."""

    __constants__ = ['halting', 'n', 'T', 'n_sup']

    def __init__(self, decoder: nn.Module):
        super().__init__()
        cfg = decoder.cfg
        self.n, self.T, self.n_sup = int(cfg.n), int(cfg.T), int(cfg.n_sup)
        self.halting = decoder.q_head is not None
        self.embed, self.in_norm, self.lm_head = decoder.embed, ScriptRMSNorm(decoder.in_norm), decoder.lm_head
        self.net = ScriptBlockStack(decoder.net)
        # without halting the Q head is never called (the flag is a constant); a placeholder keeps the types simple
        self.q_head = decoder.q_head if decoder.q_head is not None else nn.Linear(decoder.d_model, 1)
        self.register_buffer("y_init", decoder.y_init.detach().clone())
        self.register_buffer("z_init", decoder.z_init.detach().clone())

    def latent_recursion(self, x: Tensor, y: Tensor, z: Tensor, attn_mask: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        for _ in range(self.n):
            z = self.net(x + y + z, attn_mask, cos, sin)
        y = self.net(y + z, attn_mask, cos, sin)
        return y, z

    @torch.jit.export
    def think(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, S, D), mask (B, S) -> y (B, S, D), supervision steps used per row (B,)."""
        attn_mask, cos, sin = self.net.prepare(mask)
        y = self.y_init.to(x.dtype).expand_as(x)
        z = self.z_init.to(x.dtype).expand_as(x)
        active = torch.ones(x.size(0), dtype=torch.bool, device=x.device)
        steps = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        for _ in range(self.n_sup):
            y_new, z_new = y, z
            for _ in range(self.T):
                y_new, z_new = self.latent_recursion(x, y_new, z_new, attn_mask, cos, sin)
            keep = active[:, None, None]
            y, z = torch.where(keep, y_new, y), torch.where(keep, z_new, z)
            steps += active.long()
            if self.halting:
                active = active & ~(self.q_head(y[:, -1:]).squeeze(-1)[:, 0] > 0)
            if not bool(active.any()):
                break
        return y, steps

    @torch.jit.export
    def next_token_logits(self, prefix: Tensor, prefix_mask: Tensor, input_ids: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        embeds, full_mask = _join(prefix, self.embed(input_ids), prefix_mask, mask)
        y, steps = self.think(self.in_norm(embeds), full_mask)
        return self.lm_head(y[:, -1]), steps


class ScriptTiny(nn.Module):
    """decoders.tiny.TinyDecoder (no cache: the short sequence is recomputed every token)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.embed, self.lm_head = decoder.embed, decoder.lm_head
        self.stack, self.norm = ScriptBlockStack(decoder.stack), ScriptRMSNorm(decoder.norm)

    @torch.jit.export
    def next_token_logits(self, prefix: Tensor, prefix_mask: Tensor, input_ids: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        embeds, full_mask = _join(prefix, self.embed(input_ids), prefix_mask, mask)
        attn_mask, cos, sin = self.stack.prepare(full_mask)
        logits = self.lm_head(self.norm(self.stack(embeds, attn_mask, cos, sin)))[:, -1]
        return logits, torch.ones(input_ids.size(0), dtype=torch.long, device=input_ids.device)


class ScriptVision(nn.Module):
    """Backbone features -> (aligned head) -> pooling -> projector -> (B, P, d_model) prefix + mask
    (P = 0 for fusion none)."""

    __constants__ = ['uses_image', 'has_aligned', 'pool', 'grid', 'd_model']

    def __init__(self, core: nn.Module, aligned: Optional[nn.Module]):
        super().__init__()
        self.d_model = int(core.decoder.d_model)
        self.uses_image = bool(core.fusion.uses_image)
        self.has_aligned = aligned is not None
        self.aligned = aligned if aligned is not None else _Passthrough()
        pool = core.projector.pool if core.projector is not None else "none"
        self.pool = pool if pool in ("none", "mean") else "grid"
        self.grid = 0 if pool in ("none", "mean") else int(pool)
        self.net = core.projector.net if core.projector is not None else nn.Identity()

    def forward(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        B = tokens.size(0)
        if not self.uses_image:
            return (torch.zeros(B, 0, self.d_model, device=tokens.device),
                    torch.zeros(B, 0, dtype=torch.bool, device=tokens.device))
        if self.has_aligned:
            tokens = self.aligned(tokens, mask, pooled)
            mask = torch.ones(tokens.size(0), tokens.size(1), dtype=torch.bool, device=tokens.device)
        if self.pool == "mean":
            tokens = _masked_mean(tokens, mask)
            mask = mask[:, :1] | True
        elif self.pool == "grid":
            T = tokens.size(1)
            side = int(math.sqrt(float(T)))
            while (side + 1) * (side + 1) <= T:
                side += 1
            while side * side > T:
                side -= 1
            if side * side != T:
                raise ValueError("projector pool k: the tokens are not a square map")
            grid = tokens.transpose(1, 2).reshape(B, -1, side, side)
            tokens = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
            mask = torch.ones(tokens.size(0), tokens.size(1), dtype=torch.bool, device=tokens.device)
        return self.net(tokens), mask


class _Passthrough(nn.Module):
    def forward(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        return tokens


class _NoImageTower(nn.Module):
    """Stands in for the backbone when the run has no image input (fusion none)."""

    def forward(self, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        B = pixels.size(0)
        return (torch.zeros(B, 0, 1, device=pixels.device), torch.zeros(B, 0, dtype=torch.bool, device=pixels.device),
                torch.zeros(B, 1, device=pixels.device))


class _ImageTower(nn.Module):
    """A frozen image encoder's pixels -> (tokens, mask, pooled), with FrozenEncoder's output contract."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        out = self.encoder.encode_batch(pixels)
        mask = out.mask.bool()
        return out.tokens.float() * mask.unsqueeze(-1), mask, out.pooled.float()


class _AlignedTower(nn.Module):
    """models.vlm.AlignedVision on (tokens, mask, pooled) -> its tokens."""

    def __init__(self, aligned: nn.Module):
        super().__init__()
        self.aligned = aligned

    def forward(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        from ..encoders.base import EncoderOutput

        return self.aligned(EncoderOutput(tokens, mask, pooled)).tokens


class ScriptVQA(nn.Module):
    """The whole answer path of a vlm run, with greedy decoding in the graph."""

    __constants__ = ['eos_id', 'pad_id', 'default_max_new_tokens']

    def __init__(self, image: nn.Module, vision: ScriptVision, decoder: nn.Module, eos_id: int, pad_id: int, max_new_tokens: int):
        super().__init__()
        self.image, self.vision, self.decoder = image, vision, decoder
        self.eos_id, self.pad_id, self.default_max_new_tokens = int(eos_id), int(pad_id), int(max_new_tokens)

    def generate(self, prefix: Tensor, prefix_mask: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 max_new_tokens: int) -> Tuple[Tensor, Tensor, Tensor]:
        """generate.greedy_generate: one token per step until every row has produced EOS."""
        ids = input_ids
        mask = attention_mask.to(torch.bool)
        if ids.size(1) > 0 and not bool(mask[:, -1].all()):
            raise ValueError("generate: prompts must be left-padded (the last position of every row real)")
        B = ids.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out: List[Tensor] = []
        logit_rows: List[Tensor] = []
        step_rows: List[Tensor] = []
        for _ in range(max_new_tokens):
            logits, steps = self.decoder.next_token_logits(prefix, prefix_mask, ids, mask)
            nxt = torch.where(done, torch.full_like(done, self.pad_id, dtype=torch.long), logits.argmax(-1))
            out.append(nxt)
            logit_rows.append(logits.float())
            step_rows.append(steps)
            done = done | (nxt == self.eos_id)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
        if len(out) == 0:
            return (ids.new_zeros((B, 0)), torch.zeros(B, 0, 0, device=ids.device), ids.new_zeros((B, 0)))
        return torch.stack(out, dim=1), torch.stack(logit_rows, dim=1), torch.stack(step_rows, dim=1)

    @torch.jit.export
    def encode_image(self, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.image(pixels)

    @torch.jit.export
    def trace_from_features(self, tokens: Tensor, token_mask: Tensor, pooled: Tensor, input_ids: Tensor,
                            attention_mask: Tensor, max_new_tokens: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            prefix, prefix_mask = self.vision(tokens, token_mask.to(torch.bool), pooled)
            n = self.default_max_new_tokens if max_new_tokens < 0 else max_new_tokens
            return self.generate(prefix, prefix_mask, input_ids, attention_mask, n)

    @torch.jit.export
    def trace_from_pixels(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor,
                          max_new_tokens: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            tokens, token_mask, pooled = self.image(pixels)
            return self.trace_from_features(tokens, token_mask, pooled, input_ids, attention_mask, max_new_tokens)

    @torch.jit.export
    def generate_from_features(self, tokens: Tensor, token_mask: Tensor, pooled: Tensor, input_ids: Tensor,
                               attention_mask: Tensor, max_new_tokens: int = -1) -> Tensor:
        return self.trace_from_features(tokens, token_mask, pooled, input_ids, attention_mask, max_new_tokens)[0]

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = -1) -> Tensor:
        return self.trace_from_pixels(pixels, input_ids, attention_mask, max_new_tokens)[0]


# --- building the module from a loaded run ----------------------------------------------------------

def check_supported(cfg: Any, where: str = "export --format torchscript") -> None:
    """Refuse, before anything is loaded, what the scripted path does not cover."""
    from ..errors import EdgeGlassError

    if cfg.task != "vlm":
        raise EdgeGlassError(f"--format torchscript is not implemented for {cfg.task!r} runs: it writes the answer path of vlm runs "
                             f"whose decoder is one of {', '.join(SUPPORTED_DECODERS)} (the TRM decoder's recursion and halting); "
                             "export the embedding towers with --format onnx")
    if cfg.decoder.type not in SUPPORTED_DECODERS:
        raise EdgeGlassError(f"{where}: decoder.type {cfg.decoder.type!r} is not supported; supported decoders: "
                             f"{', '.join(SUPPORTED_DECODERS)} (a LoRA LM decoder exports with --format peft)")
    if cfg.uses("audio"):
        raise EdgeGlassError(f"{where}: runs with an audio input are not supported yet (the scripted path takes images and "
                             "text questions); export them with --format hf")
    if cfg.fusion.type not in SUPPORTED_FUSIONS:
        raise EdgeGlassError(f"{where}: fusion.type {cfg.fusion.type!r} is not supported (its layers act through forward hooks); "
                             f"supported fusions: {', '.join(SUPPORTED_FUSIONS)}")


def _image_tower(model: Any, example_pixels: Tensor | None) -> nn.Module:
    from ..errors import EdgeGlassError

    if not model.core.fusion.uses_image:
        return torch.jit.script(_NoImageTower())
    encoder = model.encoder.ensure_loaded().cpu().eval()
    if not hasattr(encoder, "normalisation"):
        raise EdgeGlassError(f"export --format torchscript: the vision encoder {type(encoder).__name__} is not an image encoder")
    if example_pixels is None:
        size = encoder.input_size()
        example_pixels = torch.zeros(2, 3, size, size)
    with torch.no_grad():  # a convnet / ViT: no data-dependent control flow, so tracing is exact
        return torch.jit.trace(_ImageTower(encoder).eval(), (example_pixels,), check_trace=False)


def script_vlm(model: Any, example_pixels: Tensor | None = None) -> torch.jit.ScriptModule:
    """A loaded vlm run (``edge_glass.load``, on the CPU) as a ScriptVQA TorchScript module. The
    backbone and an aligned head are traced on ``example_pixels`` (default: zeros); projector and
    decoder are scripted."""
    from ..decoders.trm import TRMDecoder
    from ..decoders.tiny import TinyDecoder

    check_supported(model.cfg)
    core = model.core.eval()
    decoder = core.decoder
    scripted_decoder = ScriptTRM(decoder) if isinstance(decoder, TRMDecoder) else ScriptTiny(decoder) if isinstance(decoder, TinyDecoder) else None
    if scripted_decoder is None:
        from ..errors import EdgeGlassError

        raise EdgeGlassError(f"export --format torchscript: decoder {type(decoder).__name__} is not supported; "
                             f"supported decoders: {', '.join(SUPPORTED_DECODERS)}")
    image = _image_tower(model, example_pixels)
    aligned = None
    if core.vision is not None and core.fusion.uses_image:
        with torch.no_grad():
            tokens, mask, pooled = image(example_pixels if example_pixels is not None else torch.zeros(2, 3, model.encoder.input_size(), model.encoder.input_size()))
            aligned = torch.jit.trace(_AlignedTower(core.vision).eval(), (tokens, mask, pooled), check_trace=False)
    prompt = decoder.prompt
    top = ScriptVQA(image, ScriptVision(core, aligned), scripted_decoder, prompt.eos_id, prompt.pad_id, model.cfg.eval.max_new_tokens)
    return torch.jit.script(top.eval())


def word_tokenizer_json(tokenizer: Any) -> str:
    """A WordTokenizer as a ``tokenizers`` Tokenizer (JSON): lower-cased, whitespace-split, the same
    word / punctuation regex, a WordLevel vocabulary with the same ids, and the prompt template
    <bos> $A <sep> as its post-processor."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    from ..decoders.prompt import _WORD

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokenizer.tokens)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("(?i)" + _WORD.pattern), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <sep>", special_tokens=[("<bos>", tokenizer.bos_id), ("<sep>", tokenizer.sep_id)])
    return tok.to_str(pretty=True)


# --- parity -----------------------------------------------------------------------------------------

def held_out_samples(model: Any, n: int) -> list[Any]:
    """Up to ``n`` QA samples of the run's own test split, then val, then train (as split.json records them)."""
    from ..data.qa import read_qa, split_group
    from ..data.samples import DataReport
    from ..runs import RunDir
    from ..tasks.vlm import first_per_split

    cfg = model.cfg
    record = RunDir(model.run_dir).read_json("split.json")
    report = DataReport()
    parts = {spec: first_per_split(read_qa(spec, report), cfg.data.max_samples) for spec in cfg.data.train}

    def groups(spec: str, split: str) -> set[str]:
        if isinstance(record.get(split), list):  # runs before 0.2: one list
            return set(record[split])
        return set(record.get(spec, {}).get(split, []))

    out: list[Any] = []
    for split in ("test", "val", "train"):
        for spec, samples in parts.items():
            held = groups(spec, "test") | groups(spec, "val")
            keep = (lambda g: g not in held) if split == "train" else (lambda g, s=groups(spec, split): g in s)
            out += [s for s in samples if keep(split_group(s))]
        if len(out) >= n:
            break
    return out[:n]


def reference_trace(model: Any, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """PyTorch's per-token logits (B, N, V) and halt steps (B, N) along ``model.answer``'s own
    greedy path (the decoder's next_token_logits, recorded as it is called)."""
    decoder = model.core.decoder
    logits_seen: list[Tensor] = []
    steps_seen: list[Tensor] = []
    original = decoder.next_token_logits

    def recording(*args, **kwargs):
        logits, state = original(*args, **kwargs)
        logits_seen.append(logits.float())
        steps = getattr(decoder, "last_sup_steps", None)
        steps_seen.append(steps.clone() if steps is not None else torch.ones(logits.shape[0], dtype=torch.long))
        return logits, state

    decoder.next_token_logits = recording
    try:
        model.answer(list(images), list(questions), max_new_tokens)
    finally:
        del decoder.next_token_logits
    if not logits_seen:
        return torch.zeros(len(questions), 0, 0), torch.zeros(len(questions), 0, dtype=torch.long)
    return torch.stack(logits_seen, 1), torch.stack(steps_seen, 1)


def check_parity(model: Any, exported: "TorchScriptVQA", images: Sequence[Any], questions: Sequence[str]) -> dict[str, Any]:
    """Compare the loaded export with PyTorch on real samples; raise EdgeGlassError on any miss."""
    from ..errors import EdgeGlassError

    max_new = model.cfg.eval.max_new_tokens
    prompt = model.core.decoder.prompt
    bad_prompt = next((q for q in questions if exported.prompt_ids(q) != prompt.prompt_ids(q)), None)
    if bad_prompt is not None:
        raise EdgeGlassError(f"export --format torchscript: the exported tokenizer encodes {bad_prompt!r} as {exported.prompt_ids(bad_prompt)}, "
                             f"the run's as {prompt.prompt_ids(bad_prompt)}")
    pixels = exported_pixels(model, images)
    reference = model.answer(list(images), list(questions), max_new)
    ids, logits, steps = exported.trace(pixels, questions, max_new)
    answers = [exported.decode(row) for row in ids.tolist()]
    wrong = [(q, a, r) for q, a, r in zip(questions, answers, reference) if a != r]
    if wrong:
        q, a, r = wrong[0]
        raise EdgeGlassError(f"export --format torchscript: the scripted module answers {len(wrong)} of {len(questions)} held-out "
                             f"questions differently from PyTorch (e.g. {q!r}: {a!r} vs {r!r})")
    ref_logits, ref_steps = reference_trace(model, images, questions, max_new)
    if ref_logits.shape != logits.shape:
        raise EdgeGlassError(f"export --format torchscript: logits of shape {tuple(logits.shape)} vs PyTorch's {tuple(ref_logits.shape)}")
    scale = float(ref_logits.abs().max()) if ref_logits.numel() else 0.0
    diff = float((logits - ref_logits).abs().max()) if ref_logits.numel() else 0.0
    if diff > PARITY_RTOL * scale:
        raise EdgeGlassError(f"export --format torchscript: logits differ from PyTorch's by {diff:.3g} (scale {scale:.3g}; "
                             f"the bound is {PARITY_RTOL:g} of it) over {len(questions)} held-out questions")
    if not torch.equal(steps, ref_steps):
        raise EdgeGlassError("export --format torchscript: the scripted TRM halts after different numbers of supervision steps "
                             f"than PyTorch ({steps.tolist()[:2]} vs {ref_steps.tolist()[:2]})")
    return {"samples": len(questions), "from": "test, then val, then train samples of the run", "answers_equal": True,
            "logits_max_abs_diff": diff, "logits_scale": scale, "rtol": PARITY_RTOL, "halt_steps_equal": True,
            "halt_steps_seen": sorted({int(s) for s in steps.flatten().tolist()})}


def exported_pixels(model: Any, images: Sequence[Any]) -> Tensor:
    """The run's encoder's own preprocessing of ``images`` (what ``answer`` feeds the backbone)."""
    if not model.core.fusion.uses_image:
        return torch.zeros(len(images), 3, 1, 1)
    enc = model.encoder
    return enc.collate([enc.prepare(im) for im in images])


# --- the verb ---------------------------------------------------------------------------------------

def export_torchscript(run_dir: str | Path, out: str | Path, parity_samples: int | None = None) -> Path:
    """Write a word-level vlm run (TRM or tiny decoder) into ``out`` as a TorchScript module + its
    tokenizer + manifest, checked against PyTorch on ``parity_samples`` held-out samples (default
    PARITY_SAMPLES) before it appears."""
    from ..atomic import atomic_dir
    from ..errors import EdgeGlassError
    from ..runs import RunDir
    from ..tasks import task_class
    from .formats import _check_target, _version

    run = RunDir(run_dir)
    cfg = run.read_config()
    check_supported(cfg)
    target = _check_target(out)
    model = task_class(cfg.task).load_run(run, "cpu").eval()
    samples = held_out_samples(model, parity_samples or PARITY_SAMPLES)
    if not samples:
        raise EdgeGlassError(f"{run.path}: no samples to check the export against")
    images, questions = [s.image for s in samples], [s.question for s in samples]
    pixels = exported_pixels(model, images)
    module = script_vlm(model, pixels[:2] if model.core.fusion.uses_image else None)
    decoder = model.core.decoder
    tok = decoder.tokenizer
    pre = None
    if model.core.fusion.uses_image:
        mean, std = model.encoder.normalisation()
        pre = {**model.encoder.preprocessing(), "mean": list(mean), "std": list(std), "resample": "bicubic",
               "layout": "(B, 3, size, size) float32, (pixel / 255 - mean) / std per channel, RGB"}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "edge_glass_version": _version(), "source_run": str(run.path),
        "run_name": cfg.name, "module": MODULE_FILE, "decoder": cfg.decoder.type, "fusion": cfg.fusion.type,
        "uses_image": bool(model.core.fusion.uses_image), "vision_encoder": getattr(model.encoder.cfg, "type", None),
        "aligned_run": cfg.vision.aligned_run,
        "methods": {
            "forward": "(pixels, input_ids, attention_mask, max_new_tokens=-1) -> ids (B, N) int64",
            "generate_from_features": "(tokens, token_mask, pooled, input_ids, attention_mask, max_new_tokens=-1) -> ids",
            "trace_from_pixels": "(pixels, input_ids, attention_mask, max_new_tokens=-1) -> (ids, logits (B, N, V), halt_steps (B, N))",
            "trace_from_features": "(tokens, token_mask, pooled, input_ids, attention_mask, max_new_tokens=-1) -> (ids, logits, halt_steps)",
            "encode_image": "(pixels) -> (tokens (B, T, D), token_mask (B, T) bool, pooled (B, D))",
        },
        "inputs": {"pixels": "float32 (B, 3, size, size), see preprocess", "input_ids": "int64 (B, L), prompts left-padded with pad_id",
                   "attention_mask": "bool (B, L), True on real tokens", "max_new_tokens": "int; -1: the run's eval.max_new_tokens"},
        "preprocess": pre,
        "tokenizer": {"file": TOKENIZER_FILE, "kind": "tokenizers WordLevel (edge_glass WordTokenizer)",
                      "word_tokenizer": WORD_TOKENIZER_FILE,
                      "prompt": "Tokenizer.encode(question).ids = [bos_id] + words + [sep_id]",
                      "detokenize": "ids up to the first eos_id; drop ids < n_special; join the tokens with ' '; "
                                    "remove the space before . , ! ? ; :; strip"},
        "special_tokens": {"pad_id": tok.pad_id, "unk_id": tok.unk_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                           "sep_id": tok.sep_id, "n_special": len(tok.SPECIALS)},
        "vocab_size": int(decoder.vocab_size), "max_new_tokens": int(cfg.eval.max_new_tokens),
        "trm": {"n": cfg.decoder.n, "T": cfg.decoder.T, "n_sup": cfg.decoder.n_sup, "halting": cfg.decoder.halting}
        if cfg.decoder.type == "trm" else None,
    }
    with atomic_dir(target) as work:
        module.save(str(work / MODULE_FILE))
        (work / TOKENIZER_FILE).write_text(word_tokenizer_json(tok), encoding="utf-8")
        tok.save(work / WORD_TOKENIZER_FILE)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        exported = TorchScriptVQA(work)  # what a user loads, from the files just written
        manifest["parity"] = check_parity(model, exported, images, questions)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return target


# --- loading (torch + tokenizers only) ----------------------------------------------------------------

class TorchScriptVQA:
    """An exported directory, ready to answer:

        m = load_torchscript("export/trm")
        m.answer(["shape.png"], ["what shape is in the image?"])    # images need pillow (+ Edge Glass's preprocessing)
        m.answer(pixels, questions)                                  # or (B, 3, S, S) tensors preprocessed as the manifest says
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        self.device = torch.device(device)
        self.module = torch.jit.load(str(self.path / self.manifest["module"]), map_location=self.device).eval()
        self.tokenizer = Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]["file"]))
        sp = self.manifest["special_tokens"]
        self.pad_id, self.eos_id, self.n_special = sp["pad_id"], sp["eos_id"], sp["n_special"]

    def prompt_ids(self, question: str) -> list[int]:
        return list(self.tokenizer.encode(question).ids)

    def prompts(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded input_ids (B, L) int64 and attention_mask (B, L) bool."""
        rows = [self.prompt_ids(q) for q in questions]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, L - len(r):] = torch.tensor(r)
                mask[i, L - len(r):] = True
        return ids.to(self.device), mask.to(self.device)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        words = [self.tokenizer.id_to_token(i) for i in ids if i >= self.n_special]
        return re.sub(r" ([.,!?;:])", r"\1", " ".join(w for w in words if w is not None)).strip()

    def pixels(self, images: Sequence[Any]) -> Tensor:
        """Paths / bytes / PIL images -> (B, 3, S, S) with the manifest's preprocessing (Edge Glass's
        numpy image code, which needs pillow and numpy but no torch model code)."""
        pre = self.manifest["preprocess"]
        if pre is None:
            return torch.zeros(len(images), 3, 1, 1)
        import numpy as np

        from ..media.images import open_image
        from ..media.transforms import image_array

        arrays = [image_array(open_image(im, tuple(pre["background"])), pre["size"], pre["mean"], pre["std"], pre["resize"])
                  for im in images]
        return torch.from_numpy(np.stack(arrays))

    def trace(self, images: Sequence[Any] | Tensor, questions: Sequence[str], max_new_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(ids (B, N), logits (B, N, V), halt steps (B, N)) for images (or a pixel tensor) and questions."""
        pixels = images if isinstance(images, Tensor) else self.pixels(images)
        ids, mask = self.prompts(questions)
        with torch.no_grad():
            return self.module.trace_from_pixels(pixels.to(self.device), ids, mask, -1 if max_new_tokens is None else int(max_new_tokens))

    def answer(self, images: Sequence[Any] | Tensor, questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        return [self.decode(row) for row in self.trace(images, questions, max_new_tokens)[0].tolist()]


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> TorchScriptVQA:
    return TorchScriptVQA(path, device)


__all__ = ["export_torchscript", "script_vlm", "load_torchscript", "TorchScriptVQA", "check_supported", "SUPPORTED_DECODERS"]
