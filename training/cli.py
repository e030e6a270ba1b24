"""The training subcommands of ``vqtok``: train-vqvae, train-prior, evaluate, export, experiment.

``service.cli`` hands these commands over, so the torch-free server never imports this package.
Each subcommand imports its implementation when it runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _train_vqvae(args, _check):
    from training.train_vqvae import main
    return main(args)


def _train_prior(args, _check):
    from training.train_prior import main
    return main(args)


def _evaluate(args, _check):
    from training.evaluate import main
    return main(args)


def _export(args, check):
    from training.export_cli import main
    return main(args, check)


def _experiment(args, _check):
    from training.vae_prior import main
    main(args.rest)  # returns the report dict, which it has also written to --out
    return 0


COMMANDS = ("train-vqvae", "train-prior", "evaluate", "export", "experiment")


def add_commands(sub: Any) -> None:
    """Add the training subcommands to an ``add_subparsers()`` object."""
    from training.config import PriorTrainConfig, VQVAETrainConfig, add_config_args

    p = sub.add_parser("train-vqvae", help="train the VQ-VAE-2 on image folders or the built-in photos")
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
    p.add_argument("--vqvae", type=Path, help="VQ-VAE run directory or checkpoint")
    p.add_argument("--bundle", type=Path, help="evaluate this bundle (its graphs' weights) instead of a run")
    p.add_argument("--data", help="sources whose held-out files to use (default: the run's own --data)")
    p.add_argument("--val-fraction", type=float, help="held-out share of folder files (default: the run's)")
    p.add_argument("--prior-top", type=Path, help="top prior run directory or checkpoint")
    p.add_argument("--prior-bottom", type=Path, help="bottom prior run directory or checkpoint")
    p.add_argument("--out", type=Path, help="output directory (default: the VQ-VAE run directory)")
    p.add_argument("--max-images", type=int, default=512, help="held-out files to evaluate")
    p.add_argument("--no-native", action="store_true",
                   help="thumbnails only: skip the native-size evaluation and the JPEG/WebP comparison")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("export", help="export a bundle (ONNX + manifest) and check parity")
    p.add_argument("--vqvae", required=True, type=Path)
    p.add_argument("--prior-top", required=True, type=Path)
    p.add_argument("--prior-bottom", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", default="vqtok-default")
    p.add_argument("--eval", type=Path, help="evaluation JSON to embed in the manifest")
    p.set_defaults(func=_export)

    p = sub.add_parser("experiment", help="training-side experiments: vae-prior (the lecture's flow prior)")
    p.add_argument("name", choices=["vae-prior"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the experiment's own flags (--help for them)")
    p.set_defaults(func=_experiment)


def main(argv: list[str], check=None) -> int:
    """Run one training subcommand. ``check`` is the export parity check (ONNX Runtime's), which
    ``vqtok`` (``service.cli``) passes in: training never imports the runtime itself."""
    parser = argparse.ArgumentParser(prog="vqtok")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if check is None and args.command == "export":
        parser.error("export needs the parity check: run it as `vqtok export` (service.cli)")
    return args.func(args, check) or 0
