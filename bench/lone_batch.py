"""A batch that runs alone on CPU: the encoder at batch 1 on one thread, on every core, and on every
core with spinning threads (why the backend's every-core session for a lone batch spins).

    python -m bench.lone_batch [--model artifacts/default] [--runs 300]

Median wall time of one ``Session.run`` per layout, and ORT's own defaults (what bench/plain_app.py
uses) for reference. Writes bench/results/lone_batch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.bundle import ENCODER, Bundle
from service.runtime.session import RuntimeConfig, open_session


def median_ms(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    for _ in range(20):
        sess.run(None, {"images": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"images": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lone_batch.json")
    args = p.parse_args()
    bundle = Bundle.load(args.model)
    path, cores = bundle.path(ENCODER), os.cpu_count() or 1
    x = (np.random.default_rng(0).random((1, bundle.image_size, bundle.image_size, 3)) * 255).astype(np.uint8)
    layouts = {"1 thread": RuntimeConfig(device="cpu", intra_op_threads=1),
               f"{cores} threads": RuntimeConfig(device="cpu", intra_op_threads=cores),
               f"{cores} threads, spinning": RuntimeConfig(device="cpu", intra_op_threads=cores, spinning=True)}
    result = {"cpu_count": cores, "batch": 1, "median_ms": {}}
    for name, cfg in layouts.items():
        result["median_ms"][name] = median_ms(open_session(path, cfg), x, args.runs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cores
    plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    result["median_ms"][f"ORT defaults, {cores} threads"] = median_ms(plain, x, args.runs)
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
