"""The one image intake: which image files we take, which we refuse and how, for every caller.

The service (``/v1/encode``, ``/v1/reconstruct``) and the three folder-job modes (HTTP, ``--local``,
``--ray``) all come through here, so the same file gets the same answer everywhere:

1. ``inspect`` reads the header only: an allow-list of formats (formats Pillow knows but that could
   decode or shell out while opening, such as ICO, EPS or PSD, are refused by their signature), the
   size against the one pixel limit (a decompression bomb is refused before it allocates anything)
   and, for ``fit="none"``, the native-size rules.
2. ``Header.decode`` turns the pixels out: JPEG draft mode, EXIF orientation, 8-bit RGB, and the
   model's thumbnail for ``fit="center_crop"`` (``service.bundle.images``, shared with training).

Every refusal is one ``ImageRefused`` carrying a code from ``REFUSALS``, a message and the pixels the
header showed. The code decides everything downstream: the HTTP status (the contract below, which the
API applies in one place), and whether a folder job records the file and goes on.
The pixel limit is one setting, ``VQTOK_MAX_IMAGE_PIXELS``, read by the service and the jobs alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.bundle.images import ALLOWED_FORMATS, ORIENTATION, center_crop, decode_rgb, open_image, refused_format

Fit = Literal["center_crop", "none"]

# The one pixel limit and its setting. Pillow's process-wide MAX_IMAGE_PIXELS is left alone: ours is
# lower, and Pillow's own bomb error is mapped to the same refusal should the setting be raised past it.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PIXELS_SETTING = "VQTOK_MAX_IMAGE_PIXELS"

# Refusal codes and the HTTP status the service answers for each: a file's code is its error, in
# ``errors.jsonl`` and on the wire alike.
REFUSALS: dict[str, int] = {
    "invalid_image": 400,  # empty, not an image, truncated or corrupt
    "too_many_pixels": 413,  # over the pixel limit (decompression bombs)
    "unsupported_image_format": 415,  # a format we recognise and refuse (PSD, ICO, EPS, HEIC, ...)
    "invalid_size": 422,  # fit="none": sides not multiples of the stride, or too many pixels to work at
}

_ALLOWED = ", ".join(ALLOWED_FORMATS)
_TRANSPOSED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as displayed, EXIF orientation applied (header only)."""
    w, h = im.size
    try:
        transposed = im.getexif().get(ORIENTATION, 1) in _TRANSPOSED
    except Exception:  # noqa: BLE001 - decode_rgb ignores a broken EXIF block too
        transposed = False
    return (w, h) if transposed else (h, w)


def max_image_pixels() -> int:
    """The pixel limit: ``VQTOK_MAX_IMAGE_PIXELS`` when set, else ``MAX_IMAGE_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_SETTING, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_PIXELS_SETTING} must be a positive integer, got {value!r}")
    return int(value)


class ImageRefused(Exception):
    """An image file we do not take. ``code`` is one of ``REFUSALS``; ``pixels`` is what the header
    showed (0 when it could not be read)."""

    def __init__(self, code: str, message: str, pixels: int = 0):
        if code not in REFUSALS:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(message)
        self.code, self.message, self.pixels = code, message, pixels

    @property
    def status(self) -> int:
        return REFUSALS[self.code]

    def naming(self, field: str) -> ImageRefused:
        """The same refusal, its message prefixed with the field a caller has to fix (``images[2]``)."""
        return ImageRefused(self.code, f"{field}: {self.message}", self.pixels)

    def __reduce__(self):  # travels back from decode-pool processes and Ray tasks
        return ImageRefused, (self.code, self.message, self.pixels)


@dataclass(frozen=True)
class IntakeLimits:
    image_size: int  # the model's square input (fit="center_crop")
    multiple: int = 1  # fit="none": both sides must be multiples of this (the coarsest stride)
    max_pixels: int = MAX_IMAGE_PIXELS  # refused before decoding
    max_native_pixels: int = 1024 * 1024  # fit="none": pixels the model may work on at native size

    def output_pixels(self, header_pixels: int, fit: Fit) -> int:
        """Pixels of the array an image of ``header_pixels`` becomes."""
        return self.image_size ** 2 if fit == "center_crop" else header_pixels


@dataclass
class Header:
    """An opened image whose header passed every check; ``decode`` turns it into pixels."""

    image: Image.Image
    fit: Fit
    limits: IntakeLimits

    @property
    def pixels(self) -> int:
        w, h = self.image.size
        return w * h

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the source as displayed; read it before ``decode`` (draft mode shrinks JPEGs)."""
        return displayed_size(self.image)

    def decode(self) -> np.ndarray:
        """uint8 [H, W, 3] (``fit="center_crop"``: [size, size, 3])."""
        crop = self.fit == "center_crop"
        try:
            rgb = decode_rgb(self.image, thumbnail=self.limits.image_size if crop else None)
        except Image.DecompressionBombError:
            raise _too_many(self.pixels, self.limits) from None
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise ImageRefused("invalid_image", f"cannot decode the image ({type(e).__name__}: {str(e)[:100]})",
                               self.pixels) from None
        return center_crop(rgb, self.limits.image_size) if crop else np.asarray(rgb, dtype=np.uint8)

    def close(self) -> None:
        self.image.close()


def _too_many(pixels: int, limits: IntakeLimits, dims: str = "image") -> ImageRefused:
    return ImageRefused("too_many_pixels", f"{dims} exceeds the limit of {limits.max_pixels} pixels "
                        f"({MAX_PIXELS_SETTING})", pixels)


def inspect(data: bytes | bytearray, fit: Fit, limits: IntakeLimits) -> Header:
    """Open one image's header and check it; raises ``ImageRefused``."""
    if not data:
        raise ImageRefused("invalid_image", "empty file")
    refused = refused_format(data)
    if refused:
        raise ImageRefused("unsupported_image_format", f"{refused} images are not accepted; send one of {_ALLOWED}")
    try:
        im = open_image(data)
    except Image.DecompressionBombError:
        raise _too_many(0, limits) from None
    except UnidentifiedImageError:
        raise ImageRefused("invalid_image", f"not an image in a format we can read ({_ALLOWED})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on malformed headers
        raise ImageRefused("invalid_image", f"cannot read the image ({type(e).__name__})") from None
    w, h = im.size
    if w * h > limits.max_pixels:
        raise _too_many(w * h, limits, f"{w}x{h}")
    if w == 0 or h == 0:
        raise ImageRefused("invalid_image", "image has no pixels")
    if fit == "none":
        # Checked on the header, before decoding; an EXIF rotation swaps the sides, which changes neither.
        if w % limits.multiple or h % limits.multiple:
            raise ImageRefused("invalid_size", f"with fit=none both sides must be multiples of {limits.multiple}, "
                               f"got {w}x{h}", w * h)
        if w * h > limits.max_native_pixels:
            raise ImageRefused("invalid_size", f"with fit=none at most {limits.max_native_pixels} pixels, "
                               f"got {w}x{h}", w * h)
    return Header(im, fit, limits)


def take(data: bytes | bytearray, fit: Fit, limits: IntakeLimits) -> tuple[np.ndarray, tuple[int, int]]:
    """Inspect and decode in one go: the pixels and the source (height, width). The folder jobs' path."""
    header = inspect(data, fit, limits)
    try:
        size = header.size  # before decoding: JPEG draft mode shrinks the opened image's size
        return header.decode(), size
    finally:
        header.close()
