"""Training data: image folders and the built-in ``photos``, split by file, decoded once into a packed cache.

Every source holds images out *whole* (the built-in photos by name, folders by a hash of the file
path), so held-out metrics never see a pixel of a training image. The training files of all sources
are decoded once into one packed uint8 buffer (shorter side at most ``cache_side``) saved under the
cache directory, so later runs and the priors load it in a second instead of decoding JPEGs per step.
Random multi-scale crops are cut from that buffer with torch ops on the device it lives on.
Randomness comes only from the numpy Generator passed in, which the trainer checkpoints: a resumed
run draws the same crops.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from service.bundle.images import IMAGE_SUFFIXES, decode_rgb, list_images, open_image, thumbnail

log = logging.getLogger(__name__)

# Colour photographs that ship inside scikit-image (and one in matplotlib). Two are held out whole.
TRAIN_PHOTOS = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg", "rocket.jpg", "mpl:grace_hopper.jpg"]
HELDOUT_PHOTOS = ["chelsea.png", "coffee.png"]
PHOTOS_TERMS = "sample images bundled with scikit-image and matplotlib (see their licences)"


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
    """The image at scales 1, 1/2, 1/4, ... while its shorter side stays >= min_side."""
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


def is_heldout(relative: str, fraction: float) -> bool:
    """Deterministic split by file path: stable across machines, runs and added files."""
    digest = hashlib.sha1(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def thumbnails(files: list[Path], size: int, bad: set[Path], max_images: int | None = None) -> np.ndarray:
    """Each file as ``/v1/encode?fit=center_crop`` sees it; unreadable files are added to ``bad``."""
    crops = []
    for path in files:
        if path in bad:
            continue
        try:
            crops.append(thumbnail(path.read_bytes(), size))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            bad.add(path)
            log.warning("skipping unreadable image %s: %s", path, e)
        if max_images and len(crops) >= max_images:
            break
    if not crops:
        raise RuntimeError(f"no readable held-out images among {len(files)} files")
    return np.stack(crops)


@dataclass
class PhotoSource:
    """The two held-out built-in photos as half-overlapping crops at every scale (about 380 views of
    64x64): the held-out set the first default bundle reported on, kept to reproduce its figures."""

    size: int
    heldout_images: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def build(cls, size: int) -> PhotoSource:
        return cls(size, [load_rgb(photo_path(n)) for n in HELDOUT_PHOTOS])

    def heldout(self, max_images: int | None = None) -> np.ndarray:
        crops = [c for img in self.heldout_images for lv in pyramid(img, self.size)
                 for c in grid_crops(lv, self.size, self.size // 2)]
        return np.stack(crops[:max_images])


@dataclass
class Split:
    """One data source's files, train and held out."""

    spec: str  # "photos" or the folder as given
    train_files: list[Path]
    heldout_files: list[Path]
    terms: str = ""


def split_source(spec: str, val_fraction: float) -> Split:
    """The files of one source: ``photos`` (fixed held-out names) or an image folder (held out by hash)."""
    if spec == "photos":
        return Split(spec, [photo_path(n) for n in TRAIN_PHOTOS], [photo_path(n) for n in HELDOUT_PHOTOS],
                     PHOTOS_TERMS)
    root = Path(spec)
    files = sorted(root / rel for rel in list_images(root))  # sorted as paths, the order packs were keyed by
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    held = [p for p in files if is_heldout(str(p.relative_to(root)), val_fraction)]
    train = [p for p in files if p not in set(held)]
    if not train or not held:
        raise ValueError(f"{root}: {len(files)} images leave an empty train or held-out split "
                         f"at val_fraction={val_fraction}")
    return Split(spec, train, held)


def parse_sources(data: str) -> list[str]:
    """``--data`` value -> source specs: comma-separated folders and/or ``photos``."""
    specs = [s.strip() for s in data.split(",") if s.strip()]
    if not specs:
        raise ValueError("--data names no source")
    return specs


# The repository (a checkout or an editable install): paths inside it are recorded relative to it.
REPOSITORY = Path(__file__).resolve().parents[1]


