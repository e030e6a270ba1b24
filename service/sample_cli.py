"""``vqtok sample``: sample code grids from a bundle's priors, decode them, write a PNG grid.

    vqtok sample --model DIR --n N --seed S --temperature T [--top-k K] --sampler cached|naive --out FILE.png

Writes FILE.png (the images in a grid) and FILE.npz (the codes: ``top``, ``bottom``, plus the
seed, temperature, top_k and sampler), prints both paths and the timing. No torch needed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from service.bundle import Bundle
from service.imaging import image_grid
from service.sampling import PriorSampler, noise_for


def make_session_options(threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def decode(session, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """uint8 images [n, H, W, 3] from code grids, with the bundle's decoder graph."""
    feeds = {"top": top, "bottom": bottom}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def main(args) -> int:
    import onnxruntime as ort
    from PIL import Image

    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    bundle = Bundle.load(args.model)
    threads = int(getattr(args, "threads", None) or os.environ.get("VQTOK_ORT_THREADS", "0"))
    so = make_session_options(threads)
    decoder = ort.InferenceSession(str(bundle.path("decoder")), so, providers=["CPUExecutionProvider"])
    sampler = PriorSampler(bundle, {"decoder": decoder}, method=args.sampler)

    n = args.n
    temperature = np.full(n, args.temperature, dtype=np.float32)
    top_k = np.full(n, args.top_k or 0, dtype=np.int64)
    noise_top, noise_bottom = noise_for(bundle, args.seed, n)

    t0 = time.perf_counter()
    top, bottom = sampler.sample(noise_top, noise_bottom, temperature, top_k)
    t1 = time.perf_counter()
    images = decode(decoder, top, bottom)
    t2 = time.perf_counter()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images)).save(out)
    codes_path = out.with_suffix(".npz")
    np.savez_compressed(codes_path, top=top, bottom=bottom, seed=args.seed, temperature=args.temperature,
                        top_k=args.top_k or 0, sampler=args.sampler, bundle=bundle.name)
    timing = {"sampler": args.sampler, "n": n, "prior_s": round(t1 - t0, 4), "decode_s": round(t2 - t1, 4),
              "total_s": round(t2 - t0, 4), "samples_per_s": round(n / (t2 - t0), 3)}
    print(f"images: {out}")
    print(f"codes: {codes_path}")
    print(f"timing: {json.dumps(timing)}")
    return 0
