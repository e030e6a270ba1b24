"""The progress bar every folder job shows: images done and images/s (tqdm, on stderr)."""
from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int, enabled: bool, what: str = "tokenize") -> tqdm:
    return tqdm(total=total, unit="img", desc=what, disable=not enabled, smoothing=0.05, dynamic_ncols=True)
