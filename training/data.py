"""Training crops from real images: the built-in ``photos`` set or any image folder.

Both sources hold images out *whole* (by photo, or by a hash of the file path), so held-out
metrics never see a pixel of a training image. Randomness comes only from the numpy Generator
passed in, which the trainer checkpoints: a resumed run draws the same crops.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.bundle.images import IMAGE_SUFFIXES, decode_rgb, open_image, thumbnail

log = logging.getLogger(__name__)

# Colour photographs that ship inside scikit-image (and one in matplotlib). Two are held out whole.
TRAIN_PHOTOS = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg", "rocket.jpg", "mpl:grace_hopper.jpg"]
HELDOUT_PHOTOS = ["chelsea.png", "coffee.png"]


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3] exactly as the service does (orientation, modes)."""
    with open(path, "rb") as f, open_image(f) as im:
        return np.asarray(decode_rgb(im))


def photo_path(name: str) -> Path:
    if name.startswith("mpl:"):
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / name[4:]
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def pyramid(image: np.ndarray, min_side: int) -> list[np.ndarray]:
    """The image at scales 1, 1/2, 1/4, ... while its shorter side stays >= min_side.

    Cropping at several scales teaches both fine texture and whole-object structure, and
    precomputing the levels keeps per-crop work to a slice.
    """
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.BOX)))
    return levels


def grid_crops(image: np.ndarray, size: int, stride: int) -> list[np.ndarray]:
    """size x size crops on a regular grid with the given stride, row by row."""
    h, w = image.shape[:2]
    return [image[y:y + size, x:x + size] for y in range(0, h - size + 1, stride)
            for x in range(0, w - size + 1, stride)]


def random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = image[y:y + size, x:x + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


@dataclass
class PhotoSource:
    """Random multi-scale crops of the built-in photos; held-out crops from other photos."""

    size: int
    train_levels: list[np.ndarray] = field(default_factory=list)
    weights: np.ndarray | None = None
    heldout_images: list[np.ndarray] = field(default_factory=list)
    skipped: int = 0

    @classmethod
    def build(cls, size: int) -> PhotoSource:
        src = cls(size)
        for name in TRAIN_PHOTOS:
            src.train_levels.extend(pyramid(load_rgb(photo_path(name)), size))
        # Sample each pyramid level in proportion to the number of distinct crops it offers.
        areas = np.array([(lv.shape[0] - size + 1) * (lv.shape[1] - size + 1) for lv in src.train_levels], float)
        src.weights = np.sqrt(areas) / np.sqrt(areas).sum()
        src.heldout_images = [load_rgb(photo_path(n)) for n in HELDOUT_PHOTOS]
        return src

    def sample_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        picks = rng.choice(len(self.train_levels), size=n, p=self.weights)
        return np.stack([random_crop(rng, self.train_levels[i], self.size) for i in picks])

    def heldout(self, max_images: int | None = None) -> np.ndarray:
        # Half-overlapping crops at every scale: about 380 held-out 64x64 views of two photos.
        crops = [c for img in self.heldout_images for lv in pyramid(img, self.size)
                 for c in grid_crops(lv, self.size, self.size // 2)]
        return np.stack(crops[:max_images])


def is_heldout(relative: str, fraction: float) -> bool:
    """Deterministic split by file path: stable across machines, runs and added files."""
    digest = hashlib.sha1(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


@dataclass
class FolderSource:
    """Random crops from an image folder (recursive; the suffixes the service's jobs take); unreadable
    files are skipped. Held-out images are the service's thumbnails of the held-out files."""

    root: Path
    size: int
    train_files: list[Path]
    heldout_files: list[Path]
    skipped: int = 0
    bad: set[Path] = field(default_factory=set)

    @classmethod
    def build(cls, root: str | Path, size: int, val_fraction: float) -> FolderSource:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        held = [p for p in files if is_heldout(str(p.relative_to(root)), val_fraction)]
        train = [p for p in files if p not in set(held)]
        if not train or not held:
            raise ValueError(f"{root}: {len(files)} images leave an empty train or held-out split "
                             f"at val_fraction={val_fraction}")
        return cls(root, size, train, held)

    def _load(self, path: Path) -> np.ndarray | None:
        if path in self.bad:
            return None
        try:
            image = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            self.bad.add(path)
            self.skipped += 1
            log.warning("skipping unreadable image %s: %s", path, e)
            return None
        if min(image.shape[:2]) < self.size:
            image = np.asarray(Image.fromarray(image).resize(
                _cover(image.shape[1], image.shape[0], self.size), Image.BICUBIC))
        return image

    def sample_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        crops = []
        while len(crops) < n:
            if len(self.bad) >= len(self.train_files):
                raise RuntimeError(f"every training image under {self.root} is unreadable")
            image = self._load(self.train_files[rng.integers(len(self.train_files))])
            if image is None:
                continue
            # Random scale: a square of side in [size, shorter side], resized down to size.
            side = int(round(np.exp(rng.uniform(np.log(self.size), np.log(min(image.shape[:2]))))))
            crop = random_crop(rng, image, side)
            if side != self.size:
                crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((self.size,) * 2, Image.BOX))
            crops.append(crop)
        return np.stack(crops)

    def heldout(self, max_images: int | None = None) -> np.ndarray:
        """Each held-out file as ``/v1/encode?fit=center_crop`` sees it (same decoding and resampling)."""
        crops = []
        for path in self.heldout_files:
            if path in self.bad:
                continue
            try:
                crops.append(thumbnail(path.read_bytes(), self.size))
            except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
                self.bad.add(path)
                self.skipped += 1
                log.warning("skipping unreadable image %s: %s", path, e)
            if max_images and len(crops) >= max_images:
                break
        if not crops:
            raise RuntimeError(f"no readable held-out images under {self.root}")
        return np.stack(crops)


def _cover(w: int, h: int, size: int) -> tuple[int, int]:
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def make_source(data: str, size: int, val_fraction: float = 0.1) -> PhotoSource | FolderSource:
    if data == "photos":
        return PhotoSource.build(size)
    return FolderSource.build(data, size, val_fraction)
