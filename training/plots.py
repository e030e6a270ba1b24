"""PNG figures for a run: image grids, loss curves and codebook usage."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from service.bundle.images import image_grid


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    Image.fromarray(image_grid(images, columns)).save(path)


def save_reconstructions(originals: np.ndarray, recons: np.ndarray, path: Path, n: int = 16) -> None:
    """Originals on odd rows, reconstructions below them."""
    n = min(n, len(originals))
    cols = 8
    rows = []
    for i in range(0, n, cols):
        rows += [originals[i:i + cols], recons[i:i + cols]]
    save_grid(np.concatenate(rows), path, columns=cols)


def save_curves(records: list[dict], keys: list[str], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for split, style in (("train", "-"), ("heldout", "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_usage(counts: dict[str, np.ndarray], path: Path) -> None:
    """Sorted code-usage histogram per level (log scale), to spot dead or dominant codes."""
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3))
    for ax, (name, c) in zip(np.atleast_1d(axes), counts.items()):
        ax.bar(np.arange(len(c)), np.sort(c)[::-1] + 1e-1, width=1.0)
        ax.set_yscale("log")
        ax.set_title(f"{name}: {(c > 0).mean():.1%} of {len(c)} codes used")
        ax.set_xlabel("code (sorted by use)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_panels(panels: list[tuple[str, np.ndarray]], path: Path, crop: int = 192) -> None:
    """Titled uint8 images side by side, each cut to the same centre square (pixels shown 1:1 in size)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        h, w = img.shape[:2]
        y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        ax.imshow(img[y:y + crop, x:x + crop], interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
