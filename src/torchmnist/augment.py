"""On-device augmentation of whole training batches, with per-sample random parameters.

It runs on the batch after normalisation, wherever the batch lives, with no per-sample Python.
Random numbers come from torch's global generator on the batch's device, which the seed sets
and every checkpoint saves, so augmented runs are reproducible and resume exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_SHIFT = 2  # pixels
MAX_ROTATION = 10.0  # degrees
SCALE_RANGE = (0.9, 1.1)


def augment(x: torch.Tensor, kind: str, background: float) -> torch.Tensor:
    """x: (B, C, H, W) normalised images whose empty background has the value `background`.

    kind: none, translate, affine, or flip-translate / flip-affine, which first mirror a random
    half of the images left to right (right for clothes, wrong for digits: a mirrored 2 is no 2).
    """
    if kind == "none":
        return x
    if kind.startswith("flip-"):
        x, kind = hflip(x), kind.removeprefix("flip-")
    if kind == "translate":
        return translate(x, background)
    return affine(x, background)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left to right with probability 1/2."""
    mirror = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(-1), x)


def translate(x: torch.Tensor, background: float) -> torch.Tensor:
    """Shift each image by a whole number of pixels, up to MAX_SHIFT each way; exact pixels."""
    b, _, h, w = x.shape
    r = MAX_SHIFT
    padded = F.pad(x, (r, r, r, r), value=background)  # (B, C, H + 2r, W + 2r)
    shifts = torch.randint(0, 2 * r + 1, (b, 2), device=x.device)
    rows = (torch.arange(h, device=x.device) + shifts[:, :1])[:, None, :, None]  # (B, 1, H, 1)
    cols = (torch.arange(w, device=x.device) + shifts[:, 1:])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def affine(x: torch.Tensor, background: float) -> torch.Tensor:
    """Rotate, scale and shift each image by its own random amounts (bilinear resampling)."""
    b, _, h, w = x.shape
    rand = torch.rand(b, 4, device=x.device, dtype=torch.float32)
    angle = (rand[:, 0] * 2 - 1) * math.radians(MAX_ROTATION)
    scale = SCALE_RANGE[0] + rand[:, 1] * (SCALE_RANGE[1] - SCALE_RANGE[0])
    shift = (rand[:, 2:] * 2 - 1) * (2 * MAX_SHIFT / w)  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample fills with zeros outside the image: shift so that zero is the background.
    warped = F.grid_sample(x - background, grid.to(x.dtype), mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return warped + background
