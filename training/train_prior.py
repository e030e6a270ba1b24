"""``vqtok train-prior --level top|bottom``: a gated PixelCNN over the frozen VQ-VAE's codes.

Crops are encoded on the fly, so the prior sees as many distinct code grids as the data
offers rather than a fixed pre-encoded set. The bottom prior is conditioned on the top codes.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import VQVAE2, GatedPixelCNN
from training import plots
from training.config import PriorTrainConfig
from training.data import make_source
from training.distributed import place
from training.export import to_model_input, to_uint8_images
from training.loop import (
    Run,
    checkpoint_path,
    load_checkpoint,
    load_model,
    read_metrics,
    resolve_config,
    train,
    warmup_cosine,
)
from training.metrics import prior_nll_bits


def load_vqvae(path) -> VQVAE2:
    """The trained VQ-VAE of a run, frozen."""
    return load_model(path, "vqvae").requires_grad_(False)


def load_prior(path) -> GatedPixelCNN:
    return load_model(path, "prior")


@torch.no_grad()
def encode_codes(vqvae: VQVAE2, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """Code grids per level, on the VQ-VAE's device, for uint8 images [N, H, W, 3]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    device = next(vqvae.parameters()).device
    levels = vqvae.encode(to_model_input(images.to(device)), training=False)
    return {name: lv["codes"] for name, lv in levels.items()}


def vqvae_cache(vqvae_path) -> Path:
    """The packed training images of a VQ-VAE run (its --cache, else RUN/cache)."""
    cfg = load_checkpoint(vqvae_path)["config"]
    return Path(cfg["cache"]) if cfg.get("cache") else checkpoint_path(vqvae_path).parent / "cache"


def split_codes(codes: dict[str, torch.Tensor], level: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target grid, conditioning grid) for a prior of the given level."""
    return codes[level], (codes["top"] if level == "bottom" else None)


def sample_codes(prior: GatedPixelCNN, n: int, h: int, w: int, cond: torch.Tensor | None,
                 seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """Codes [n, h, w] from the prior with the cached sampler (previews and evaluation grids)."""
    from service.bundle.sampling import gumbel_noise
    from training.fast_sampling import sample_cached_torch

    noise = gumbel_noise(seed, n, h, w, prior.config.num_codes)
    codes = sample_cached_torch(prior, noise, np.full(n, temperature, np.float32), np.zeros(n, np.int64), cond)
    return torch.from_numpy(codes)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg, ckpt = resolve_config(PriorTrainConfig, args)
    if cfg.level not in ("top", "bottom"):
        raise SystemExit("--level must be top or bottom")
    if not cfg.vqvae:
        raise SystemExit("--vqvae (the VQ-VAE run directory) is required")
    placement = place(cfg.device, cfg.threads, cfg.precision)
    vqvae = load_vqvae(cfg.vqvae).to(placement.device)
    if cfg.level not in vqvae.config.level_names:
        raise SystemExit(f"this VQ-VAE has no {cfg.level} level")
    if cfg.level == "top":
        num_codes, cond_codes = vqvae.config.top.num_codes, 0
    else:
        num_codes, cond_codes = vqvae.config.bottom.num_codes, (vqvae.config.top.num_codes
                                                                if vqvae.config.levels == 2 else 0)
    torch.manual_seed(cfg.seed)
    model = GatedPixelCNN(cfg.model_config(num_codes, cond_codes))
    if cfg.init and ckpt is None:
        from training.from_bundle import warm_start

        warm_start(model, cfg.init, cfg.level)
    model = placement.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps))
    run = Run("prior", args.run, cfg, model, optimizer, scheduler, np.random.default_rng(cfg.seed),
              extra={"level": cfg.level})
    if ckpt is not None:
        run.restore(ckpt)
    cache = Path(cfg.cache) if cfg.cache else vqvae_cache(cfg.vqvae)
    source = make_source(cfg.data, cfg.image_size, cfg.val_fraction, cache, cfg.cache_side).to(placement.device)
    held_target, held_cond = split_codes(encode_codes(vqvae, source.heldout()), cfg.level)
    log2k = math.log2(num_codes)
    args.run.mkdir(parents=True, exist_ok=True)

    def step() -> dict[str, float]:
        model.train()
        target, cond = split_codes(encode_codes(vqvae, source.crops(run.rng, cfg.batch_size)), cfg.level)
        with placement.autocast():
            logits = model(target, cond)
        loss = F.cross_entropy(logits.float(), target)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        bits = float(loss.detach()) / math.log(2)
        return {"loss": float(loss.detach()), "bits_per_code": bits, "log2_K": log2k}

    def evaluate() -> dict[str, float]:
        return {"bits_per_code": prior_nll_bits(model, held_target, held_cond), "log2_K": log2k}

    train(run, step, evaluate, lambda m: {"bits/code": f"{m['bits_per_code']:.3f}"})
    plots.save_curves(read_metrics(args.run), ["bits_per_code"], args.run / "loss_curves.png",
                      f"{cfg.level} prior (log2 K = {log2k:.0f})")
    cpu = (lambda t: None if t is None else t.cpu())  # the cached sampler of the preview runs on the CPU
    preview(model.cpu(), vqvae.cpu(), cfg.level, cpu(held_target), cpu(held_cond), args.run)
    final = [r for r in read_metrics(args.run) if r.get("split") == "heldout"][-1]
    print(f"done: step {run.step}, held-out {final['bits_per_code']:.3f} bits/code (log2 K = {log2k:.0f})")
    return 0


def preview(prior: GatedPixelCNN, vqvae: VQVAE2, level: str, held_target: torch.Tensor,
            held_cond: torch.Tensor | None, run_dir) -> None:
    """samples.png: first row held-out, second row sampled.

    Bottom prior: images decoded from held-out top codes with their real vs sampled bottom codes.
    Top prior: no image exists without bottom codes, so both rows are false-colour code maps.
    """
    n = min(8, len(held_target))
    h, w = held_target.shape[1:]
    cond = held_cond[:n] if held_cond is not None else None
    codes = sample_codes(prior, n, h, w, cond)
    if level == "bottom":
        real = to_uint8_images(vqvae.decode_codes(held_target[:n], cond))
        grid = torch.cat([real, to_uint8_images(vqvae.decode_codes(codes, cond))]).numpy()
    else:
        palette = np.random.default_rng(0).integers(0, 256, (prior.config.num_codes, 3), dtype=np.uint8)
        maps = np.concatenate([palette[held_target[:n].numpy()], palette[codes.numpy()]])
        grid = np.repeat(np.repeat(maps, 8, axis=1), 8, axis=2)
    plots.save_grid(grid, run_dir / "samples.png", columns=n)

