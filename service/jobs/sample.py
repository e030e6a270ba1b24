"""``vqtok sample``: sample code grids from a bundle's priors with ONNX Runtime, decode them, and
write a PNG grid of the images and the codes (.npz, with the seed and settings that reproduce them).

    vqtok sample [--model BUNDLE] [--n 8] [--seed 0] [--temperature 1] [--top-k K] [--sampler cached|naive]

Torch-free: the samplers are ``service.runtime.sampler``'s, reached through the runtime backend.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.bundle import Bundle
from service.bundle.images import image_grid
from service.bundle.sampling import noise_for
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


def main(args) -> int:
    """Sample code grids from a bundle's priors, decode them, write a PNG grid and the codes (.npz);
    ``args``: ``vqtok sample``'s options (``service.cli``)."""
    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    bundle = Bundle.load(args.model)
    threads = int(args.threads or os.environ.get("VQTOK_ORT_THREADS", "0"))
    backend = OrtBackend(bundle, RuntimeConfig(device=args.device, intra_op_threads=threads, sampler=args.sampler))
    if not backend.can_sample:
        raise SystemExit(f"bundle {bundle.name} has no priors to sample from")
    n = args.n
    t0 = time.perf_counter()
    codes = backend.sample(noise_for(bundle, args.seed, n), np.full(n, args.temperature, dtype=np.float32),
                           np.full(n, args.top_k or 0, dtype=np.int64))
    t1 = time.perf_counter()
    images = backend.decode(codes)
    t2 = time.perf_counter()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images)).save(out)
    codes_path = out.with_suffix(".npz")
    np.savez_compressed(codes_path, **codes, seed=args.seed, temperature=args.temperature,
                        top_k=args.top_k or 0, sampler=backend.sampler_method, bundle=bundle.name)
    timing = {"sampler": backend.sampler_method, "n": n, "prior_s": round(t1 - t0, 4),
              "decode_s": round(t2 - t1, 4), "total_s": round(t2 - t0, 4), "samples_per_s": round(n / (t2 - t0), 3)}
    print(f"images: {out}")
    print(f"codes: {codes_path}")
    print(f"timing: {json.dumps(timing)}")
    return 0
