"""Image preprocessing shared by training and serving, and the few image helpers both need.

A served thumbnail (``fit=center_crop``) and a training/evaluation thumbnail go through the same
``decode_rgb`` + ``center_crop`` here, JPEG draft mode included, so the model is evaluated on
exactly the pixels the service feeds it (no train/serve skew; tested). numpy and Pillow only.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Files a folder job or a folder data source picks up.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Formats Pillow may open at all. Others (ICO, EPS via Ghostscript, PSD, ...) can decode or shell
# out inside ``Image.open``, before any pixel limit can be checked.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")

# Signatures of image formats we recognise but refuse (415 rather than "not an image", 400).
REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x00\x00\x01\x00", "ICO"), (0, b"\x00\x00\x02\x00", "CUR"), (0, b"%!PS", "EPS/PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"8BPS", "PSD"), (0, b"%PDF", "PDF"), (0, b"icns", "ICNS"),
    (0, b"DDS ", "DDS"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"), (4, b"jP  ", "JPEG 2000"),
    (0, b"gimp xcf", "XCF"), (0, b"qoif", "QOI"), (0, b"SIMPLE  =", "FITS"), (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"), (4, b"ftypavif", "AVIF"), (0, b"<svg", "SVG"),
    (0, b"\x01\xda", "SGI"), (0, b"\x59\xa6\x6a\x95", "Sun raster"), (0, b"\x76\x2f\x31\x01", "OpenEXR"),
)


def refused_format(data: bytes | bytearray) -> str | None:
    """The name of a recognised but refused format, from the first bytes; None otherwise."""
    head = bytes(data[:16])
    for offset, magic, name in REFUSED_SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive, by ``IMAGE_SUFFIXES``) as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(data: bytes | bytearray | io.BufferedIOBase) -> Image.Image:
    """``Image.open`` restricted to ``ALLOWED_FORMATS`` (reads the header only for these)."""
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return Image.open(fp, formats=ALLOWED_FORMATS)


def decode_rgb(im: Image.Image, thumbnail: int | None = None) -> Image.Image:
    """Decode an opened image to 8-bit RGB, EXIF orientation applied.

    ``thumbnail``: the image will be fitted to this square size, so a JPEG may decode directly at
    1/2, 1/4 or 1/8 scale (draft mode: far cheaper, and still at least that size).
    """
    if thumbnail is not None and im.format == "JPEG":
        im.draft("RGB", (thumbnail, thumbnail))
    im.load()
    return to_rgb(oriented(im))


def oriented(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        return im
    return ImageOps.exif_transpose(im) if orientation not in (1, None) else im


def to_rgb(im: Image.Image) -> Image.Image:
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


def center_crop(im: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and crop the centre, in one resampling pass -> uint8 [size, size, 3]."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(np.ascontiguousarray(im))
    w, h = im.size
    if w == size and h == size:
        return np.asarray(im, dtype=np.uint8)
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                    reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def thumbnail(data: bytes | bytearray, size: int) -> np.ndarray:
    """What ``/v1/encode?fit=center_crop`` feeds the model for these file bytes: uint8 [size, size, 3]."""
    with open_image(data) as im:
        return center_crop(decode_rgb(im, thumbnail=size), size)


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """The top-left crop whose sides are multiples of ``multiple`` (what ``fit=none`` accepts)."""
    h, w = image.shape[:2]
    return image[:h - h % multiple, :w - w % multiple]


def to_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB between uint8 images, per image over the last three axes (inf where identical).

    [H, W, 3] pairs give a 0-d array; [N, H, W, 3] batches give [N].
    """
    diff = a.astype(np.float64) - b.astype(np.float64)
    return psnr_from_mse(np.mean(diff * diff, axis=(-3, -2, -1)))


def psnr_from_mse(mse: float | np.ndarray, peak: float = 255.0) -> np.ndarray:
    """PSNR in dB of a mean squared error on a signal whose range is ``peak`` wide (inf for 0)."""
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / np.asarray(mse, dtype=np.float64))


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
