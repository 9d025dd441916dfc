"""The NL-MM network: modality encoders -> central latent memory (CMS levels) -> decoders.

    encoders   text   token embedding + bidirectional blocks
               image  patch embedding (any image size: 2-D sin-cos positions made per size) + bidirectional blocks
               audio  two strided 1-D convolutions over log-mel frames (lengths -> masks) + bidirectional blocks
               each followed by a test-time-training adapter (residual low-rank fast weight trained online
               on the sequence's own tokens, per sequence, never across batch items)
    memory     latent: L_mem learned slots + a null key; every present modality's tokens (plus a
               modality embedding) are one key set the slots read by cross-attention, so the result does
               not depend on the order the modalities come in, and a sample may have any subset of them;
               then the continuum memory (CMS levels, each updated at its own period by the NL optimizer);
               with rounds > 1 the slots are broadcast back to the tokens (cross-attention) and read again.
               After the slots: one summary token per present modality (the masked mean of its tokens,
               projected), in a fixed modality order: a skip past the bottleneck, without which the
               slots (a learned constant plus an average over the tokens) start nearly input-independent
               and a from-scratch model learns retrieval only very slowly.
               concat (ablation): the decoders see the concatenated tokens, the embedding is their mean.
    decoders   text   causal blocks over [memory ; <bos> tokens], tied output embedding (captions, transcripts)
               image  patch queries (positions) attend the memory -> pixels of each patch
               audio  frame queries (positions) attend the memory -> the log-mel frames of each audio token
    embedding  the memory of one modality alone: linear(mean of the slots) + linear(its summary token)
               -> Matryoshka dims (unit rows)

Conditioning: the text decoder and the reconstructions read the memory of the sample's non-text
modalities (image, audio), so a caption is never predicted from itself.
"""
from __future__ import annotations

import copy

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nested.cms import CMSConfig, ContinuumMemory, LevelSpec
from ..nested.ttt import TTTAdapter
from .layers import Block, BlockStack, CrossBlock, FeedForward, masked, sincos_1d, sincos_2d

Tensor = torch.Tensor
MODALITIES = ("image", "audio", "text")
# Input positions are added at the scale of the content they join (a token embedding of std 0.02, a
# convolution's output): at unit scale, sin-cos positions drown the content and every input of one
# length starts out looking the same. The fast-weight mixers' own convolutions carry local order.
POS_SCALE = {"image": 0.1, "audio": 0.1, "text": 0.02}
CONTEXT = ("image", "audio")  # what the decoders are conditioned on


def effective(cfg: Any) -> dict[str, Any]:
    """The switches a model config resolves to (``plain`` forces the baseline's)."""
    m = cfg
    if m.plain:
        return {"mixer": "softmax", "memory": "concat", "cms": None, "ttt": False}
    return {"mixer": m.mixer, "memory": m.memory, "cms": m.cms, "ttt": m.ttt.enabled}


def stack(cfg: Any, depth: int, mixer: str, bidirectional: bool) -> BlockStack:
    return BlockStack([Block(cfg.d_model, cfg.heads, mixer, cfg.ffn_mult, bidirectional, cfg.chunk_size) for _ in range(depth)])


class Encoder(nn.Module):
    """Blocks + final norm + optional TTT adapter over (B, T, D) tokens with a mask."""

    def __init__(self, cfg: Any, depth: int, mixer: str, ttt: bool):
        super().__init__()
        self.blocks = stack(cfg, depth, mixer, bidirectional=True)
        self.norm = nn.LayerNorm(cfg.d_model)
        t = cfg.ttt
        self.ttt = TTTAdapter(cfg.d_model, rank=t.rank, eta=t.eta, mini_batch_size=t.mini_batch, bias=True) if ttt else None

    def forward(self, x: Tensor, mask: Tensor, ttt_state=None) -> tuple[Tensor, Any]:
        x = self.norm(self.blocks(x, mask))
        state = None
        if self.ttt is not None:
            x, state = self.ttt(x, ttt_state, mask)
        return masked(x, mask), state


class ImageTokens(nn.Module):
    def __init__(self, d_model: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, d_model, patch, stride=patch)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images)                                   # (B, D, h, w)
        B, D, h, w = x.shape
        return x.flatten(2).transpose(1, 2) + POS_SCALE["image"] * sincos_2d(h, w, D, x.device).to(x.dtype)


