"""``vqtok train-vqvae``: train the VQ-VAE-2 on random crops, evaluating on held-out images.

Runs on one CPU or GPU, or on several processes under ``torchrun`` (see ``training.distributed``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import VQVAE2
from service.bundle.images import psnr_from_mse
from training import plots
from training.config import VQVAETrainConfig
from training.data import PackedSource, make_source
from training.distributed import Placement, leave, place
from training.export import to_model_input
from training.loop import Run, read_metrics, resolve_config, train, warmup_cosine
from training.metrics import code_counts, encode_batches, vqvae_metrics


def cache_dir(cfg, run_dir: Path) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(run_dir) / "cache"


def load_source(cfg, directory: Path, placement: Placement) -> PackedSource:
    """The packed data on the run's device; rank 0 decodes it first, the others then read its cache."""
    if not placement.main:
        placement.barrier()
    source = make_source(cfg.data, cfg.image_size, cfg.val_fraction, directory, cfg.cache_side)
    if placement.main:
        placement.barrier()
    return source.to(placement.device)


def build_run(args) -> tuple[Run, PackedSource, Placement]:
    cfg, ckpt = resolve_config(VQVAETrainConfig, args)
    placement = place(cfg.device, cfg.threads, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = VQVAE2(cfg.model_config())
    if cfg.init and ckpt is None:
        from training.from_bundle import warm_start

        warm_start(model, cfg.init)
    model = placement.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps))
    # One process keeps the plain seed (and bit-exact resume); ranks draw different crops.
    seed = cfg.seed if not placement.distributed else [cfg.seed, placement.rank]
    run = Run("vqvae", args.run, cfg, model, optimizer, scheduler, np.random.default_rng(seed),
              main=placement.main)
    if ckpt is not None:
        run.restore(ckpt)
        if placement.distributed:  # the checkpoint holds rank 0's stream: give each rank its own again
            run.rng = np.random.default_rng([cfg.seed, placement.rank, run.step])
    return run, load_source(cfg, cache_dir(cfg, args.run), placement), placement


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run, source, placement = build_run(args)
    model, cfg = run.model, run.config
    trained = placement.wrap(model)
    heldout = source.heldout() if placement.main else None
    args.run.mkdir(parents=True, exist_ok=True)

    def step() -> dict[str, float]:
        model.train()
        x = placement.images(to_model_input(source.crops(run.rng, cfg.batch_size)))
        with placement.autocast():
            out = trained(x, training=True)
        mse = F.mse_loss(out["recon"].float(), x)
        loss = mse + out["commitment"]
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        # Images live in [-1, 1], so MSE on the [0, 1] scale is a quarter of it.
        mse, loss = mse.detach(), loss.detach()
        metrics = {"loss": float(loss), "mse": float(mse) / 4, "psnr": float(psnr_from_mse(float(mse), peak=2.0)),  # model range [-1, 1]
                   "skipped_files": source.skipped}
        for name, lv in out["levels"].items():
            metrics[f"{name}_perplexity"] = float(lv["perplexity"])
            metrics[f"{name}_batch_usage_pct"] = float((lv["usage"] > 0).float().mean() * 100)
        return metrics

    heldout_codes: dict = {}  # from the latest evaluation, for the final usage plot

    def evaluate() -> dict[str, float]:
        chunk, _, recon = next(encode_batches(model, heldout[:16]))
        plots.save_reconstructions(chunk, recon, args.run / f"reconstructions_{run.step:06d}.png")
        metrics, codes = vqvae_metrics(model, heldout, with_ssim=False)
        heldout_codes.update(codes)
        return metrics

    def postfix(m: dict) -> dict:
        usage = "/".join(f"{m[f'{n}_batch_usage_pct']:.0f}%" for n in cfg.model_config().level_names)
        return {"loss": f"{m['loss']:.4f}", "psnr": f"{m['psnr']:.2f}", "usage": usage}

    try:
        train(run, step, evaluate, postfix)
    finally:
        leave(placement)
    if not placement.main:
        return 0
    records = read_metrics(args.run)
    plots.save_curves(records, ["loss", "psnr"], args.run / "loss_curves.png", "VQ-VAE training")
    if not heldout_codes:  # resumed at the last step: no evaluation ran in this process
        evaluate()
    plots.save_usage(code_counts(model, heldout_codes), args.run / "codebook_usage.png")
    final = [r for r in records if r.get("split") == "heldout"][-1]
    print(f"done: step {run.step}, held-out PSNR {final['psnr']:.2f} dB; checkpoint in {args.run}")
    return 0
