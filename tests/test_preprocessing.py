"""Training and serving share one preprocessing (``service.bundle.images``): a served thumbnail
(``fit=center_crop``) is pixel for pixel the thumbnail training evaluates on."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.bundle.images import IMAGE_SUFFIXES, center_crop, list_images, psnr, thumbnail
from service.bundle.intake import IntakeLimits, take

SIZE = 64


def photo_jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(width * height)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx % 251, yy % 241, (xx + yy) % 239], -1).astype(np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("width,height,orientation", [(500, 375, None), (375, 500, 6), (1200, 300, None)])
def test_served_thumbnail_equals_training_thumbnail(tmp_path, width, height, orientation):
    pytest.importorskip("torch")
    from training.data import FolderSource

    data = photo_jpeg(width, height, orientation)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):  # enough files that the hash split holds some out
        (folder / f"p{i:02d}.jpg").write_bytes(data)
    source = FolderSource.build(folder, SIZE, val_fraction=0.5)
    held = source.heldout()
    limits = IntakeLimits(image_size=SIZE, multiple=8, max_pixels=4096 ** 2, max_native_pixels=1024 ** 2)
    served = take(data, "center_crop", limits)[0]
    assert served.shape == (SIZE, SIZE, 3) and held.shape[1:] == served.shape
    for thumb in held:
        np.testing.assert_array_equal(thumb, served)
    np.testing.assert_array_equal(thumbnail(data, SIZE), served)


def test_jpeg_draft_mode_is_part_of_the_contract():
    """Draft decoding changes pixels; both sides use it, so the thumbnail differs from a full decode."""
    data = photo_jpeg(1024, 768)
    with Image.open(io.BytesIO(data)) as im:
        full = center_crop(im.convert("RGB"), SIZE)
    drafted = thumbnail(data, SIZE)
    assert not np.array_equal(full, drafted)
    assert psnr(full, drafted) > 25  # close, but not the same pixels


def test_psnr_per_image_and_identical():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    out = psnr(a, b)
    assert out.shape == (2,) and np.isinf(out[0]) and out[1] == pytest.approx(0.0)
    assert float(psnr(a[0], a[0] + 1)) == pytest.approx(10 * np.log10(255 ** 2))


def test_one_suffix_set(tmp_path):
    """Jobs and training find the same images, by the contract's one suffix set and listing."""
    pytest.importorskip("torch")
    from training.data import split_source

    assert {".jpg", ".png", ".webp"} <= IMAGE_SUFFIXES
    for rel in ("a.jpg", "b.PNG", "notes.txt", "sub/c.webp", "sub/d.tiff", "e.ico"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listed = list_images(tmp_path)
    assert listed == ["a.jpg", "b.PNG", "sub/c.webp", "sub/d.tiff"]
    split = split_source(str(tmp_path), val_fraction=0.5)
    found = {p.relative_to(tmp_path).as_posix() for p in split.train_files + split.heldout_files}
    assert found == set(listed)
