"""``vqtok evaluate``: held-out numbers for a VQ-VAE and its priors, as JSON and Markdown.

Every number comes from images the models never trained on (photos or files held out whole).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from training import plots
from training.data import make_source
from training.export import to_uint8_images
from training.loop import checkpoint_path, load_checkpoint
from training.metrics import prior_nll_bits, vqvae_metrics
from training.train_prior import load_prior, load_vqvae, sample_codes, split_codes


def training_summary(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    return {"steps": ckpt["step"], "batch_size": cfg["batch_size"], "lr": cfg["lr"], "data": cfg["data"],
            "image_size": cfg["image_size"], "checkpoint": str(checkpoint_path(path))}


def evaluate(vqvae_path: Path, prior_paths: dict[str, Path | None], max_images: int) -> dict[str, Any]:
    vqvae = load_vqvae(vqvae_path)
    cfg = load_checkpoint(vqvae_path)["config"]
    source = make_source(cfg["data"], cfg["image_size"], cfg["val_fraction"])
    images = source.heldout(max_images)
    recon, codes = vqvae_metrics(vqvae, images)
    report: dict[str, Any] = {
        "heldout_images": len(images), "image_size": cfg["image_size"], "data": cfg["data"],
        "reconstruction": {k: recon[k] for k in ("psnr", "mse", "ssim")},
        "levels": {}, "training": {"vqvae": training_summary(vqvae_path)},
    }
    total_uniform, total_prior = 0.0, 0.0
    for name in vqvae.config.level_names:
        level = {k[len(name) + 1:]: v for k, v in recon.items() if k.startswith(name + "_")}
        positions = int(codes[name][0].numel())
        level["positions_per_image"] = positions
        total_uniform += positions * level["log2_K"]
        path = prior_paths.get(name)
        if path is not None:
            target, cond = split_codes(codes, name)
            level["prior_bits_per_code"] = prior_nll_bits(load_prior(path), target, cond)
            level["prior_gain_bits"] = level["log2_K"] - level["prior_bits_per_code"]
            total_prior += positions * level["prior_bits_per_code"]
            report["training"][f"prior_{name}"] = training_summary(path)
        report["levels"][name] = level
    report["code_length_bits_per_image"] = {"uniform_prior": total_uniform}
    if all(prior_paths.get(n) for n in vqvae.config.level_names):
        report["code_length_bits_per_image"]["learned_prior"] = total_prior
    return report


def to_markdown(report: dict[str, Any]) -> str:
    r = report["reconstruction"]
    lines = [f"Held-out: {report['heldout_images']} crops of {report['image_size']}x{report['image_size']} "
             f"from images never trained on ({report['data']}).", "",
             "| metric | value |", "|---|---|",
             f"| PSNR | {r['psnr']:.2f} dB |", f"| MSE (0-1 scale) | {r['mse']:.5f} |", f"| SSIM | {r['ssim']:.4f} |"]
    for name, lv in report["levels"].items():
        lines += [f"| {name}: codes used | {lv['codes_used_pct']:.1f} % of {2 ** round(lv['log2_K'])} |",
                  f"| {name}: perplexity | {lv['perplexity']:.1f} |",
                  f"| {name}: I[x,z] = H(usage) | {lv['mutual_information_bits']:.3f} bits |",
                  f"| {name}: KL(q_agg ‖ uniform) = log2 K − H | {lv['kl_qagg_uniform_bits']:.3f} bits |"]
        if "prior_bits_per_code" in lv:
            lines.append(f"| {name}: prior NLL | {lv['prior_bits_per_code']:.3f} bits/code "
                         f"(log2 K = {lv['log2_K']:.0f}, gain {lv['prior_gain_bits']:.3f}) |")
    for kind, bits in report["code_length_bits_per_image"].items():
        lines.append(f"| code length, {kind.replace('_', ' ')} | {bits:.0f} bits/image |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    priors = {"top": args.prior_top, "bottom": args.prior_bottom}
    report = evaluate(args.vqvae, priors, args.max_images)
    out = Path(args.out or (args.vqvae if Path(args.vqvae).is_dir() else Path(args.vqvae).parent))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(to_markdown(report))
    if args.prior_top and args.prior_bottom:
        save_samples(args.vqvae, args.prior_top, args.prior_bottom, out / "samples.png")
    print(to_markdown(report))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


@torch.no_grad()
def save_samples(vqvae_path: Path, top_path: Path, bottom_path: Path, path: Path, n: int = 16) -> None:
    """Fresh images: top codes from the top prior, then bottom codes conditioned on them."""
    vqvae, prior_top, prior_bottom = load_vqvae(vqvae_path), load_prior(top_path), load_prior(bottom_path)
    size = load_checkpoint(vqvae_path)["config"]["image_size"]
    strides = vqvae.config.strides
    top = sample_codes(prior_top, n, size // strides["top"], size // strides["top"], None, seed=0)
    bottom = sample_codes(prior_bottom, n, size // strides["bottom"], size // strides["bottom"], top, seed=1)
    plots.save_grid(to_uint8_images(vqvae.decode_codes(bottom, top)).numpy(), path)

