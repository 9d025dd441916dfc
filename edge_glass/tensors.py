"""Small tensor helpers shared across layers."""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (x's shape without the last axis) is True; rows
    with no True entry give 0. (B, T, D), (B, T) -> (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim, keepdim=keepdim) / w.sum(dim, keepdim=keepdim).clamp_min(1.0)


def to_device(obj, device: torch.device | str):
    """Move tensors inside ``obj`` (a tensor, NamedTuple, tuple, list or dict; anything else as
    it is) to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
