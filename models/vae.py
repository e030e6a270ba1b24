"""A small convolutional Gaussian VAE with a pluggable prior p(z) (see ``models.flow``).

* Encoder: q(z|x) = N(mu(x), diag(exp(logvar(x)))), z low-dimensional (16 by default), so the
  aggregated posterior is small enough to estimate over a few thousand held-out images.
* Decoder: p(x|z) is a discretized logistic per subpixel over the 256 uint8 levels (the
  PixelCNN++ likelihood with one mixture component; the lecture's "discretize the model
  through its CDF"). It is a proper probability mass function on the actual uint8 data, so
  -ELBO / (3 H W ln 2) is an honest upper bound on the model's negative log-likelihood in
  bits per dimension; a Gaussian density on [0, 1] data would not be.
* KL term: log q(z|x) - log p(z) at the reparameterised sample, the same Monte Carlo estimator
  for either prior (a flow prior has no closed-form KL), so the two arms differ only in p(z).

Images enter as floats in [-1, 1] (uint8 v -> v / 127.5 - 1, the bin centres), as in ``models.vqvae``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.flow import LOG_2PI

BINS = 256


@dataclass
class VAEConfig:
    image_size: int = 32  # square RGB images; must be a multiple of 8 (three stride-2 stages)
    latent_dim: int = 16
    channels: int = 32  # width of the first conv stage; doubles at each of the next two
    min_log_scale: float = -7.0  # floor on the logistic log-scale: a bin is 2/255 wide, -7 is far below

    def __post_init__(self):
        if self.image_size % 8 or self.image_size < 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {self.image_size}")


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, x on the 256 bin centres in [-1, 1].

    P(x) = sigma((x - m + 1/255) / s) - sigma((x - m - 1/255) / s), with the end bins taking the
    tails (x = -1 gets everything below, x = 1 everything above), so the 256 masses sum to 1.
    The difference of sigmoids is computed in log space without the usual density fallback:
    sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - exp(b - a)), exact and stable for any s.
    """
    inv_s = torch.exp(-log_scale)
    a = (x - mean + 1.0 / (BINS - 1)) * inv_s
    b = (x - mean - 1.0 / (BINS - 1)) * inv_s
    log_upper = F.logsigmoid(a)  # log sigma(a): mass below the bin's upper edge
    log_lower_tail = F.logsigmoid(-b)  # log (1 - sigma(b)): mass above the bin's lower edge
    # b - a = -2 / (255 s) < 0, so -expm1(b - a) lies in (0, 1).
    log_mid = log_upper + log_lower_tail + torch.log(-torch.expm1(b - a))
    first = x < -1 + 1.0 / (BINS - 1)
    last = x > 1 - 1.0 / (BINS - 1)
    return torch.where(first, log_upper, torch.where(last, log_lower_tail, log_mid))


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] on the bin centres in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class GaussianVAE(nn.Module):
    """Conv encoder -> (mu, logvar) of z; linear + transposed-conv decoder -> logistic (mean, log-scale)."""

    def __init__(self, config: VAEConfig, prior: nn.Module):
        super().__init__()
        self.config = config
        c, d = config.channels, config.latent_dim
        self.base = config.image_size // 8
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(4 * c * self.base ** 2, 2 * d),
        )
        self.decoder_in = nn.Linear(d, 4 * c * self.base ** 2)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(c, c, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(c, 6, 3, padding=1),  # per subpixel: logistic mean and log-scale
        )
        self.prior = prior  # StandardNormalPrior or RealNVPPrior: log_prob(z), sample(n)

    @property
    def dims(self) -> int:
        """Number of subpixels: the denominator of bits per dimension."""
        return 3 * self.config.image_size ** 2

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        # Soft-clamp logvar to [-12, 6]: keeps exp() finite early on without a hard gradient cut.
        logvar = 3.0 + 9.0 * torch.tanh((logvar - 3.0) / 9.0)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.decoder_in(z).view(-1, 4 * self.config.channels, self.base, self.base)
        mean, log_scale = self.decoder(h).chunk(2, dim=1)
        return torch.tanh(mean), log_scale.clamp(min=self.config.min_log_scale)

    def reconstruction_nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) in nats per image."""
        mean, log_scale = self.decode(z)
        return -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One-sample ELBO terms per image (nats): ``recon`` = -log p(x|z), ``kl`` = log q(z|x) - log p(z)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = diag_gaussian_log_prob(z, mu, logvar) - self.prior.log_prob(z)
        return {"recon": self.reconstruction_nll(x, z), "kl": kl, "z": z, "mu": mu, "logvar": logvar}

    @torch.no_grad()
    def sample_images(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder means at prior samples, floats in [-1, 1] (for looking at, not for likelihoods)."""
        return self.decode(self.prior.sample(n, generator=generator))[0]


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))
