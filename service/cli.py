"""The ``vqtok`` command line.

Parsers only at import time: each subcommand imports its implementation when it runs. ``serve``,
``sample``, ``tokenize`` and ``export-triton`` are torch-free; the training subcommands (``train-vqvae``,
``train-prior``, ``evaluate``, ``export``, ``experiment``) are handed to ``training.cli`` whole, so
an install without torch never imports the training package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service.bundle import DEFAULT_BUNDLE

TRAINING_COMMANDS = {
    "train-vqvae": "train the VQ-VAE-2 on image folders or the built-in photos",
    "train-prior": "train a gated PixelCNN prior over the frozen VQ-VAE's codes",
    "evaluate": "held-out metrics (JSON + Markdown)",
    "export": "export a bundle (ONNX + manifest) and check parity with ONNX Runtime",
    "experiment": "training-side experiments: vae-prior",
}


def _serve(args) -> int:
    from service.api.server import serve

    return serve(models=args.model, models_dir=args.models, host=args.host, port=args.port)


def _tokenize(args) -> int:
    from service.jobs.tokenize import main

    return main(args)


def _export_triton(args) -> int:
    from service.runtime.triton import TritonConfig, export_triton

    written = export_triton(args.bundle, args.out, TritonConfig(max_batch_size=args.max_batch,
                                                                 max_queue_delay_us=args.max_delay_us))
    print(json.dumps({"repository": str(args.out), "models": written}))
    return 0


def _sample(args) -> int:
    from service.jobs.sample import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok", description="VQ-VAE-2 image tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve one or several bundles over HTTP")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]DIR",
                   help=f"a bundle directory, repeatable; the first is the default (default {DEFAULT_BUNDLE})")
    p.add_argument("--models", type=Path, default=None, metavar="FOLDER",
                   help="serve every bundle in FOLDER's subfolders too, each named after its subfolder")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_serve)

    p = sub.add_parser("tokenize", help="tokenize an image folder (resumable): through a service, --local or --ray")
    p.add_argument("dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder: shard-*.npz and errors.jsonl")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run ONNX Runtime in this process (no service)")
    where.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run as a Ray Data pipeline; ADDRESS of a cluster (e.g. auto, ray://head:10001), "
                            "none: a local Ray")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default job)")
    p.add_argument("--api-key", default=os.environ.get("VQTOK_API_KEY"), help="default: $VQTOK_API_KEY")
    p.add_argument("--served-model", default=None, metavar="NAME[@VERSION]",
                   help="which of the service's bundles (GET /v1/models; default: its first)")
    p.add_argument("--model", type=Path, default=None, help=f"bundle for --local/--ray (default {DEFAULT_BUNDLE})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for --local/--ray")
    p.add_argument("--batch", type=int, default=None,
                   help="images per request (service: 16) or per encoder run (--local: 16 CPU, 512 CUDA)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (service)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (--local; default one per core) "
                                                             "or encoder actors (--ray; default one per GPU, else 1)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--parquet", action="store_true", help="also write Parquet shards for trainers (needs pyarrow)")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository for a bundle")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("out", type=Path, help="model repository to create")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every model")
    p.add_argument("--max-delay-us", type=int, default=2000, help="dynamic batching: longest wait for a fuller batch")
    p.set_defaults(func=_export_triton)

    p = sub.add_parser("sample", help="sample images from a bundle's priors")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--sampler", choices=["cached", "naive"], default="cached")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.set_defaults(func=_sample)

    for name, text in TRAINING_COMMANDS.items():
        # Listed for --help; parsed by training.cli (needs the [train] extra).
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        try:
            from training.cli import main as training_main
        except ImportError as e:
            print(f"vqtok {argv[0]}: needs the training extra (pip install 'vqtok[train]'): {e}", file=sys.stderr)
            return 2
        check = None
        if argv[0] == "export":
            from service.runtime.parity import check
        return training_main(argv, check)
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
