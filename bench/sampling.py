"""Benchmark: naive vs cached sampling of full images (top codes, then bottom codes, then decode).

    python bench/sampling.py [--model artifacts/default] [--ns 1 8 32] [--repeats 3] [--naive-repeats 1]

Both samplers run on ONNX Runtime (CPU) from the same bundle, session options and pre-drawn noise,
so the codes should be identical; the JSON records whether they are. Writes
bench/results/sampling.json and prints a Markdown table for the README.

The naive sampler runs one full prior forward pass per code: on the default bundle (64x64 images,
8x8 top + 16x16 bottom grids) at n = 32 expect minutes on two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.bundle import Bundle
from service.bundle.sampling import noise_for
from service.runtime.sampler import PriorSampler
from service.runtime.session import RuntimeConfig, open_session


def time_full(sampler: PriorSampler, decoder, noise, temperature, top_k, repeats: int):
    """Best-of-``repeats`` seconds for top + bottom + decode, plus the codes of the last run."""
    best, split = float("inf"), {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        codes = sampler.sample(noise, temperature, top_k)
        t1 = time.perf_counter()
        decoder.run(None, {i.name: codes[i.name] for i in decoder.get_inputs()})
        t2 = time.perf_counter()
        if t2 - t0 < best:
            best, split = t2 - t0, {"prior_s": t1 - t0, "decode_s": t2 - t1}
    return best, split, codes


def warm_up(sessions: dict, bundle: Bundle, n: int) -> None:
    """One call of each full-grid graph at batch n, so neither sampler pays first-shape costs."""
    size = bundle.image_size
    grids = {name: np.zeros((n, *lv.grid(size, size)), dtype=np.int64) for name, lv in bundle.levels.items()}
    for sess in sessions.values():
        if all(i.name in grids for i in sess.get_inputs()):
            sess.run(None, {i.name: grids[i.name] for i in sess.get_inputs()})


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3, help="cached runs per n (best is reported)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="naive runs per n (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampling.json")
    args = ap.parse_args(argv)

    bundle = Bundle.load(args.model)
    cfg = RuntimeConfig(device="cpu", intra_op_threads=args.threads)
    providers = ["CPUExecutionProvider"]
    sessions = {g: open_session(bundle.path(g), cfg) for g in bundle.manifest["files"]
                if g == "decoder" or g.startswith("prior_")}
    samplers = {m: PriorSampler(bundle, sessions, method=m, cfg=cfg) for m in ("naive", "cached")}
    decoder = sessions["decoder"]

    results = []
    for n in args.ns:
        noise = noise_for(bundle, args.seed, n)
        temperature = np.full(n, args.temperature, dtype=np.float32)
        top_k = np.full(n, args.top_k, dtype=np.int64)
        warm_up(sessions, bundle, n)
        samplers["cached"].sample(noise, temperature, top_k)  # warm-up (step graphs at batch n)
        t_cached, s_cached, c_cached = time_full(samplers["cached"], decoder, noise, temperature, top_k, args.repeats)
        t_naive, s_naive, c_naive = time_full(samplers["naive"], decoder, noise, temperature, top_k,
                                              args.naive_repeats)
        same = np.ones(n, dtype=bool)
        for level in bundle.level_names:
            same &= (c_naive[level] == c_cached[level]).reshape(n, -1).all(axis=1)
        row = {"n": n,
               "naive_s": round(t_naive, 4), "cached_s": round(t_cached, 4),
               "naive_samples_per_s": round(n / t_naive, 3), "cached_samples_per_s": round(n / t_cached, 3),
               "speedup": round(t_naive / t_cached, 1),
               "identical_codes": bool(same.all()), "identical_samples": float(same.mean()),
               "naive_split_s": {k: round(v, 4) for k, v in s_naive.items()},
               "cached_split_s": {k: round(v, 4) for k, v in s_cached.items()}}
        results.append(row)
        print(f"n={n:3d}  naive {row['naive_s']:9.3f} s ({row['naive_samples_per_s']:8.3f}/s)  "
              f"cached {row['cached_s']:8.4f} s ({row['cached_samples_per_s']:8.2f}/s)  "
              f"speed-up {row['speedup']:7.1f}x  identical codes: {row['identical_codes']}", flush=True)

    levels = bundle.levels
    report = {
        "bundle": bundle.name, "model": str(args.model), "image_size": bundle.image_size,
        "grids": {name: list(lv.grid(bundle.image_size, bundle.image_size)) for name, lv in levels.items()},
        "num_codes": {name: lv.codebook_size for name, lv in levels.items()},
        "seed": args.seed, "temperature": args.temperature, "top_k": args.top_k,
        "repeats": {"cached": args.repeats, "naive": args.naive_repeats}, "timing": "best of repeats",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "providers": providers, "intra_op_threads": args.threads,
                    "onnxruntime": ort.__version__, "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    print("\n| n | naive samples/s | cached samples/s | speed-up | identical codes |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']} | {r['naive_samples_per_s']:.3g} | {r['cached_samples_per_s']:.3g} | "
              f"{r['speedup']:.0f}× | {'yes' if r['identical_codes'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
