"""Vector quantizer with an EMA codebook (VQ-VAE, van den Oord et al. 2017, appendix A.1).

The codebook is a buffer, not a parameter: it moves only by exponential moving averages of
the encoder outputs assigned to each code, so it never receives a gradient. The encoder
gets the straight-through gradient plus a commitment loss pulling it towards its codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerConfig:
    num_codes: int = 512
    dim: int = 64
    commitment: float = 0.25  # beta in the VQ-VAE loss
    decay: float = 0.99  # EMA decay of cluster sizes and sums
    eps: float = 1e-5  # Laplace smoothing of cluster sizes
    # A code whose EMA cluster size falls below this is restarted from a current encoder output.
    dead_threshold: float = 0.25


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantizer over the channel axis of a [B, D, H, W] tensor.

    Call it with an explicit ``training`` flag: EMA updates, data initialisation and dead-code
    restarts happen only when ``training`` is True, so evaluation and export never mutate state.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        k, d = config.num_codes, config.dim
        self.register_buffer("embedding", torch.randn(k, d) * 0.1)
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances [N, K] by the expansion |z|^2 - 2 z.e + |e|^2 (one matmul)."""
        e = self.embedding
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None, :]

    def codes_for(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices [B, H, W] for z of shape [B, D, H, W]."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return self.distances(flat).argmin(1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, D, H, W] for indices [B, H, W]."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        """Quantize ``z`` [B, D, H, W].

        Returns a dict with ``quantized`` (straight-through, same shape as z), ``codes`` [B, H, W],
        ``loss`` (commitment term, scalar), ``perplexity`` (exp of the batch code-usage entropy)
        and ``usage`` (per-code counts in this batch, [K]).
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if training and not bool(self.initialized):
            self._init_from_data(flat.detach())
        codes = self.distances(flat).argmin(1)
        usage = torch.bincount(codes, minlength=self.config.num_codes).to(z.dtype)
        if training:
            self._ema_update(flat.detach(), codes, usage)
        quantized = self.lookup(codes.view(b, h, w))
        loss = self.config.commitment * F.mse_loss(z, quantized.detach())
        # Straight-through: forward uses the code vector, backward copies the gradient to z.
        quantized = z + (quantized - z).detach()
        probs = usage / usage.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return {"quantized": quantized, "codes": codes.view(b, h, w), "loss": loss,
                "perplexity": perplexity, "usage": usage}

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        # Starting from encoder outputs avoids the codes that random init leaves dead forever.
        idx = torch.randint(0, flat.shape[0], (self.config.num_codes,), device=flat.device)
        self.embedding.copy_(flat[idx])
        self.embed_sum.copy_(flat[idx])
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, usage: torch.Tensor) -> None:
        c = self.config
        self.cluster_size.mul_(c.decay).add_(usage, alpha=1 - c.decay)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        self.embed_sum.mul_(c.decay).add_(sums, alpha=1 - c.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + c.eps) / (n + c.num_codes * c.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.config.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        idx = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        # Small noise keeps two restarted codes drawn from one vector from staying identical.
        fresh = flat[idx] + 0.01 * flat.std() * torch.randn_like(flat[idx])
        self.embedding[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