def portable_path(path: str | Path) -> str:
    """A path as a bundle or report may record it on any machine: a relative path as given, an absolute
    one relative to the repository when inside it, else only its name (a file's with its folder's:
    ``run/checkpoint.pt``); never the machine's ``/home/...`` or ``/work/...``."""
    text = str(path)
    if not text or not Path(text).is_absolute():
        return text
    p = Path(os.path.normpath(text))
    for candidate in (p, p.resolve()):  # resolved only to see whether it lies in the repository
        if candidate.is_relative_to(REPOSITORY) and candidate != REPOSITORY:
            return candidate.relative_to(REPOSITORY).as_posix()
    return Path(*p.parts[-2 if p.suffix else -1:]).as_posix() if len(p.parts) > 1 else ""


def portable_sources(data: str) -> str:
    """A ``--data`` value with each folder made portable (``portable_path``); ``photos`` stays."""
    return ",".join(portable_path(spec) for spec in parse_sources(data))


def portable_paths(value: Any) -> Any:
    """A JSON value (a manifest section, a report) with every absolute path in it made portable: each
    string that is an absolute path or a comma-separated list of paths (a ``--data`` value). Prose
    that merely mentions a path is left alone."""
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v) for v in value]
    if isinstance(value, str):
        parts = [s.strip() for s in value.split(",")]
        absolute = [Path(s).is_absolute() for s in parts]
        if any(absolute) and all(a or not any(c.isspace() for c in s) for s, a in zip(parts, absolute)):
            return ",".join(portable_path(s) for s in parts)
    return value


def describe_sources(data: str, val_fraction: float, max_side: int, terms: str = "") -> dict:
    """The manifest's ``data`` entry: each source with its split sizes and terms, and the held-out rule."""
    splits = [split_source(spec, val_fraction) for spec in parse_sources(data)]
    return {"sources": [{"source": portable_path(s.spec), "train_files": len(s.train_files),
                         "heldout_files": len(s.heldout_files), "terms": s.terms or terms or "unspecified"}
                        for s in splits],
            "heldout_rule": f"built-in photos: {', '.join(HELDOUT_PHOTOS)}; folders: the files whose "
                            f"sha1(relative path) falls in the first {val_fraction:g} of its range",
            "training_crops": f"random squares of side log-uniform in [image_size, shorter side], images "
                              f"packed with their shorter side at most {max_side} px, left-right flips"}


def heldout_files(data: str, val_fraction: float) -> list[Path]:
    """The held-out files of every source of ``--data``, in source order."""
    return [p for spec in parse_sources(data) for p in split_source(spec, val_fraction).heldout_files]


@dataclass
class FolderSource:
    """An image folder's split; held-out images are the service's thumbnails of the held-out files."""

    root: Path
    size: int
    train_files: list[Path]
    heldout_files: list[Path]
    bad: set[Path] = field(default_factory=set)

    @classmethod
    def build(cls, root: str | Path, size: int, val_fraction: float) -> FolderSource:
        split = split_source(str(root), val_fraction)
        return cls(Path(root), size, split.train_files, split.heldout_files)

    def heldout(self, max_images: int | None = None) -> np.ndarray:
        return thumbnails(self.heldout_files, self.size, self.bad, max_images)


# --- the packed cache ---------------------------------------------------------------------------------
def fit_for_cache(image: np.ndarray, min_side: int, max_side: int) -> np.ndarray:
    """Shorter side brought into [min_side, max_side]: the cache stays bounded and every image still
    offers a crop of the model size."""
    h, w = image.shape[:2]
    short = min(h, w)
    if min_side <= short <= max_side:
        return image
    scale = (max_side if short > max_side else min_side) / short
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC if scale > 1 else Image.LANCZOS))


