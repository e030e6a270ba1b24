"""Priors p(z) for the continuous VAE: a fixed N(0, I) and a learnable RealNVP flow.

ELBO surgery (lecture 6) splits the mean KL(q(z|x) || p(z)) into I[x, z] + KL(q_agg || p): the
prior only enters through the marginal term, so the best prior is the aggregated posterior
q_agg. A fixed N(0, I) pays whatever q_agg's shape costs; a flow prior can bend towards q_agg.

Both priors share one interface, so the VAE takes either as a sibling:

* ``forward(z) -> (u, log_det)`` maps a latent z to base noise u ~ N(0, I) (the density
  direction) with log |det du/dz|;
* ``inverse(u) -> (z, log_det)`` maps noise back to a latent (the sampling direction) with
  log |det dz/du| (the negative of the forward one at the matching point);
* ``log_prob(z)`` = log N(forward(z); 0, I) + log |det du/dz| (change of variables);
* ``sample(n)`` = inverse(u) for u ~ N(0, I).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(u: torch.Tensor) -> torch.Tensor:
    """log N(u; 0, I) summed over the last dimension."""
    return -0.5 * (u.pow(2) + LOG_2PI).sum(-1)


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I): the identity flow. No parameters, so the ELBO cannot move it towards q_agg."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, z.new_zeros(z.shape[:-1])

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return u, u.new_zeros(u.shape[:-1])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.dim, generator=generator)


@dataclass
class FlowConfig:
    dim: int = 16
    layers: int = 8  # coupling layers; an even number so every coordinate is transformed equally often
    hidden: int = 128  # width of the MLP that predicts each layer's scale and shift
    max_log_scale: float = 2.0  # |log-scale| per layer stays below this (tanh bound): no exploding exp()


def coupling_mask(dim: int, index: int) -> torch.Tensor:
    """1 = conditioning (copied) coordinate, 0 = transformed coordinate.

    Layers alternate between a parity split and a halves split, and every second layer flips
    the mask, so within four layers each coordinate is transformed twice, conditioned on two
    different sets of the others (one fixed split would never let z_1 condition on z_2's half).
    """
    ar = torch.arange(dim)
    mask = (ar % 2 == 0) if (index // 2) % 2 == 0 else (ar < dim // 2)
    if index % 2 == 1:
        mask = ~mask
    return mask.float()


class AffineCoupling(nn.Module):
    """u = m*z + (1-m) * (z * exp(s(m*z)) + t(m*z)); log |det du/dz| = sum of s over the transformed part.

    The Jacobian is triangular (copied coordinates pass through, transformed ones depend on
    themselves only through the elementwise scale), so the determinant is the product of the
    scales: one pass for the density, one pass for sampling.
    """

    def __init__(self, dim: int, hidden: int, mask: torch.Tensor, max_log_scale: float):
        super().__init__()
        self.register_buffer("mask", mask)
        self.max_log_scale = max_log_scale
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * dim))
        # Zero-initialised output: every layer starts as the identity, so the flow prior starts
        # exactly at N(0, I) and both arms of the experiment begin from the same model.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, z_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(z_cond).chunk(2, dim=-1)
        b = self.max_log_scale
        free = 1 - self.mask
        return b * torch.tanh(raw_s / b) * free, t * free

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._scale_shift(z * self.mask)
        u = z * self.mask + (1 - self.mask) * (z * torch.exp(s) + t)
        return u, s.sum(-1)

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._scale_shift(u * self.mask)  # the copied part of u equals the copied part of z
        z = u * self.mask + (1 - self.mask) * ((u - t) * torch.exp(-s))
        return z, -s.sum(-1)


class RealNVPPrior(nn.Module):
    """p(z | lambda) = N(f(z); 0, I) |det df/dz|, f a stack of affine couplings (Dinh et al. 2017)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.layers = nn.ModuleList(
            AffineCoupling(config.dim, config.hidden, coupling_mask(config.dim, i), config.max_log_scale)
            for i in range(config.layers))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = z.new_zeros(z.shape[:-1])
        for layer in self.layers:
            z, ld = layer(z)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = u.new_zeros(u.shape[:-1])
        for layer in reversed(self.layers):
            u, ld = layer.inverse(u)
            log_det = log_det + ld
        return u, log_det

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_det = self.forward(z)
        return standard_normal_log_prob(u) + log_det

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.randn(n, self.dim, generator=generator, device=self.layers[0].mask.device)
        return self.inverse(u)[0]
