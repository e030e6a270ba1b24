"""Image bytes in, uint8 RGB arrays out, with the limits checked before decoding.

Pixel counts come from the header (``Image.open`` does not decode), so a decompression bomb is
refused before it allocates anything. The limit is ours, per app; PIL's process-wide
``MAX_IMAGE_PIXELS`` is left alone (its own, higher, bomb error is mapped to 413 as well).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.api.errors import BadRequest, PayloadTooLarge, Unprocessable
from service.bundle.images import center_crop, decode_rgb, open_image

Fit = Literal["center_crop", "none"]


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
        im = open_image(data)
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
        rgb = decode_rgb(im, thumbnail=limits.image_size if fit == "center_crop" else None)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{field}: image exceeds the limit of {limits.max_pixels} pixels",
                              code="too_many_pixels") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise BadRequest(f"{field}: cannot decode the image ({type(e).__name__}: {str(e)[:100]})",
                         code="invalid_image") from None
    if fit == "center_crop":
        return center_crop(rgb, limits.image_size)
    return np.asarray(rgb, dtype=np.uint8)
