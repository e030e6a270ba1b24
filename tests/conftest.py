"""Shared fixtures: tiny untrained models and a tiny bundle exported from them.

Tiny means seconds to build and export, so the service and sampler tests never need the
shipped default bundle to exercise every code path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_CODES = 32
TINY_SIZE = 32


def tiny_models(seed: int = 0, levels: int = 2):
    import torch

    from models import VQVAE2, GatedPixelCNN, PixelCNNConfig, QuantizerConfig, VQVAEConfig

    torch.manual_seed(seed)
    qc = QuantizerConfig(num_codes=TINY_CODES, dim=8)
    vqvae = VQVAE2(VQVAEConfig(levels=levels, channels=16, res_channels=8, res_blocks=1, top=qc, bottom=qc))
    # One training-mode pass initialises the codebooks from data, as real training would.
    vqvae(torch.rand(8, 3, TINY_SIZE, TINY_SIZE) * 2 - 1, training=True)
    vqvae.eval()
    prior_top = GatedPixelCNN(PixelCNNConfig(num_codes=TINY_CODES, channels=8, layers=2, kernel=3,
                                             head_channels=16)).eval()
    prior_bottom = GatedPixelCNN(PixelCNNConfig(num_codes=TINY_CODES, channels=8, layers=2, kernel=3,
                                                head_channels=16, cond_codes=TINY_CODES)).eval()
    return vqvae, prior_top, prior_bottom


def random_images(n: int, size: int = TINY_SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images [n, size, size, 3] (gradients plus noise, not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (yy + xx) / 2], -1)[None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3))
    noise = rng.normal(0, 0.05, (n, size, size, 3))
    return (np.clip(base + noise, 0, 1) * 255).astype(np.uint8)


def export_tiny_bundle(out: Path, seed: int = 0, levels: int = 2, check=None, **manifest) -> Path:
    """A tiny bundle; ``levels=1`` is a plain VQ-VAE whose one level has an unconditioned prior.

    ``check``: the parity check (default ``service.runtime.parity.check``); ``manifest``: the
    ``metrics``, ``training`` and ``data`` sections to record."""
    from service.runtime.parity import check as parity_check
    from training.export import export_bundle

    vqvae, prior_top, prior_bottom = tiny_models(seed, levels=levels)
    if levels == 1:
        prior_top, prior_bottom = None, prior_top  # the one level's prior takes no conditioning
    export_bundle(vqvae, prior_top, prior_bottom, out, TINY_SIZE, random_images(4, seed=seed),
                  name="tiny" if levels == 2 else "tiny-1", check=check or parity_check, **manifest)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A complete bundle (encoder, decoder, both priors) exported from untrained tiny models."""
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_one_level_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "one_level", levels=1)
