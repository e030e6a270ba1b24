"""Helpers for the tokenize job tests: a folder with good and bad images, and reading shards back."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import random_images
from service_support import png_bytes

from service.jobs.shards import shard_files


def folder(root, n_good: int = 5):
    """Good PNG/JPEGs (one nested, one larger than the model), two bad files and a non-image."""
    images = random_images(n_good, seed=11)
    paths = {}
    for i, im in enumerate(images):
        rel = f"sub/img{i}.png" if i == 2 else f"img{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png_bytes(im))
        paths[rel] = im
    big = np.kron(images[0], np.ones((2, 2, 1), np.uint8))  # 2x the model size: center_crop resizes it
    (root / "big.jpg").write_bytes(png_bytes(big, format="JPEG", quality=95))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, not even looked at")
    settle(root)
    return paths


def settle(root: Path) -> None:
    """Date every file an hour back: a folder filled earlier, whose files nothing is still writing.
    (A job judges a file that fails to decode only once it is ``settle_s`` old.)"""
    then = time.time() - 3600
    for p in root.rglob("*"):
        os.utime(p, (then, then))


def overloaded() -> httpx.Response:
    """What the service answers when its queue is full."""
    return httpx.Response(503, headers={"Retry-After": "0"},
                          json={"error": {"code": "overloaded", "message": "queue full"}})



def read_shards(out: Path):
    """(paths, top, bottom) over every shard, in shard order."""
    paths, top, bottom = [], [], []
    for shard in shard_files(out):
        with np.load(shard) as data:
            paths += [str(p) for p in data["paths"]]
            top.append(data["top"])
            bottom.append(data["bottom"])
    return paths, np.concatenate(top), np.concatenate(bottom)


def by_path(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every encoded path -> its stored arrays (the level grids, height, width, bundle)."""
    rows = {}
    for shard in shard_files(out):
        with np.load(shard) as data:
            arrays = {k: data[k] for k in data.files}
        for i, path in enumerate(arrays.pop("paths")):
            rows[str(path)] = {k: (v if v.ndim == 0 else v[i]) for k, v in arrays.items()}
    return rows


def errors(out: Path) -> dict[str, tuple[int, str]]:
    lines = (out / "errors.jsonl").read_text().splitlines() if (out / "errors.jsonl").exists() else []
    return {e["path"]: (e["status"], e["code"]) for e in map(json.loads, lines)}
