"""``vqtok train-vqvae``: train the VQ-VAE-2 on random crops, evaluating on held-out images."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from models import VQVAE2
from training import plots
from training.config import VQVAETrainConfig
from training.data import make_source
from training.export import to_model_input
from training.loop import Run, read_metrics, resolve_config, train, warmup_cosine
from training.metrics import code_counts, encode_batches, vqvae_metrics


def build_run(args) -> tuple[Run, object]:
    cfg, ckpt = resolve_config(VQVAETrainConfig, args)
    torch.manual_seed(cfg.seed)
    model = VQVAE2(cfg.model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps))
    run = Run("vqvae", args.run, cfg, model, optimizer, scheduler, np.random.default_rng(cfg.seed))
    if ckpt is not None:
        run.restore(ckpt)
    return run, make_source(cfg.data, cfg.image_size, cfg.val_fraction)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run, source = build_run(args)
    model, cfg = run.model, run.config
    heldout = source.heldout()
    args.run.mkdir(parents=True, exist_ok=True)

    def step() -> dict[str, float]:
        model.train()
        x = to_model_input(torch.from_numpy(source.sample_batch(run.rng, cfg.batch_size)))
        out = model(x, training=True)
        mse = F.mse_loss(out["recon"], x)
        loss = mse + out["commitment"]
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        # Images live in [-1, 1], so MSE on the [0, 1] scale is a quarter of it.
        mse, loss = mse.detach(), loss.detach()
        metrics = {"loss": float(loss), "mse": float(mse) / 4, "psnr": float(10 * torch.log10(4 / mse)),
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

    train(run, step, evaluate, postfix)
    records = read_metrics(args.run)
    plots.save_curves(records, ["loss", "psnr"], args.run / "loss_curves.png", "VQ-VAE training")
    if not heldout_codes:  # resumed at the last step: no evaluation ran in this process
        evaluate()
    plots.save_usage(code_counts(model, heldout_codes), args.run / "codebook_usage.png")
    final = [r for r in records if r.get("split") == "heldout"][-1]
    print(f"done: step {run.step}, held-out PSNR {final['psnr']:.2f} dB; checkpoint in {args.run}")
    return 0
