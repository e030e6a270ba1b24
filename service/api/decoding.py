"""Image bytes in, uint8 RGB arrays out, with every limit checked before decoding.

``probe_image`` reads the header only: the format (an allow-list; formats Pillow knows but that
could decode or shell out while opening, such as ICO, EPS or PSD, are 415), the size against the
pixel limits (a decompression bomb is refused before it allocates anything) and the ``fit=none``
rules. ``decode_image`` then decodes; the router decides by the header pixels whether that runs
inline or in the work pool. The limit is ours, per app; PIL's process-wide ``MAX_IMAGE_PIXELS``
is left alone (its own, higher, bomb error is mapped to 413 as well).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.api.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from service.bundle.images import ALLOWED_FORMATS, center_crop, decode_rgb, open_image, refused_format

Fit = Literal["center_crop", "none"]

ALLOWED = ", ".join(ALLOWED_FORMATS)


@dataclass(frozen=True)
class ImageLimits:
    image_size: int  # the model's square input size (fit=center_crop)
    multiple: int  # fit=none sides must be multiples of this (the coarsest stride)
    max_pixels: int  # refused before decoding (413)
    max_native_pixels: int  # fit=none and decode work at this size at most (422)

    def output_pixels(self, header_pixels: int, fit: Fit) -> int:
        """Pixels of the array an image of ``header_pixels`` becomes."""
        return self.image_size ** 2 if fit == "center_crop" else header_pixels


@dataclass
class Probe:
    """An opened image whose header passed every check; ``decode_image`` turns it into pixels."""

    image: Image.Image
    field: str

    @property
    def pixels(self) -> int:
        w, h = self.image.size
        return w * h


def _too_big(field: str, limits: ImageLimits) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: image exceeds the limit of {limits.max_pixels} pixels", code="too_many_pixels")


def probe_image(data: bytes | bytearray, fit: Fit, limits: ImageLimits, field: str) -> Probe:
    """Open one image's header and check it; ``field`` names it in error messages."""
    if not data:
        raise BadRequest(f"{field}: empty file", code="invalid_image")
    refused = refused_format(data)
    if refused:
        raise UnsupportedMediaType(f"{field}: {refused} images are not accepted; send one of {ALLOWED}",
                                   code="unsupported_image_format")
    try:
        im = open_image(data)
    except Image.DecompressionBombError:
        raise _too_big(field, limits) from None
    except UnidentifiedImageError:
        raise BadRequest(f"{field}: not an image in a format we can read ({ALLOWED})", code="invalid_image") from None
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
    return Probe(im, field)


def decode_image(probe: Probe, fit: Fit, limits: ImageLimits) -> np.ndarray:
    """Decode a probed image to uint8 [H, W, 3] (``fit=center_crop``: [size, size, 3])."""
    try:
        rgb = decode_rgb(probe.image, thumbnail=limits.image_size if fit == "center_crop" else None)
    except Image.DecompressionBombError:
        raise _too_big(probe.field, limits) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise BadRequest(f"{probe.field}: cannot decode the image ({type(e).__name__}: {str(e)[:100]})",
                         code="invalid_image") from None
    if fit == "center_crop":
        return center_crop(rgb, limits.image_size)
    return np.asarray(rgb, dtype=np.uint8)


def load_image(data: bytes | bytearray, fit: Fit, limits: ImageLimits, field: str) -> np.ndarray:
    """Probe and decode one image in one go (tools and tests; the router splits the two steps)."""
    return decode_image(probe_image(data, fit, limits, field), fit, limits)
