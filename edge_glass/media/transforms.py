"""Image preprocessing without torchvision: resize (+ center crop) and normalise to a tensor."""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

ResizeMode = Literal["center_crop", "squash"]


def image_to_tensor(
    img: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: ResizeMode = "center_crop",
    resample: int = Image.BICUBIC,
) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float tensor, ``(pixel/255 - mean) / std`` per channel.

    center_crop: scale the shorter side to ``size`` and cut the centre square (keeps aspect);
    squash: resize straight to size x size.
    """
    if resize == "squash":
        img = img.resize((size, size), resample)
    else:
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s