@dataclass
class Pack:
    """Images of different sizes in one flat uint8 buffer: image i is pixels[offset:offset + h*w*3]."""

    pixels: torch.Tensor  # uint8 [total]
    index: np.ndarray  # int64 [N, 3]: offset, height, width
    files: list[str]  # the source file of each image
    skipped: list[str]  # training files that could not be decoded

    def image(self, i: int) -> torch.Tensor:
        o, h, w = (int(v) for v in self.index[i])
        return self.pixels[o:o + h * w * 3].view(h, w, 3)

    @classmethod
    def build(cls, files: list[Path], min_side: int, max_side: int) -> Pack:
        chunks, index, kept, skipped, offset = [], [], [], [], 0
        for path in files:
            try:
                image = fit_for_cache(load_rgb(path), min_side, max_side)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
                log.warning("skipping unreadable image %s: %s", path, e)
                skipped.append(str(path))
                continue
            chunks.append(image.reshape(-1))
            index.append((offset, image.shape[0], image.shape[1]))
            kept.append(str(path))
            offset += image.size
        if not kept:
            raise RuntimeError(f"none of the {len(files)} training images could be decoded")
        return cls(torch.from_numpy(np.concatenate(chunks)), np.array(index, np.int64), kept, skipped)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "pixels.npy", self.pixels.numpy())
        np.save(directory / "index.npy", self.index)
        tmp = directory / "files.json.tmp"  # written last and atomically: its presence marks a whole cache
        tmp.write_text(json.dumps({"files": self.files, "skipped": self.skipped}))
        os.replace(tmp, directory / "files.json")

    @classmethod
    def load(cls, directory: Path) -> Pack:
        meta = json.loads((directory / "files.json").read_text())
        return cls(torch.from_numpy(np.load(directory / "pixels.npy")), np.load(directory / "index.npy"),
                   meta["files"], meta["skipped"])


def cache_key(files: list[Path], min_side: int, max_side: int) -> str:
    """Names a cache by what it holds: the files (path, size, mtime) and the size bounds."""
    h = hashlib.sha1(f"{min_side}:{max_side}".encode())
    for p in files:
        st = p.stat()
        h.update(f"\n{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_pack(files: list[Path], min_side: int, max_side: int, cache_dir: Path | None) -> Pack:
    """The packed training images, decoded once and reused from ``cache_dir`` afterwards."""
    if cache_dir is None:
        return Pack.build(files, min_side, max_side)
    directory = Path(cache_dir) / f"packed-{cache_key(files, min_side, max_side)}"
    if (directory / "files.json").is_file():
        return Pack.load(directory)
    log.info("decoding %d training images into %s", len(files), directory)
    pack = Pack.build(files, min_side, max_side)
    pack.save(directory)
    return pack


def random_crops(pack: Pack, rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """n random crops uint8 [n, size, size, 3] on the pack's device.

    Each crop is a square of side s, log-uniform in [size, shorter side], at a random place, resized
    to size (antialiased) and flipped left-right half the time: from the finest texture the cache
    holds up to the whole image, as the service's thumbnails see it. All draws come from ``rng``.
    """
    picks = rng.integers(0, len(pack.index), n)
    out = []
    for i in picks:
        h, w = (int(v) for v in pack.index[i, 1:])
        side = round(np.exp(rng.uniform(np.log(size), np.log(min(h, w)))))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        flip = rng.random() < 0.5
        crop = pack.image(i)[y:y + side, x:x + side].permute(2, 0, 1)[None]
        if side != size:
            crop = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()


@dataclass
class PackedSource:
    """Training crops from every source's training files (one pack); held-out thumbnails of every
    source's held-out files."""

    size: int
    splits: list[Split]
    pack: Pack
    bad: set[Path] = field(default_factory=set)

    @property
    def train_files(self) -> list[Path]:
        return [p for s in self.splits for p in s.train_files]

    @property
    def heldout_files(self) -> list[Path]:
        return [p for s in self.splits for p in s.heldout_files]

    @property
    def skipped(self) -> int:
        return len(self.pack.skipped)

    def to(self, device: torch.device | str) -> PackedSource:
        self.pack.pixels = self.pack.pixels.to(device)
        return self

    def crops(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """uint8 [n, size, size, 3] on the device the pack lives on."""
        return random_crops(self.pack, rng, n, self.size)

    def sample_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.crops(rng, n).cpu().numpy()

    def heldout(self, max_images: int | None = None) -> np.ndarray:
        return thumbnails(self.heldout_files, self.size, self.bad, max_images)

def make_source(data: str, size: int, val_fraction: float = 0.1, cache_dir: Path | None = None,
                max_side: int = 256) -> PackedSource:
    """All the sources of ``--data`` (comma-separated), their training files packed once."""
    splits = [split_source(spec, val_fraction) for spec in parse_sources(data)]
    files = [p for s in splits for p in s.train_files]
    return PackedSource(size, splits, load_pack(files, size, max_side, cache_dir))
