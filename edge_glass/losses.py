"""Contrastive losses: symmetric InfoNCE gathered across processes, and its Matryoshka sum.

Duplicates inside a batch are not negatives: two samples that share an input of either side
(two captions of one image, one caption text spoken by two speakers...) are masked out of each
other's softmax denominators, identified by integer content keys (equal key = equal input).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B_local, ...) on every process -> (W * B_local, ...) in rank order.

    Gradients flow through this process's own shard only (the others arrive detached). Every
    process computes the same global loss, so the true gradient w.r.t. a shard is W times what
    one process sees through it after the optimizer's gradient averaging; the local shard's
    gradient is scaled by W to make the averaged update equal the single-process one.
    """
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(size)) if x.requires_grad else x
    return torch.cat(parts)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of a (B, d) and b (B, d), both L2-normalised.

    scale: logit scale (1 / temperature); key_a, key_b (B,) int content ids of each side.
    Off-diagonal pairs sharing key_a or key_b are removed from the softmax (not negatives).
    """
    logits = scale * (a @ b.t())
    n = logits.shape[0]
    same = (key_a[:, None] == key_a[None, :]) | (key_b[:, None] == key_b[None, :])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def matryoshka_info_nce(
    a: dict[int, torch.Tensor],
    b: dict[int, torch.Tensor],
    scale: torch.Tensor,
    key_a: torch.Tensor,
    key_b: torch.Tensor,
    weights: dict[int, float],
    per_dim: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sum over nested dims d of info_nce(a[d], b[d]); weights sum to 1 (dims with
    weight 0 are skipped, which is how one sampled dim per step is expressed). ``per_dim``, when
    given, receives each computed dim's (detached) InfoNCE."""
    total = sum(weights.values())
    out = 0
    for d, w in weights.items():
        if w > 0:
            loss = info_nce(a[d], b[d], scale, key_a, key_b)
            if per_dim is not None:
                per_dim[d] = loss.detach()
            out = out + (w / total) * loss
    return out  # type: ignore[return-value]
