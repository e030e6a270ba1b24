"""Code length under the learned priors: how many bits an image's codes cost an entropy coder driven
by the bundle's PixelCNNs, −Σ log2 softmax(logits)[code] over every position of every level.

One full prior pass per level (the ``prior_<level>`` graph, not the step graphs): the priors are
causal, so a single teacher-forced pass gives every position's conditional at once. A conditioned
prior also takes the coarser level's codes; the graph's own input names say which grids it needs.
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, prior_graph
from service.bundle.wire import GridBatch


def nll_bits(logits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """logits [B, K, h, w], codes int64 [B, h, w] -> bits per item [B]: −Σ log2 softmax(logits)[code]."""
    x = logits.astype(np.float64)  # 256 positions × a few bits: float32 sums would round at ~1e-4 bits
    peak = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]
    picked = np.take_along_axis(x, codes[:, None], axis=1)[:, 0]
    return (log_z - picked).reshape(len(codes), -1).sum(axis=1) / math.log(2)


def prior_bits(bundle: Bundle, sessions: dict[str, ort.InferenceSession], codes: GridBatch) -> dict[str, np.ndarray]:
    """{level: bits per item [B]} for a batch of code grids, one prior pass per level."""
    out = {}
    for level in bundle.level_names:
        sess = sessions[prior_graph(level)]
        logits = sess.run(None, {i.name: codes[i.name] for i in sess.get_inputs()})[0]
        out[level] = nll_bits(logits, codes[level])
    return out


def uniform_bits(height: int, width: int, codebook_size: int) -> float:
    """A grid's length when every code costs log2 K."""
    return height * width * math.log2(codebook_size)
