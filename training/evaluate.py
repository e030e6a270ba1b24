"""``vqtok evaluate``: held-out numbers for a VQ-VAE and its priors, as JSON and Markdown.

Every number comes from files the models never trained on (held out whole, see ``training.data``):

* thumbnails: each file exactly as ``/v1/encode`` sees it by default (shorter side to the model
  size, centre crop): PSNR, SSIM, code usage with the ELBO-surgery terms, prior bits per code;
* native size: each whole file as ``fit=none`` takes it (cropped to a multiple of the coarsest
  stride), through the fully convolutional encoder and decoder: PSNR, and the code length under the
  priors (-log2 p of each code) in bits per pixel; then JPEG and WebP at the same number of bytes
  (ceil(bits / 8)) file by file, and the PSNR gap to each.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.bundle.images import crop_to_multiple, psnr
from training import plots
from training.codecs import at_budget
from training.data import PhotoSource, heldout_files, load_rgb, portable_path, portable_sources, thumbnails
from training.export import to_uint8_images
from training.loop import checkpoint_path, load_checkpoint
from training.metrics import encode_batches, prior_bits, usage_terms, vqvae_metrics
from training.train_prior import load_prior, load_vqvae, sample_codes, split_codes

CODECS = ("JPEG", "WEBP")
log = logging.getLogger(__name__)


def training_summary(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    # Paths as given but never a machine's absolute ones: the summary goes into bundles and reports.
    return {"steps": ckpt["step"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
            "data": portable_sources(cfg["data"]), "image_size": cfg["image_size"],
            "init": portable_path(cfg.get("init", "")), "checkpoint": portable_path(checkpoint_path(path))}


def level_report(vqvae, recon: dict[str, float], codes: dict[str, torch.Tensor], priors: dict) -> dict[str, Any]:
    """Per level: usage terms (from ``vqvae_metrics``) and, with a prior, its bits per code."""
    out = {}
    for name in vqvae.config.level_names:
        level = {k[len(name) + 1:]: v for k, v in recon.items() if k.startswith(name + "_")}
        level["positions_per_image"] = int(codes[name][0].numel())
        if name in priors:
            target, cond = split_codes(codes, name)
            level["prior_bits_per_code"] = float(prior_bits(priors[name], target, cond).sum() / target.numel())
            level["prior_gain_bits"] = level["log2_K"] - level["prior_bits_per_code"]
        out[name] = level
    return out


@torch.no_grad()
def native_report(vqvae, priors: dict, files: list[Path], multiple: int,
                  figure: Path | None = None) -> dict[str, Any]:
    """Whole held-out files at native size: PSNR, code length under the priors, JPEG/WebP at those bytes.

    ``figure``: where to draw the first file next to its reconstruction and the two codecs' files.
    """
    rows, counts = [], {n: 0 for n in vqvae.config.level_names}
    for path in files:
        try:
            image = crop_to_multiple(load_rgb(path), multiple)
        except Exception as e:  # noqa: BLE001 - unreadable files are skipped, as in training
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        if min(image.shape[:2]) < multiple:
            continue
        _, codes, recon = next(encode_batches(vqvae, image[None]))
        counts = {n: counts[n] + np.bincount(c.flatten().numpy(), minlength=getattr(vqvae.config, n).num_codes)
                  for n, c in codes.items()}
        row: dict[str, Any] = {"file": path.name, "height": image.shape[0], "width": image.shape[1],
                               "psnr": float(psnr(image, recon[0]))}
        if len(priors) == len(codes):
            level_bits = {n: float(prior_bits(priors[n], *split_codes(codes, n)).sum()) for n in codes}
            row["level_bits"] = level_bits
            row["level_codes"] = {n: int(c.numel()) for n, c in codes.items()}
            bits = sum(level_bits.values())
            budget = math.ceil(bits / 8)
            row.update(bits=bits, bytes=budget, bits_per_pixel=bits / (image.shape[0] * image.shape[1]))
            coded = {fmt: at_budget(image, fmt, budget) for fmt in CODECS}
            for fmt, c in coded.items():
                row[fmt.lower()] = {"psnr": c.psnr, "bytes": c.bytes, "quality": c.quality,
                                    "over_budget": c.over_budget}
            if figure is not None and not rows:
                plots.save_panels([(f"held out: {path.name}", image),
                                   (f"tokens: {row['psnr']:.2f} dB, {budget} B", recon[0]),
                                   *((f"{c.format} q{c.quality}: {c.psnr:.2f} dB, {c.bytes} B", c.decoded)
                                     for c in coded.values())], figure)
        rows.append(row)
    report: dict[str, Any] = {"images": len(rows), "psnr": float(np.mean([r["psnr"] for r in rows])),
                              "codes_used_pct": {n: usage_terms(c)["codes_used_pct"] for n, c in counts.items()}}
    if rows and "bits" in rows[0]:
        report["bits_per_pixel"] = float(np.mean([r["bits_per_pixel"] for r in rows]))
        # Per level, pooled over every code of every file: what the priors cost at full-photo scale.
        report["prior_bits_per_code"] = {
            n: sum(r["level_bits"][n] for r in rows) / sum(r["level_codes"][n] for r in rows) for n in rows[0]["level_bits"]}
        for fmt in (f.lower() for f in CODECS):
            ps = np.array([r[fmt]["psnr"] for r in rows])
            report[fmt] = {"psnr": float(ps.mean()),
                           "gap_db": float(report["psnr"] - ps.mean()),  # > 0: the tokenizer is better
                           "wins": int(sum(r["psnr"] > r[fmt]["psnr"] for r in rows)),
                           "over_budget": int(sum(r[fmt]["over_budget"] for r in rows))}
    report["per_image"] = rows
    return report


def evaluate_models(vqvae, priors: dict, data: str, val_fraction: float, image_size: int,
                    max_images: int | None = None, native: bool = True,
                    figures: Path | None = None) -> dict[str, Any]:
    """The report for a VQ-VAE and its priors (by level) on the held-out files of ``data``; with
    ``figures`` (a directory), also reconstructions.png and native_comparison.png there."""
    files = heldout_files(data, val_fraction)[:max_images]
    images = thumbnails(files, image_size, set())
    recon, codes = vqvae_metrics(vqvae, images)
    if figures is not None:
        chunk, _, decoded = next(encode_batches(vqvae, images[:16]))
        plots.save_reconstructions(chunk, decoded, figures / "reconstructions.png")
    report: dict[str, Any] = {
        "heldout_images": len(images), "image_size": image_size, "data": portable_sources(data),
        "val_fraction": val_fraction,
        "reconstruction": {k: recon[k] for k in ("psnr", "mse", "ssim")},
        "levels": level_report(vqvae, recon, codes, priors),
    }
    # A figure anyone can reproduce without the data folder: the built-in held-out photos' crops
    # (tests/test_default_bundle.py recomputes it through the ONNX graphs).
    crops = PhotoSource.build(image_size).heldout()
    report["photos_heldout_crops"] = {"images": len(crops), "psnr": vqvae_metrics(vqvae, crops, with_ssim=False)[0]["psnr"]}
    positions = {n: lv["positions_per_image"] for n, lv in report["levels"].items()}
    report["code_length_bits_per_image"] = {
        "uniform_prior": sum(positions[n] * lv["log2_K"] for n, lv in report["levels"].items())}
    if len(priors) == len(positions):
        report["code_length_bits_per_image"]["learned_prior"] = sum(
            positions[n] * lv["prior_bits_per_code"] for n, lv in report["levels"].items())
    if native:
        multiple = max(vqvae.config.strides[n] for n in positions)
        figure = figures / "native_comparison.png" if figures is not None else None
        report["native"] = native_report(vqvae, priors, files, multiple, figure)
    return report


def evaluate(vqvae_path: Path, prior_paths: dict[str, Path | None], max_images: int | None,
             native: bool = True, data: str | None = None, val_fraction: float | None = None,
             figures: Path | None = None) -> dict[str, Any]:
    """The report for trained checkpoints, on their own held-out files unless ``data`` says otherwise."""
    cfg = load_checkpoint(vqvae_path)["config"]
    priors = {n: load_prior(p) for n, p in prior_paths.items() if p is not None}
    report = evaluate_models(load_vqvae(vqvae_path), priors, data or cfg["data"],
                             cfg["val_fraction"] if val_fraction is None else val_fraction,
                             cfg["image_size"], max_images, native, figures)
    report["training"] = {"vqvae": training_summary(vqvae_path),
                          **{f"prior_{n}": training_summary(p) for n, p in prior_paths.items() if p is not None}}
    return report


def evaluate_bundle(directory: Path, data: str, val_fraction: float, max_images: int | None,
                    native: bool = True, figures: Path | None = None) -> dict[str, Any]:
    """The report for a shipped bundle (its weights rebuilt in PyTorch, see ``training.from_bundle``)."""
    from training.from_bundle import from_bundle

    vqvae, priors, bundle = from_bundle(directory)
    report = evaluate_models(vqvae, priors, data, val_fraction, bundle.image_size, max_images, native, figures)
    report["bundle"] = {"path": portable_path(directory), "name": bundle.manifest["name"],
                        "training": bundle.manifest.get("training", {})}
    return report


def to_markdown(report: dict[str, Any]) -> str:
    r = report["reconstruction"]
    size = report["image_size"]
    lines = [f"Held-out: {report['heldout_images']} files never trained on ({report['data']}).", "",
             "| metric | value |", "|---|---|",
             f"| thumbnails {size}x{size}: PSNR | {r['psnr']:.2f} dB |",
             f"| thumbnails: MSE (0-1 scale) | {r['mse']:.5f} |", f"| thumbnails: SSIM | {r['ssim']:.4f} |"]
    for name, lv in report["levels"].items():
        lines += [f"| {name}: codes used (thumbnails) | {lv['codes_used_pct']:.1f} % of {2 ** round(lv['log2_K'])} |",
                  f"| {name}: perplexity | {lv['perplexity']:.1f} |",
                  f"| {name}: I[x,z] = H(usage) | {lv['mutual_information_bits']:.3f} bits |",
                  f"| {name}: KL(q_agg ‖ uniform) = log2 K − H | {lv['kl_qagg_uniform_bits']:.3f} bits |"]
        if "prior_bits_per_code" in lv:
            lines.append(f"| {name}: prior NLL | {lv['prior_bits_per_code']:.3f} bits/code "
                         f"(log2 K = {lv['log2_K']:.0f}, gain {lv['prior_gain_bits']:.3f}) |")
    for kind, bits in report["code_length_bits_per_image"].items():
        lines.append(f"| thumbnail code length, {kind.replace('_', ' ')} | {bits:.0f} bits/image |")
    nat = report.get("native")
    if nat:
        lines.append(f"| native size ({nat['images']} files): PSNR | {nat['psnr']:.2f} dB |")
        for name, pct in nat["codes_used_pct"].items():
            lines.append(f"| native size: {name} codes used | {pct:.1f} % |")
        if "bits_per_pixel" in nat:
            lines.append(f"| native size: code length under the priors | {nat['bits_per_pixel']:.3f} bits/pixel |")
            for fmt in ("jpeg", "webp"):
                c = nat[fmt]
                over = f", {c['over_budget']} over budget at lowest quality" if c["over_budget"] else ""
                lines.append(f"| native size: {fmt.upper()} at the same bytes | {c['psnr']:.2f} dB "
                             f"(tokenizer {c['gap_db']:+.2f} dB, better on {c['wins']}/{nat['images']}{over}) |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    native = not args.no_native
    if args.bundle:
        if not args.data or not args.out:
            raise SystemExit("--bundle needs --data (whose held-out files to use) and --out")
    elif not args.vqvae:
        raise SystemExit("evaluate needs --vqvae (a run) or --bundle (a bundle directory)")
    out = Path(args.out or (args.vqvae if Path(args.vqvae).is_dir() else Path(args.vqvae).parent))
    out.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        report = evaluate_bundle(args.bundle, args.data, args.val_fraction or 0.1, args.max_images, native, out)
    else:
        priors = {"top": args.prior_top, "bottom": args.prior_bottom}
        report = evaluate(args.vqvae, priors, args.max_images, native, args.data, args.val_fraction, out)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(to_markdown(report))
    if args.vqvae and args.prior_top and args.prior_bottom:
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

