"""Image bytes in, uint8 RGB arrays out (and back to PNG), with the limits checked before decoding.

Pixel counts come from the header (``Image.open`` does not decode), so a decompression bomb is
refused before it allocates anything. The limit is ours, per app; PIL's process-wide
``MAX_IMAGE_PIXELS`` is left alone (its own, higher, bomb error is mapped to 413 as well).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, PayloadTooLarge, Unprocessable

Fit = Literal["center_crop", "none"]
ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}



@dataclass(frozen=True)
class ImageLimits:
    image_size: int  # the model's square input size (fit=center_crop)
    multiple: int  # fit=none sides must be multiples of this (the coarsest stride)
    max_pixels: int  # refused before decoding (413)
    max_native_pixels: int  # fit=none and decode work at this size at most (422)


def load_image(data: bytes | bytearray, fit: Fit, limits: ImageLimits, field: str) -> np.ndarray:
    """Decode one image to uint8 [H, W, 3]; ``field`` names it in error messages."""
    if not data:
        raise BadRequest(f"{field}: empty file", code="invalid_image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{field}: image exceeds the limit of {limits.max_pixels} pixels",
                              code="too_many_pixels") from None
    except UnidentifiedImageError:
        raise BadRequest(f"{field}: not an image in a format we can read", code="invalid_image") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on malformed headers
        raise BadRequest(f"{field}: cannot read the image ({type(e).__name__})", code="invalid_image") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(f"{field}: {w}x{h} exceeds the limit of {limits.max_pixels} pixels",
                              code="too_many_pixels")
    if w == 0 or h == 0:
        raise BadRequest(f"{field}: image has no pixels", code="invalid_image")
    if fit == "none":
        # Checked on the header, before decoding; an EXIF rotation swaps the sides, which changes neither.
        if w % limits.multiple or h % limits.multiple:
            raise Unprocessable(f"{field}: with fit=none both sides must be multiples of {limits.multiple}, "
                                f"got {w}x{h}", code="invalid_size")
        if w * h > limits.max_native_pixels:
            raise Unprocessable(f"{field}: with fit=none at most {limits.max_native_pixels} pixels, "
                                f"got {w}x{h}", code="invalid_size")
    try:
        if fit == "center_crop" and im.format == "JPEG":
            # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far cheaper, and we downscale anyway.
            im.draft("RGB", (limits.image_size, limits.image_size))
        im.load()
        im = _oriented(im)
        rgb = _to_rgb(im)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{field}: image exceeds the limit of {limits.max_pixels} pixels",
                              code="too_many_pixels") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise BadRequest(f"{field}: cannot decode the image ({type(e).__name__}: {str(e)[:100]})",
                         code="invalid_image") from None
    if fit == "center_crop":
        rgb = _center_crop(rgb, limits.image_size)
    return np.asarray(rgb, dtype=np.uint8)


def _oriented(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        return im
    return ImageOps.exif_transpose(im) if orientation not in (1, None) else im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. Transparent pixels go onto white; 16-bit data is scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = np.clip(a, 0, 255) if a.max(initial=0) > 1.0 else np.clip(a, 0, 1) * 255
        else:
            a = np.clip(a.astype(np.float32) / 257.0, 0, 255)  # 16-bit range -> 8-bit
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in _ALPHA_MODES:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre, in one resampling pass."""
    w, h = im.size
    if w == size and h == size:
        return im
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                     reducing_gap=3.0)


def to_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB between two uint8 images; None when they are identical (infinite PSNR)."""
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return None if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] into one uint8 image with white gutters.

    ``columns`` None gives a near-square grid.
    """
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid
