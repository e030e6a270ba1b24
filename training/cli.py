"""The ``vqtok`` command line.

Parsers only at import time: each subcommand imports its implementation when it runs, so
``vqtok serve`` and ``vqtok sample`` work in an install without torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.config import DEFAULT_BUNDLE


def _train_vqvae(args):
    from training.train_vqvae import main
    return main(args)


def _train_prior(args):
    from training.train_prior import main
    return main(args)


def _evaluate(args):
    from training.evaluate import main
    return main(args)


def _export(args):
    from training.export_cli import main
    return main(args)


def _serve(args):
    from service.server import serve
    return serve(model_dir=args.model, host=args.host, port=args.port)


def _sample(args):
    from service.sample_cli import main
    return main(args)


def _tokenize(args):
    from service.tokenize_job import main
    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from training.config import PriorTrainConfig, VQVAETrainConfig, add_config_args

    parser = argparse.ArgumentParser(prog="vqtok", description="VQ-VAE-2 image tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-vqvae", help="train the VQ-VAE-2 on an image folder or the built-in photos")
    p.add_argument("--run", required=True, type=Path, help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    add_config_args(p, VQVAETrainConfig)
    p.set_defaults(func=_train_vqvae)

    p = sub.add_parser("train-prior", help="train a gated PixelCNN prior over the frozen VQ-VAE's codes")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--resume", action="store_true")
    add_config_args(p, PriorTrainConfig)
    p.set_defaults(func=_train_prior)

    p = sub.add_parser("evaluate", help="held-out metrics (JSON + Markdown)")
    p.add_argument("--vqvae", required=True, type=Path, help="VQ-VAE run directory or checkpoint")
    p.add_argument("--prior-top", type=Path, help="top prior run directory or checkpoint")
    p.add_argument("--prior-bottom", type=Path, help="bottom prior run directory or checkpoint")
    p.add_argument("--out", type=Path, help="output directory (default: the VQ-VAE run directory)")
    p.add_argument("--max-images", type=int, default=512, help="held-out crops to evaluate")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("export", help="export a bundle (ONNX + manifest) and check parity")
    p.add_argument("--vqvae", required=True, type=Path)
    p.add_argument("--prior-top", required=True, type=Path)
    p.add_argument("--prior-bottom", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", default="vqtok-default")
    p.add_argument("--eval", type=Path, help="evaluation JSON to embed in the manifest")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="serve a bundle over HTTP")
    p.add_argument("--model", type=Path, default=None, help=f"bundle directory (default {DEFAULT_BUNDLE})")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_serve)

    p = sub.add_parser("tokenize", help="tokenize an image folder through a running service (resumable)")
    p.add_argument("dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder: shard-*.npz and errors.jsonl")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("VQTOK_API_KEY"), help="default: $VQTOK_API_KEY")
    p.add_argument("--batch", type=int, default=16, help="images per request")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("sample", help="sample images from a bundle's priors")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--sampler", choices=["cached", "naive"], default="cached")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
