"""Image preprocessing without torchvision: resize (+ center crop) and normalise. The numpy core
(``image_array``) is shared with edge_glass.runtime, which runs without torch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

ResizeMode = Literal["center_crop", "squash"]


def image_array(
    img: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: ResizeMode = "center_crop",
    resample: int = Image.BICUBIC,
) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32 array, ``(pixel/255 - mean) / std`` per channel.

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
    x = (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - m) / s)


def image_to_tensor(img: Image.Image, *args, **kwargs) -> "torch.Tensor":
    """``image_array`` (same arguments) as a torch tensor."""
    import torch

    return torch.from_numpy(image_array(img, *args, **kwargs))
