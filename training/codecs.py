"""JPEG and WebP (Pillow) at a given number of bytes: the baselines a learned code must beat.

The quality setting is binary-searched for the best quality whose file fits the byte budget
(file size grows with quality). Where even the lowest quality does not fit, that smallest file is
used and marked ``over_budget``, so a comparison is never flattered by a silently smaller baseline.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.bundle.images import psnr

QUALITY_RANGE = {"JPEG": (1, 95), "WEBP": (0, 100)}


@dataclass
class Coded:
    format: str
    quality: int
    bytes: int
    psnr: float
    over_budget: bool
    decoded: np.ndarray = field(repr=False)


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def at_budget(image: np.ndarray, fmt: str, budget: int) -> Coded:
    """The highest-quality ``fmt`` file of ``image`` with at most ``budget`` bytes."""
    lo, hi = QUALITY_RANGE[fmt]
    best: tuple[int, bytes] | None = None
    while lo <= hi:
        q = (lo + hi) // 2
        data = encode(image, fmt, q)
        if len(data) <= budget:
            best, lo = (q, data), q + 1
        else:
            hi = q - 1
    over = best is None
    if over:
        q = QUALITY_RANGE[fmt][0]
        best = (q, encode(image, fmt, q))
    q, data = best
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB"))
    return Coded(fmt, q, len(data), float(psnr(image, decoded)), over, decoded)
