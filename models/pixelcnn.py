"""Gated PixelCNN prior over a code grid (van den Oord et al. 2016), without a blind spot.

Causality comes from shapes and shifts rather than masks, which keeps the graph simple to
export and to cache (see ``models/cached_prior``):

* vertical stack: a (p+1) x k conv over rows i-p..i. It may see the whole current row, so it
  reaches the horizontal stack only through a one-row downward shift (the "link").
* horizontal stack: a 1 x (p+1) conv over columns j-p..j of the current row; in the first
  layer the input is shifted one column right so position j does not see itself.

Here p = kernel // 2. Zeros enter at exactly three places: the top/left/right padding of the
vertical conv, the left padding of the horizontal conv, and the shifted-in row of the link
(before the 1x1 link conv, so the link bias applies on row 0 as well).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PixelCNNConfig:
    num_codes: int = 512
    channels: int = 64
    layers: int = 8
    kernel: int = 5  # odd; vertical kernel (kernel//2 + 1) x kernel, horizontal 1 x (kernel//2 + 1)
    head_channels: int = 256
    cond_codes: int = 0  # > 0: conditioned on a code grid with this many codes (the top codes)
    cond_scale: int = 2  # the conditioning grid is this many times coarser than the modelled grid
    num_classes: int = 0  # > 0: an optional class label is added to the conditioning

    def __post_init__(self):
        if self.kernel % 2 != 1 or self.kernel < 3:
            raise ValueError("kernel must be odd and >= 3")
        if self.cond_scale not in (1, 2):
            raise ValueError("cond_scale must be 1 or 2")


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i receives row i-1; row 0 receives zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel: int, first: bool, conditioned: bool):
        super().__init__()
        c, self.p, self.first = channels, kernel // 2, first
        self.v_conv = nn.Conv2d(c, 2 * c, (self.p + 1, kernel))
        self.h_conv = nn.Conv2d(c, 2 * c, (1, self.p + 1))
        self.link = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.cond = nn.Conv2d(c, 4 * c, 1) if conditioned else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None):
        p = self.p
        v_raw = self.v_conv(F.pad(v, (p, p, p, 0)))
        # First layer: pad one more column and drop the last, so column j sees j-p-1..j-1.
        h_in = F.pad(h, (p + 1, 0))[..., :-1] if self.first else F.pad(h, (p, 0))
        h_pre = self.h_conv(h_in) + self.link(shift_down(v_raw))
        v_pre = v_raw
        if self.cond is not None and cond is not None:
            cond_v, cond_h = self.cond(cond).chunk(2, dim=1)
            v_pre, h_pre = v_pre + cond_v, h_pre + cond_h
        h_new = self.h_out(gate(h_pre))
        # No residual in the first layer: h there is the embedding, which holds position j itself.
        return gate(v_pre), (h_new if self.first else h + h_new)


class ConditionNet(nn.Module):
    """Features [B, C, H, W] from a coarser code grid and/or a class label."""

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        c = cfg.channels
        self.grid = None
        if cfg.cond_codes > 0:
            up = nn.ConvTranspose2d(c, c, 4, 2, 1) if cfg.cond_scale == 2 else nn.Conv2d(c, c, 3, padding=1)
            self.embed = nn.Embedding(cfg.cond_codes, c)
            self.grid = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), up, nn.ReLU())
        self.label = nn.Embedding(cfg.num_classes, c) if cfg.num_classes > 0 else None

    def forward(self, cond_codes: torch.Tensor | None, label: torch.Tensor | None) -> torch.Tensor | None:
        out = None
        if self.grid is not None:
            if cond_codes is None:
                raise ValueError("this prior is conditioned on a code grid; pass cond")
            out = self.grid(self.embed(cond_codes).permute(0, 3, 1, 2))
        if self.label is not None and label is not None:
            lab = self.label(label)[:, :, None, None]
            out = lab if out is None else out + lab
        return out


class GatedPixelCNN(nn.Module):
    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        c = config.channels
        conditioned = config.cond_codes > 0 or config.num_classes > 0
        # An embedding lookup instead of one_hot: same function, cheaper, and exports cleanly.
        self.embed = nn.Embedding(config.num_codes, c)
        self.condition = ConditionNet(config) if conditioned else None
        self.layers = nn.ModuleList(
            GatedLayer(c, config.kernel, first=(i == 0), conditioned=conditioned) for i in range(config.layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, config.head_channels, 1), nn.ReLU(),
                                  nn.Conv2d(config.head_channels, config.num_codes, 1))

    def condition_features(self, cond: torch.Tensor | None, label: torch.Tensor | None) -> torch.Tensor | None:
        return self.condition(cond, label) if self.condition is not None else None

    def forward_embedded(self, x: torch.Tensor, cond_features: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, K, H, W] from embedded codes x [B, C, H, W] (differentiable in x)."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, cond_features)
        return self.head(h)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None,
                label: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, H, W] for codes [B, H, W]; position (i, j) sees only earlier positions."""
        x = self.embed(codes).permute(0, 3, 1, 2)
        return self.forward_embedded(x, self.condition_features(cond, label))

    def receptive_field(self, height: int, width: int, i: int, j: int) -> torch.Tensor:
        """Boolean [H, W] mask of the earlier positions that logits at (i, j) depend on.

        Derived from the layer shapes: after L layers the link reaches rows i-1-L*p..i-1 and
        columns j-L*p..j+L*p; the horizontal stack reaches columns j-L*p-1..j-1 of row i.
        """
        reach = self.config.layers * (self.config.kernel // 2)
        rows = torch.arange(height)[:, None]
        cols = torch.arange(width)[None, :]
        above = (rows < i) & (rows >= i - 1 - reach) & ((cols - j).abs() <= reach)
        left = (rows == i) & (cols < j) & (cols >= j - reach - 1)
        return above | left
