"""PyTorch samplers for ``GatedPixelCNN``: the naive one (one full forward pass per code, the
reference) and the cached one, which walks the step functions of ``models.cached_prior.CachedPrior``
(Ramachandran et al. 2017) in raster order, plus teacher forcing through the same steps.

Sampling itself (Gumbel-max with temperature and top-k over pre-drawn noise) is the bundle
contract's (``service.bundle.sampling``), shared by the torch and ONNX samplers, so the naive and the
cached sampler consume the same noise the same way and return the same codes. The step graphs are
exported by ``training.export_steps``; the ONNX Runtime walk over them lives in
``service.runtime.sampler``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from models.cached_prior import CachedPrior
from models.pixelcnn import GatedPixelCNN
from service.bundle.sampling import pick_codes


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _in_eval_mode(fn):
    @functools.wraps(fn)
    def wrapper(prior, *args, **kwargs):
        with _eval_mode(prior):
            return fn(prior, *args, **kwargs)
    return wrapper


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (sampling mid-training must not leave the prior in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _cached_walk(prior: GatedPixelCNN, n: int, height: int, width: int, cond: torch.Tensor | None,
                 visit: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Step the cached prior over an n x height x width grid in raster order.

    ``visit(i, j, logits)`` gets the step's logits [n, K] and returns the codes [n] placed at (i, j),
    which the following steps then see: sampled codes when sampling, given ones when teacher forcing.
    """
    cp = CachedPrior(prior)
    codes = torch.zeros(n, height, width, dtype=torch.long)
    condv = condh = None
    if cp.conditioned:
        condv, condh = cp.cond(cond)
    vcache = cp.init_vcache(n, width)
    pad = torch.full((n,), cp.K, dtype=torch.long)
    for i in range(height):
        hbias, vcache = cp.row(codes[:, max(i - 1, 0)], torch.tensor([i]), vcache, condv, condh)
        hcache = cp.init_hcache(n)
        prev = pad
        for j in range(width):
            logits, hcache = cp.pixel(prev, torch.tensor([j]), hbias, hcache)
            prev = visit(i, j, logits)
            codes[:, i, j] = prev
    return codes


@_in_eval_mode
@torch.no_grad()
def teacher_forcing_logits(prior: GatedPixelCNN, codes: torch.Tensor, cond: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Logits [n, K, H, W] computed position by position with the cached stepper on given codes."""
    n, height, width = codes.shape
    out = torch.empty(n, prior.config.num_codes, height, width)

    def visit(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        out[:, :, i, j] = logits
        return codes[:, i, j]

    _cached_walk(prior, n, height, width, cond, visit)
    return out


@_in_eval_mode
@torch.no_grad()
def sample_naive_torch(prior: GatedPixelCNN, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                       cond: torch.Tensor | None = None) -> np.ndarray:
    """Codes [n, H, W] by one full forward pass per position (the reference sampler)."""
    n, H, W, _ = noise.shape
    codes = torch.zeros(n, H, W, dtype=torch.long)
    for i in range(H):
        for j in range(W):
            logits = prior(codes, cond)[:, :, i, j]
            codes[:, i, j] = torch.from_numpy(pick_codes(_np(logits), noise[:, i, j], temperature, top_k))
    return codes.numpy()


@_in_eval_mode
@torch.no_grad()
def sample_cached_torch(prior: GatedPixelCNN, noise: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                        cond: torch.Tensor | None = None) -> np.ndarray:
    """Codes [n, H, W] with the cached stepper; the same noise gives the same codes as the naive sampler."""
    n, height, width, _ = noise.shape

    def visit(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(pick_codes(_np(logits), noise[:, i, j], temperature, top_k))

    return _cached_walk(prior, n, height, width, cond, visit).numpy()


def sample_torch(priors: dict[str, GatedPixelCNN], noise: dict[str, np.ndarray], temperature: np.ndarray,
                 top_k: np.ndarray, method: str = "cached") -> dict[str, np.ndarray]:
    """Codes per level, coarsest first (the order of ``priors``), each conditioned on the previous
    level's codes when its prior takes them; naive or cached sampler."""
    fn = {"cached": sample_cached_torch, "naive": sample_naive_torch}[method]
    out: dict[str, np.ndarray] = {}
    prev = None
    for level, prior in priors.items():
        cond = torch.from_numpy(out[prev]) if prev is not None and prior.config.cond_codes > 0 else None
        out[level] = fn(prior, noise[level], temperature, top_k, cond)
        prev = level
    return out
