"""``vqtok export``: trained checkpoints -> bundle directory, checked against PyTorch."""
from __future__ import annotations

import json

from training.data import describe_sources, heldout_files, thumbnails
from training.evaluate import training_summary
from training.export import export_bundle
from training.loop import load_checkpoint
from training.train_prior import load_prior, load_vqvae


def main(args, check) -> int:
    """``check``: the parity check, ``service.runtime.parity.check`` (passed in by ``vqtok export``)."""
    vqvae = load_vqvae(args.vqvae)
    cfg = load_checkpoint(args.vqvae)["config"]
    # Parity is checked on held-out thumbnails: what the bundle will be served by default.
    check_images = thumbnails(heldout_files(cfg["data"], cfg["val_fraction"]), cfg["image_size"], set(), 32)
    metrics = json.loads(args.eval.read_text()) if args.eval else {}
    metrics.get("native", {}).pop("per_image", None)  # the file-by-file rows stay in eval.json
    training = {"vqvae": training_summary(args.vqvae), "prior_top": training_summary(args.prior_top),
                "prior_bottom": training_summary(args.prior_bottom)}
    data = describe_sources(cfg["data"], cfg["val_fraction"], cfg.get("cache_side", 0), cfg.get("data_terms", ""))
    manifest = export_bundle(vqvae, load_prior(args.prior_top), load_prior(args.prior_bottom), args.out,
                             cfg["image_size"], check_images, name=args.name, check=check, metrics=metrics,
                             training=training, data=data)
    print(json.dumps(manifest["parity"], indent=2))
    print(f"bundle written to {args.out}")
    return 0
