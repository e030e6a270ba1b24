"""Batch-size buckets: pad a batch up to the next power of two, run it, drop the padding.

On CUDA the first run of every input shape pays for cuDNN's algorithm choice and memory planning
(~65 ms on an H200 against ~1.8 ms afterwards), and dynamic batching makes every size from 1 to
the max batch. With buckets only log2(max batch) + 1 sizes ever reach a session, and the service
warms all of them at start-up. Rows of a batch are independent in every graph of a bundle (convolutions
and per-position heads, no batch statistics at inference), so the padding never changes a result.
"""
from __future__ import annotations

import numpy as np


def bucket_for(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"a batch has at least one item, got {n}")
    return 1 << (n - 1).bit_length()


def buckets_up_to(max_batch: int) -> list[int]:
    """Every bucket a batch of at most ``max_batch`` items can land in: 1, 2, 4, ... bucket_for(max_batch)."""
    return [1 << k for k in range(bucket_for(max_batch).bit_length())]


def pad_rows(array: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
    """``array`` with ``rows`` rows, the extra ones set to ``fill`` (the array itself if it has them)."""
    n = array.shape[0]
    if n == rows:
        return array
    out = np.full((rows, *array.shape[1:]), fill, dtype=array.dtype)
    out[:n] = array
    return out
