"""Held-out metrics: reconstruction quality, code usage with the ELBO-surgery terms, prior NLL.

ELBO surgery: the mean KL(q(z|x) || p(z)) equals KL(q_agg || p) + I[x, z]. A VQ posterior is
deterministic (one-hot), so per position I[x, z] = H(usage), the entropy of the aggregated
code usage, and against the uniform prior KL(q_agg || uniform) = log K - H(usage). That gap is
exactly what a learned prior can win back; the prior's NLL shows how much it does.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models import VQVAE2, GatedPixelCNN
from service.bundle.images import psnr
from training.export import to_model_input, to_uint8_images


def usage_terms(counts: np.ndarray) -> dict[str, float]:
    """Code-usage statistics in bits for a histogram of code counts [K]."""
    k = len(counts)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {"codes_used_pct": float((counts > 0).mean() * 100), "perplexity": 2 ** entropy,
            "mutual_information_bits": entropy, "kl_qagg_uniform_bits": math.log2(k) - entropy,
            "log2_K": math.log2(k)}


@torch.no_grad()
def encode_batches(model: VQVAE2, images: np.ndarray, batch: int = 64):
    """Yield (images, codes per level, reconstructed uint8 images) batch by batch."""
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(chunk)).to(device))
        levels = model.encode(x, training=False)
        q_top = levels["top"]["quantized"] if "top" in levels else None
        recon = to_uint8_images(model.decode_quantized(levels["bottom"]["quantized"], q_top)).cpu().numpy()
        yield chunk, {name: lv["codes"].cpu() for name, lv in levels.items()}, recon


def vqvae_metrics(model: VQVAE2, images: np.ndarray,
                  with_ssim: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """PSNR, MSE, SSIM and per-level usage terms on uint8 images [N, H, W, 3], and the codes
    [N, h, w] per level they came from (so callers need not encode the images again)."""
    psnrs, mses, ssims = [], [], []
    codes: dict[str, list[torch.Tensor]] = {name: [] for name in model.config.level_names}
    for chunk, chunk_codes, recon in encode_batches(model, images):
        psnrs.append(psnr(chunk, recon))
        mses.append((((chunk.astype(np.float64) - recon) / 255.0) ** 2).reshape(len(chunk), -1).mean(1))
        if with_ssim:
            from skimage.metrics import structural_similarity

            ssims += [structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in zip(chunk, recon)]
        for name, c in chunk_codes.items():
            codes[name].append(c)
    all_codes = {name: torch.cat(c) for name, c in codes.items()}
    out = {"psnr": float(np.concatenate(psnrs).mean()), "mse": float(np.concatenate(mses).mean()),
           "images": len(images)}
    if with_ssim:
        out["ssim"] = float(np.mean(ssims))
    for name, counts in code_counts(model, all_codes).items():
        out.update({f"{name}_{k}": v for k, v in usage_terms(counts).items()})
    return out, all_codes


def code_counts(model: VQVAE2, codes: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-level histogram [K] of code grids."""
    return {name: np.bincount(c.flatten().numpy(), minlength=getattr(model.config, name).num_codes)
            for name, c in codes.items()}


@torch.no_grad()
def prior_bits(prior: GatedPixelCNN, codes: torch.Tensor, cond: torch.Tensor | None = None,
               batch: int = 64) -> torch.Tensor:
    """Code length -log2 p(codes) under the prior, in bits, per grid: float64 [N] for codes [N, h, w]."""
    prior.eval()
    device = next(prior.parameters()).device
    out = []
    for i in range(0, len(codes), batch):
        c = codes[i:i + batch].to(device)
        logits = prior(c, None if cond is None else cond[i:i + batch].to(device))
        nats = F.cross_entropy(logits.float(), c, reduction="none").double().flatten(1).sum(1)
        out.append(nats.cpu() / math.log(2))
    return torch.cat(out)


def prior_nll_bits(prior: GatedPixelCNN, codes: torch.Tensor, cond: torch.Tensor | None = None,
                   batch: int = 64) -> float:
    """Mean negative log-likelihood of code grids [N, h, w] in bits per code."""
    return float(prior_bits(prior, codes, cond, batch).sum()) / codes.numel()