class AudioTokens(nn.Module):
    """(B, T, n_mels) log-mel + lengths -> (B, ceil(T / stride), D) tokens + mask."""

    def __init__(self, n_mels: int, d_model: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv1d(n_mels, d_model, 3, stride=2 if stride >= 2 else 1, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2 if stride >= 4 else 1, padding=1)

    def lengths(self, frames: Tensor) -> Tensor:
        return (frames + self.stride - 1) // self.stride

    @staticmethod
    def _masked_time(x: Tensor, n: Tensor) -> Tensor:
        """x (B, C, T) with every column at or past n (B,) zeroed, as the convolution's own padding."""
        return x * (torch.arange(x.shape[2], device=x.device)[None] < n[:, None])[:, None].to(x.dtype)

    def forward(self, mel: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        x = self._masked_time(mel.transpose(1, 2), frames)
        s1 = self.conv1.stride[0]
        n1 = (frames + s1 - 1) // s1
        x = self._masked_time(F.gelu(self.conv1(x)), n1)   # a padded clip's conv2 sees what a clip alone sees
        x = F.gelu(self.conv2(x)).transpose(1, 2)           # (B, T', D)
        n = self.lengths(frames)
        mask = torch.arange(x.shape[1], device=mel.device)[None] < n[:, None]
        return masked(x + POS_SCALE["audio"] * sincos_1d(x.shape[1], x.shape[2], mel.device).to(x.dtype), mask), mask


class FeatureTokens(nn.Module):
    """A frozen backbone's (B, T, D_backbone) token features -> (B, T, D): linear + LayerNorm (the
    backbone's own positions are in its features)."""

    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, feats: Tensor) -> Tensor:
        return self.norm(self.proj(feats.to(self.proj.weight.dtype)))


class LatentMemory(nn.Module):
    """Central latent memory (module doc): slots read a masked key set made of every modality."""

    def __init__(self, cfg: Any, cms_levels: list | None):
        super().__init__()
        D = cfg.d_model
        self.slots = nn.Parameter(torch.randn(cfg.memory_slots, D) * 0.02)
        self.null = nn.Parameter(torch.zeros(1, D))
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(D)) for m in MODALITIES})
        self.rounds = cfg.memory_rounds
        self.read = nn.ModuleList(CrossBlock(D, cfg.heads) for _ in range(self.rounds))
        self.back = nn.ModuleList(CrossBlock(D, cfg.heads) for _ in range(self.rounds - 1))
        hidden = [lv.hidden or 4 * D for lv in cms_levels] if cms_levels else []
        if cms_levels:
            levels = [LevelSpec(period=lv.period, lr=lv.lr, hidden=h, optimizer=lv.optimizer, optimizer_kwargs=dict(lv.optimizer_kwargs), name=lv.name)
                      for lv, h in zip(cms_levels, hidden)]
            self.cms = ContinuumMemory(CMSConfig(D, levels))
            self.mlp = None
        else:  # no CMS: one plain residual MLP (width of the default three levels) trained with everything else
            self.cms = None
            self.norm = nn.LayerNorm(D)
            self.mlp = FeedForward(D, 12 * D)
        self.out_norm = nn.LayerNorm(D)
        self.summary = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))
        self.n_slots = cfg.memory_slots

    def ffn(self, s: Tensor) -> Tensor:
        return self.cms(s) if self.cms is not None else s + self.mlp(self.norm(s))

    def forward(self, streams: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """streams {modality: (tokens (B, T, D), mask (B, T))} -> (slots (B, L, D), slot mask (B, L) all True)."""
        names = list(streams)  # in the order given: attention over the key set does not depend on it
        B = streams[names[0]][0].shape[0]
        tokens = {m: streams[m][0] + self.modality[m].to(streams[m][0].dtype) for m in names}
        masks = {m: streams[m][1] for m in names}
        s = self.slots.expand(B, -1, -1).to(tokens[names[0]].dtype)
        null_mask = torch.ones(B, 1, dtype=torch.bool, device=s.device)
        for r in range(self.rounds):
            keys = torch.cat([self.null.expand(B, -1, -1).to(s.dtype), *(tokens[m] for m in names)], 1)
            key_mask = torch.cat([null_mask, *(masks[m] for m in names)], 1)
            s = self.ffn(self.read[r](s, keys, key_mask))
            if r < self.rounds - 1:
                tokens = {m: masked(self.back[r](tokens[m], s), masks[m]) for m in names}
        s = self.out_norm(s)
        # one summary token per present modality (its tokens' masked mean), after the slots in the
        # canonical modality order: a skip past the bottleneck, as the Perceiver poolers' mean skip
        order = [m for m in MODALITIES if m in streams]
        summary = torch.stack([self.summary(masked_mean(streams[m][0], masks[m])) for m in order], 1).to(s.dtype)
        present = torch.stack([masks[m].any(1) for m in order], 1)
        ctx = torch.cat([s, masked(summary, present)], 1)
        return ctx, torch.cat([torch.ones(B, s.shape[1], dtype=torch.bool, device=s.device), present], 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D), (B, T) -> (B, D) mean over the real tokens (0 for a row without any)."""
    w = mask[..., None].to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class ConcatMemory(nn.Module):
    """No central memory (ablation): the context is the concatenated tokens themselves."""

    n_slots = None

    def __init__(self, cfg: Any):
        super().__init__()
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.d_model)) for m in MODALITIES})
        self.cms = None

    def forward(self, streams: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        names = sorted(streams)  # a canonical order: the causal text decoder reads this prefix in order
        x = torch.cat([streams[m][0] + self.modality[m].to(streams[m][0].dtype) for m in names], 1)
        mask = torch.cat([streams[m][1] for m in names], 1)
        return masked(x, mask), mask


class TextDecoder(nn.Module):
    """Causal blocks over [context ; tokens]; logits through the tied token embedding."""

    def __init__(self, cfg: Any, embed: nn.Embedding, mixer: str):
        super().__init__()
        self.embed = embed
        self.ctx_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.blocks = stack(cfg, cfg.decoder_depth, mixer, bidirectional=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, ctx: Tensor, ctx_mask: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        """logits (B, L, V) at every token position (position i predicts token i + 1)."""
        P = ctx.shape[1]
        x = torch.cat([self.ctx_proj(ctx), self.embed(tokens) + POS_SCALE["text"] * sincos_1d(tokens.shape[1], ctx.shape[2], tokens.device).to(ctx.dtype)], 1)
        mask = torch.cat([ctx_mask, token_mask], 1)
        h = self.norm(self.blocks(x, mask))[:, P:]
        return h @ self.embed.weight.t().to(h.dtype)


class QueryDecoder(nn.Module):
    """Position queries attend the memory -> ``out_dim`` values per query (image patches, audio frames)."""

    def __init__(self, cfg: Any, out_dim: int):
        super().__init__()
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.blocks = nn.ModuleList(CrossBlock(cfg.d_model, cfg.heads) for _ in range(cfg.recon_depth))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, out_dim)

    def forward(self, positions: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        x = self.query(positions.to(ctx.dtype))[None].expand(ctx.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, ctx, ctx_mask)
        return self.out(self.norm(x))


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, 3, H, W) -> (B, (H/p)(W/p), 3 p p), row-major patches (as the patch embedding)."""
    B, C, H, W = images.shape
    x = images[:, :, : H // p * p, : W // p * p].unfold(2, p, p).unfold(3, p, p)   # (B, C, h, w, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)


class NLMM(nn.Module):
    """The trainable NL-MM (see module doc). ``vocab_size``: the text tokenizer's size."""

    def __init__(self, cfg: Any, vocab_size: int, n_mels: int, modalities: tuple[str, ...] = MODALITIES,
                 feature_dims: dict[str, int] | None = None):
        super().__init__()
        self.cfg = cfg
        eff = effective(cfg)
        self.switches = eff
        D = cfg.d_model
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.feature_dims = {m: int(d) for m, d in (feature_dims or {}).items() if m in self.modalities}
        self.encoders = nn.ModuleDict({m: Encoder(cfg, cfg.depth.get(m, 2), eff["mixer"], eff["ttt"]) for m in self.modalities})
        self.token_embed = nn.Embedding(vocab_size, D)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        # a modality fed by a frozen backbone reads its token features through a projection, in place of its raw front end
        self.feature_in = nn.ModuleDict({m: FeatureTokens(d, D) for m, d in self.feature_dims.items()})
        raw = [m for m in self.modalities if m not in self.feature_dims]
        self.image_tokens = ImageTokens(D, cfg.patch_size) if "image" in raw else None
        self.audio_tokens = AudioTokens(n_mels, D, cfg.audio_stride) if "audio" in raw else None
        self.memory = LatentMemory(cfg, eff["cms"]) if eff["memory"] == "latent" else ConcatMemory(cfg)
        self.text_decoder = TextDecoder(cfg, self.token_embed, eff["mixer"])
        self.image_decoder = QueryDecoder(cfg, 3 * cfg.patch_size ** 2) if "image" in self.modalities else None
        self.audio_decoder = QueryDecoder(cfg, n_mels * cfg.audio_stride) if "audio" in self.modalities else None
        self.embed_proj = nn.Linear(D, cfg.embed_dims[0])
        self.embed_skip = nn.Linear(D, cfg.embed_dims[0], bias=False) if eff["memory"] == "latent" else None
        self.n_mels = n_mels
        self.ttt_mode = "sequence"  # "sequence" | "none" | "stream" (see evaluate.adaptation)
        self.stream_modalities: set[str] = set(self.modalities)  # which encoders stream in "stream" mode
        self.reset_stream()
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)

    def set_gradient_checkpointing(self, on: bool) -> None:
        for mod in self.modules():
            if isinstance(mod, BlockStack):
                mod.gradient_checkpointing = on

    @property
    def device(self) -> torch.device:
        return self.embed_proj.weight.device

    # -- encoders ------------------------------------------------------------------------------
    def encode(self, modality: str, batch: dict[str, Tensor], ttt_state=None) -> tuple[Tensor, Tensor, Any]:
        """One modality of a batch -> (tokens (B, T, D), mask (B, T), TTT state); absent rows fully masked."""
        present = batch[f"{modality}_mask"]
        if modality in self.feature_in:
            key = f"{modality}_feat"
            if key not in batch:
                raise KeyError(f"NL-MM: the {modality} encoder reads backbone features ({key}); build the data with the run's backbones")
            x = self.feature_in[modality](batch[key])
            mask = (torch.arange(x.shape[1], device=x.device)[None] < batch[f"{key}_lengths"][:, None]) & present[:, None]
        elif modality == "image":
            x = self.image_tokens(batch["image"])
            mask = present[:, None].expand(-1, x.shape[1])
        elif modality == "audio":
            x, mask = self.audio_tokens(batch["audio"], batch["audio_lengths"])
            mask = mask & present[:, None]
        else:
            tokens = batch["text"]
            mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] < batch["text_lengths"][:, None]) & present[:, None]
            x = self.token_embed(tokens) + POS_SCALE["text"] * sincos_1d(tokens.shape[1], self.cfg.d_model, tokens.device)
        x = masked(x, mask)
        encoder = self.encoders[modality]
        if self.ttt_mode == "stream" and modality in self.stream_modalities and encoder.ttt is not None and ttt_state is None:
            return (*self._encode_stream(encoder, modality, x, mask), None)
        x, state = encoder(x, mask, ttt_state)
        return x, mask, state

    def _encode_stream(self, encoder: Encoder, modality: str, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Items one at a time, the TTT fast weight of this modality carried from item to item."""
        outs = []
        for b in range(x.shape[0]):
            y, state = encoder(x[b : b + 1], mask[b : b + 1], self._stream.get(modality))
            if bool(mask[b].any()):
                self._stream[modality] = state.detach()
            outs.append(y)
        return torch.cat(outs), mask

    def reset_stream(self) -> None:
        """Forget the fast weights carried in stream adaptation (the next item starts from W_0)."""
        self._stream: dict[str, Any] = {}

    def encode_all(self, batch: dict[str, Tensor], modalities=None, skip_absent: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
        """{modality: (tokens, mask)}; a modality no row has is left out unless ``skip_absent`` is
        False (training: every process then runs the same modules and collectives, whatever its
        slice of the batch holds)."""
        out = {}
        for m in modalities or self.modalities:
            if m in self.modalities and (not skip_absent or bool(batch[f"{m}_mask"].any())):
                x, mask, _ = self.encode(m, batch)
                out[m] = (x, mask)
        return out

    def context(self, streams: dict[str, tuple[Tensor, Tensor]], names) -> tuple[Tensor, Tensor] | None:
        """The memory of the given modalities (None when the batch has none of them)."""
        chosen = {m: streams[m] for m in names if m in streams}
        return self.memory(chosen) if chosen else None

    def embed_memory(self, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        """Pooled memory -> the full-dim embedding (not normalised; see ``embeddings``): the mean
        of the slots, plus (latent memory) the mean of the summary tokens through its own projection."""
        L = self.memory.n_slots
        if L is None:
            return self.embed_proj(masked_mean(ctx, ctx_mask))
        return self.embed_proj(ctx[:, :L].mean(1)) + self.embed_skip(masked_mean(ctx[:, L:], ctx_mask[:, L:]))

    def embeddings(self, batch: dict[str, Tensor], modality: str, dims=None) -> dict[int, Tensor]:
        """{dim: (B, dim) unit rows} of one modality (each sample's memory of that modality alone)."""
        streams = self.encode_all(batch, [modality])
        ctx, mask = self.context(streams, [modality])
        full = self.embed_memory(ctx, mask)
        return {d: F.normalize(full[:, :d].float(), dim=-1) for d in (dims or self.cfg.embed_dims)}

    def embedding_path(self, modality: str) -> "NLMM":
        """A view of this network holding only what embedding ``modality`` reads (its front end,
        encoder and adapter, the memory, the embedding projection): the same parameter tensors,
        shared, and none of the decoders or other encoders (an exported program then carries only
        those weights)."""
        if modality not in self.modalities:
            raise KeyError(f"no {modality} encoder (this network has {', '.join(self.modalities)})")
        view = copy.copy(self)
        view._parameters, view._buffers, view._modules = dict(self._parameters), dict(self._buffers), dict(self._modules)
        view.modalities = (modality,)
        view.encoders = nn.ModuleDict({modality: self.encoders[modality]})
        view.text_decoder = view.image_decoder = view.audio_decoder = None
        view.image_tokens = self.image_tokens if modality == "image" else None
        view.audio_tokens = self.audio_tokens if modality == "audio" else None
        view.token_embed = self.token_embed if modality == "text" and modality not in self.feature_in else None
        view.feature_in = nn.ModuleDict({modality: self.feature_in[modality]} if modality in self.feature_in else {})
        view.reset_stream()
        return view

    # -- decoders ------------------------------------------------------------------------------
    def text_logits(self, ctx: Tensor, ctx_mask: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        token_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return self.text_decoder(ctx, ctx_mask, tokens, token_mask)

    def image_patches(self, ctx: Tensor, ctx_mask: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = size[0] // self.cfg.patch_size, size[1] // self.cfg.patch_size
        return self.image_decoder(sincos_2d(h, w, self.cfg.d_model, ctx.device), ctx, ctx_mask)

    def audio_token_count(self, frames: int) -> int:
        """How many audio positions the log-mel decoder reconstructs ``frames`` frames from."""
        return -(-int(frames) // self.cfg.audio_stride)

    def audio_frames(self, ctx: Tensor, ctx_mask: Tensor, n_tokens: int) -> Tensor:
        """(B, n_tokens * stride, n_mels) reconstructed log-mel frames."""
        out = self.audio_decoder(sincos_1d(n_tokens, self.cfg.d_model, ctx.device), ctx, ctx_mask)
        return out.reshape(out.shape[0], n_tokens * self.cfg.audio_stride, self.n_mels)

    @torch.no_grad()
    def generate(self, ctx: Tensor, ctx_mask: Tensor, bos: int, eos: int, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding from the memory; ids without <bos> / <eos>."""
        B = ctx.shape[0]
        tokens = torch.full((B, 1), bos, dtype=torch.long, device=ctx.device)
        done = torch.zeros(B, dtype=torch.bool, device=ctx.device)
        for _ in range(max_new_tokens):
            lengths = torch.full((B,), tokens.shape[1], dtype=torch.long, device=ctx.device)
            nxt = self.text_logits(ctx, ctx_mask, tokens, lengths)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
        out = []
        for row in tokens[:, 1:].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
        return out

    def cms_modules(self) -> list[nn.Module]:
        """The continuum-memory levels (each with its own period and optimizer), slowest last."""
        cms = getattr(self.memory, "cms", None)
        return list(cms.levels) if cms is not None else []


def parameter_table(model: NLMM) -> list[tuple[str, nn.Module | None]]:
    """(label, module) rows for parameter counts, per part of the model."""
    rows: list[tuple[str, nn.Module | None]] = [("token embedding (shared with the text decoder)", model.token_embed)]
    for m in model.modalities:
        front = model.feature_in[m] if m in model.feature_in else {"image": model.image_tokens, "audio": model.audio_tokens, "text": None}[m]
        label = f"{m} encoder" + (" (on frozen backbone features)" if m in model.feature_in else "")
        rows.append((label, nn.ModuleList([x for x in (front, model.encoders[m]) if x is not None])))
    rows.append(("central memory" + (" (+ CMS levels)" if model.cms_modules() else ""), model.memory))
    rows.append(("text decoder (without the tied embedding)", nn.ModuleList([model.text_decoder.ctx_proj, model.text_decoder.blocks, model.text_decoder.norm])))
    for label, mod in (("image decoder", model.image_decoder), ("audio decoder", model.audio_decoder)):
        if mod is not None:
            rows.append((label, mod))
    rows.append(("embedding projection", nn.ModuleList([x for x in (model.embed_proj, model.embed_skip) if x is not None])))
    return rows
