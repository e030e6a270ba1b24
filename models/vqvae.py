"""VQ-VAE-2 (Razavi et al. 2019): a bottom code grid at stride 4 and a top grid at stride 8.

With ``levels=1`` it is a plain VQ-VAE (bottom grid only). Images enter and leave as floats
in [-1, 1]; the uint8 conversion lives in the export wrappers so that it ends up in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.quantizer import QuantizerConfig, make_quantizer

BOTTOM_STRIDE = 4
TOP_STRIDE = 8


@dataclass
class VQVAEConfig:
    levels: int = 2  # 1 = VQ-VAE, 2 = VQ-VAE-2
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    top: QuantizerConfig = field(default_factory=QuantizerConfig)
    bottom: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self):
        # Configs come back from JSON as dicts; rebuild the nested dataclasses. Quantizer fields
        # added later (kind, gradient, ...) take their defaults, so old configs build the old model.
        if isinstance(self.top, dict):
            self.top = QuantizerConfig(**self.top)
        if isinstance(self.bottom, dict):
            self.bottom = QuantizerConfig(**self.bottom)
        if self.levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {self.levels}")

    @property
    def level_names(self) -> list[str]:
        return ["top", "bottom"] if self.levels == 2 else ["bottom"]

    @property
    def strides(self) -> dict[str, int]:
        return {"top": TOP_STRIDE, "bottom": BOTTOM_STRIDE}


class ResBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def res_stack(channels: int, hidden: int, n: int) -> list[nn.Module]:
    return [ResBlock(channels, hidden) for _ in range(n)] + [nn.ReLU()]


def downsampler(c_in: int, c: int, stride: int, cfg: VQVAEConfig) -> nn.Sequential:
    """Strided 4x4 convs that divide the resolution by ``stride`` (2 or 4), then residual blocks."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c // 2, 4, 2, 1), nn.ReLU()]
    if stride == 4:
        layers += [nn.Conv2d(c // 2, c, 4, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
    else:
        layers += [nn.Conv2d(c // 2, c, 3, padding=1)]
    return nn.Sequential(*layers, *res_stack(c, cfg.res_channels, cfg.res_blocks))


def upsampler(c_in: int, c_out: int, stride: int, cfg: VQVAEConfig) -> nn.Sequential:
    """Residual blocks, then transposed 4x4 convs that multiply the resolution by ``stride``."""
    c = cfg.channels
    layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1), *res_stack(c, cfg.res_channels, cfg.res_blocks)]
    if stride == 4:
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(c // 2, c_out, 4, 2, 1)]
    else:
        layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1)]
    return nn.Sequential(*layers)


class VQVAE2(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        c, d_b = config.channels, config.bottom.dim
        self.enc_bottom = downsampler(3, c, 4, config)
        if config.levels == 2:
            d_t = config.top.dim
            self.enc_top = downsampler(c, c, 2, config)
            self.pre_quant_top = nn.Conv2d(c, d_t, 1)
            self.quant_top = make_quantizer(config.top)
            # The bottom quantizer sees the encoder features next to the decoded top codes,
            # so the bottom level only has to encode what the top level missed.
            self.dec_top = upsampler(d_t, d_t, 2, config)
            self.pre_quant_bottom = nn.Conv2d(c + d_t, d_b, 1)
            self.upsample_top = nn.ConvTranspose2d(d_t, d_t, 4, 2, 1)
            dec_in = d_t + d_b
        else:
            self.pre_quant_bottom = nn.Conv2d(c, d_b, 1)
            dec_in = d_b
        self.quant_bottom = make_quantizer(config.bottom)
        self.decoder = upsampler(dec_in, 3, 4, config)

    def encode(self, x: torch.Tensor, training: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Quantizer outputs per level name for images x in [-1, 1], shape [B, 3, H, W]."""
        h_bottom = self.enc_bottom(x)
        out: dict[str, dict[str, torch.Tensor]] = {}
        if self.config.levels == 2:
            out["top"] = self.quant_top(self.pre_quant_top(self.enc_top(h_bottom)), training)
            h_bottom = torch.cat([h_bottom, self.dec_top(out["top"]["quantized"])], 1)
        out["bottom"] = self.quant_bottom(self.pre_quant_bottom(h_bottom), training)
        return out

    def decode_quantized(self, q_bottom: torch.Tensor, q_top: torch.Tensor | None) -> torch.Tensor:
        if self.config.levels == 2:
            q_bottom = torch.cat([self.upsample_top(q_top), q_bottom], 1)
        return self.decoder(q_bottom)

    def decode_codes(self, bottom: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """Images in roughly [-1, 1] from code grids [B, h, w]."""
        q_top = self.quant_top.lookup(top) if self.config.levels == 2 else None
        return self.decode_quantized(self.quant_bottom.lookup(bottom), q_top)

    def forward(self, x: torch.Tensor, training: bool = False) -> dict:
        levels = self.encode(x, training)
        q_top = levels["top"]["quantized"] if "top" in levels else None
        recon = self.decode_quantized(levels["bottom"]["quantized"], q_top)
        return {"recon": recon, "levels": levels,
                "commitment": sum(lv["loss"] for lv in levels.values())}
