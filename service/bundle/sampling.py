"""Sampling semantics: what a seed means and how a code is picked. numpy only.

Every sampler (ONNX Runtime in ``service.runtime``, PyTorch in ``training.fast_sampling``) draws
Gumbel noise for every position up front from the seed, and picks the code at a position as

    argmax over the top-k logits of (logits / temperature + noise)

(top_k 0 or >= K: all codes; temperature <= 0: plain argmax of the logits, noise ignored). The naive
and cached samplers consume the noise identically, so one seed gives the same codes from both (up
to float round-off deciding an exact near-tie, which we have not seen happen).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from service.bundle.manifest import Bundle


def gumbel_noise(seed: int | Sequence[int], n: int, h: int, w: int, k: int) -> np.ndarray:
    """Standard Gumbel noise, float32 [n, h, w, k], from ``np.random.default_rng(seed)``."""
    u = np.random.default_rng(seed).random((n, h, w, k), dtype=np.float32)
    np.maximum(u, np.finfo(np.float32).tiny, out=u)
    return -np.log(-np.log(u))


def noise_for(bundle: Bundle, seed: int, n: int) -> dict[str, np.ndarray]:
    """{level: noise} for ``n`` samples of the bundle's image size, in the manifest's level order.

    The first level uses ``default_rng(seed)``, level i ``default_rng([seed, i])``, so the streams
    are independent and seed s never reuses seed s+1's stream (for a 2-level bundle: top = seed,
    bottom = [seed, 1]).
    """
    size = bundle.image_size
    out = {}
    for i, (name, lv) in enumerate(bundle.levels.items()):
        out[name] = gumbel_noise(seed if i == 0 else [seed, i], n, *lv.grid(size, size), lv.codebook_size)
    return out


def pick_codes(logits: np.ndarray, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    """Gumbel-max codes int64 [n] from logits [n, K], noise [n, K], temperature [n], top_k [n]."""
    logits = np.asarray(logits, dtype=np.float32)
    n, K = logits.shape
    t = np.asarray(temperature, dtype=np.float32).reshape(n)
    greedy = t <= 0
    if greedy.any():
        z = logits / np.where(greedy, np.float32(1), t)[:, None]
        z[~greedy] += noise[~greedy]
    else:
        z = logits / t[:, None] + noise
    k = np.asarray(top_k, dtype=np.int64).reshape(n)
    limited = (k > 0) & (k < K)
    if limited.any():
        rows = np.flatnonzero(limited)
        kk = k[rows]
        if (kk == kk[0]).all():
            thr = np.partition(logits[rows], K - kk[0], axis=1)[:, K - kk[0]]
        else:
            thr = np.sort(logits[rows], axis=1)[np.arange(len(rows)), K - kk]
        sub = z[rows]
        sub[logits[rows] < thr[:, None]] = -np.inf
        z[rows] = sub
    return z.argmax(axis=1).astype(np.int64)


def cache_zeros(spec: list, n: int, width: int) -> np.ndarray:
    """Zeros float32 for a manifest cache shape such as ["batch", 128, 2, "width"]."""
    dims = {"batch": n, "width": width}
    return np.zeros([dims[d] if isinstance(d, str) else int(d) for d in spec], dtype=np.float32)


def has_cached_graphs(bundle: Bundle) -> bool:
    """Whether the bundle ships step graphs for each of its priors (bundles exported before issue 4 do not)."""
    return bundle.can_sample and all(name in bundle.sampling for name in bundle.level_names)
