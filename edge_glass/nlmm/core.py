"""The trainable core of an NL-MM run: the network, its EMA weights and the training objective.

Loss of a batch (weights from ``loss:``; a term with no rows in the global batch is 0):

    text         next-token cross-entropy of the caption / transcript, conditioned on the memory of the
                 sample's image (when it has one) or else of its audio: captions from photos, transcripts
                 from speech, and never a caption from its own spoken form
    image        MSE of the image patches reconstructed from the fused memory of image + audio
    audio        MSE of the log-mel frames (real frames only) reconstructed from that fused memory
    contrastive  Matryoshka InfoNCE between the pooled memories of each modality alone, for every pair
                 of modalities (image-text, audio-text, image-audio) over the rows that have both,
                 gathered from all processes; identical inputs are not negatives

Every mean is over the GLOBAL batch (token / row counts summed over processes before dividing), so a
2-process run computes the same loss and gradients as 1 process at the same global batch. Every
modality is encoded on every process, present in its slice or not, so all processes reach the same
collectives (a term whose rows sit on one process only would otherwise deadlock the others).
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..losses import gather, matryoshka_info_nce, world
from .model import CONTEXT, NLMM, patchify
from .optim import EMA

Tensor = torch.Tensor
PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))


def global_sum(x: Tensor) -> Tensor:
    """The sum of a (detached) tensor over processes."""
    if world()[1] == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def global_mean(total: Tensor, count: Tensor) -> Tensor:
    """total / (count summed over processes), scaled by the world size: after DDP averages the
    gradients this is the gradient of the global mean."""
    n = global_sum(count.to(total.dtype))
    return total * world()[1] / n.clamp_min(1.0)


def fingerprint(x: Tensor, lengths: Tensor | None = None) -> Tensor:
    """(B, ...) -> (B,) int64 content keys: equal inputs give equal keys, whatever the padding of the
    batch they sit in (row i is read up to ``lengths[i]`` along dim 1). Hashes of the bytes, so a
    clip or caption on one process and its twin on another are recognised as the same."""
    rows = x.detach().cpu()
    out = []
    for i in range(rows.shape[0]):
        row = rows[i] if lengths is None else rows[i, : int(lengths[i])]
        out.append(int.from_bytes(hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=7).digest(), "big"))
    return torch.tensor(out, dtype=torch.long, device=x.device)


def content_ids(keys: Tensor) -> Tensor:
    return torch.unique(keys, return_inverse=True)[1]


class NLMMCore(nn.Module):
    def __init__(self, net: NLMM, ema: float | None = None):
        super().__init__()
        self.net = net
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
        self.ema = EMA(net, ema) if ema else None

    @property
    def device(self) -> torch.device:
        return self.net.device

    def scale(self, tcfg) -> Tensor:
        return self.log_scale.exp().clamp(1.0 / tcfg.max, 1.0 / tcfg.min)

    def forward(self, batch: dict[str, Tensor], lcfg: Any) -> tuple[Tensor, dict[str, float]]:
        net = self.net
        streams = net.encode_all(batch, skip_absent=False)  # the same terms and collectives on every process
        terms: dict[str, Tensor] = {}
        zero = self.log_scale * 0.0
        alone = {m: net.context(streams, [m]) for m in streams}

        if lcfg.text and "text" in streams:
            ctx_rows = [(alone[m], batch[f"{m}_mask"]) for m in CONTEXT if m in alone]
            if ctx_rows:
                ctx, has = ctx_rows[0][0][0], ctx_rows[0][1]
                ctx_mask = ctx_rows[0][0][1]
                for (c, cm), present in ctx_rows[1:]:  # rows without the first context take the next one
                    if c.shape[1] != ctx.shape[1]:  # concat memory: lengths differ -> pad to the longer
                        n = max(c.shape[1], ctx.shape[1])
                        c, cm = F.pad(c, (0, 0, 0, n - c.shape[1])), F.pad(cm, (0, n - cm.shape[1]))
                        ctx, ctx_mask = F.pad(ctx, (0, 0, 0, n - ctx.shape[1])), F.pad(ctx_mask, (0, n - ctx_mask.shape[1]))
                    take = (~has & present)
                    ctx = torch.where(take[:, None, None], c, ctx)
                    ctx_mask = torch.where(take[:, None], cm, ctx_mask)
                    has = has | present
                rows = has & batch["text_mask"]
                tokens, lengths = batch["text"], batch["text_lengths"]
                logits = net.text_logits(ctx, ctx_mask, tokens[:, :-1], (lengths - 1).clamp_min(0))
                target = tokens[:, 1:]
                valid = (torch.arange(target.shape[1], device=target.device)[None] < (lengths - 1)[:, None]) & rows[:, None]
                ce = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
                terms["text"] = global_mean((ce * valid).sum(), valid.sum())
        fused_names = [m for m in CONTEXT if m in streams]
        if fused_names and (lcfg.image or lcfg.audio):
            fused, fused_mask = net.context(streams, fused_names)
            if lcfg.image and "image" in streams:
                rows = batch["image_mask"]
                target = patchify(batch["image"], net.cfg.patch_size)
                pred = net.image_patches(fused, fused_mask, batch["image"].shape[-2:])
                err = (pred.float() - target).pow(2).mean(-1) * rows[:, None]
                terms["image"] = global_mean(err.sum(), rows.sum() * target.shape[1])
            if lcfg.audio and "audio" in streams:
                mel, frames = batch["audio"], batch["audio_lengths"]
                pred = net.audio_frames(fused, fused_mask, net.audio_token_count(mel.shape[1]))[:, : mel.shape[1]]
                valid = (torch.arange(mel.shape[1], device=mel.device)[None] < frames[:, None]) & batch["audio_mask"][:, None]
                err = (pred.float() - mel).pow(2).mean(-1) * valid
                terms["audio"] = global_mean(err.sum(), valid.sum())
        if lcfg.contrastive:
            emb = {m: net.embed_memory(*alone[m]) for m in alone}
            dims = net.cfg.embed_dims
            scale = self.scale(lcfg.temperature)
            parts, per_dim = [], {}
            inputs = {"image": (batch["image"], None), "audio": (batch["audio"], batch["audio_lengths"]),
                      "text": (batch["text"], batch["text_lengths"])}
            for a, b in PAIRS:
                if a not in emb or b not in emb:
                    continue
                both = gather((batch[f"{a}_mask"] & batch[f"{b}_mask"]).to(torch.uint8)).bool()  # gloo gathers no bool
                if int(both.sum()) < 2:
                    continue
                ea, eb = gather(emb[a])[both], gather(emb[b])[both]
                ka = content_ids(gather(fingerprint(*inputs[a]))[both])
                kb = content_ids(gather(fingerprint(*inputs[b]))[both])
                na = {d: F.normalize(ea[:, :d].float(), dim=-1) for d in dims}
                nb = {d: F.normalize(eb[:, :d].float(), dim=-1) for d in dims}
                parts.append(matryoshka_info_nce(na, nb, scale, ka, kb, {d: 1.0 for d in dims}, per_dim))
            if parts:
                terms["contrastive"] = sum(parts) / len(parts)
        loss = zero
        for name, value in terms.items():
            loss = loss + getattr(lcfg, name) * value
        metrics = {f"loss_{k}": float(v.detach()) / (world()[1] if k != "contrastive" else 1) for k, v in terms.items()}
        metrics["logit_scale"] = float(self.scale(lcfg.temperature).detach())
        return loss, metrics

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint (with ``ema.*``) restores everything; a run's saved weights (no ``ema.*``:
        the EMA weights saved as the network's, e.g. the best step's) set the EMA weights too."""
        out = super().load_state_dict(state_dict, strict=False, assign=assign)
        if self.ema is not None and not any(k.startswith("ema.") for k in state_dict):
            with torch.no_grad():
                params = dict(self.net.named_parameters())
                for n, w in self.ema.weights().items():
                    w.copy_(params[n])
            out = type(out)(missing_keys=[k for k in out.missing_keys if not k.startswith("ema.")], unexpected_keys=out.unexpected_keys)
        if strict and (out.missing_keys or out.unexpected_keys):
            raise RuntimeError(f"NLMMCore.load_state_dict: missing {out.missing_keys[:5]}, unexpected {out.unexpected_keys[:5]}")
        return out

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.net)

    @contextmanager
    def inference_weights(self) -> Iterator[NLMM]:
        """``with core.inference_weights() as net:`` the network carrying its EMA weights (swapped in
        place: no copy of the model), the live weights back on exit; the network itself without EMA."""
        if self.ema is None:
            yield self.net
            return
        params = dict(self.net.named_parameters())
        live = {}
        with torch.no_grad():
            for n, w in self.ema.weights().items():
                live[n] = params[n].detach().clone()
                params[n].copy_(w)
        try:
            yield self.net
        finally:
            with torch.no_grad():
                for n, w in live.items():
                    params[n].copy_(w)
