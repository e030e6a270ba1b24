"""The CUDA checks of issue 11, offline (no HTTP): run by bench/gpu_check.sh on a GPU machine.

    python bench/gpu_checks.py [--model artifacts/default] [--out bench/results/gpu_checks.json]

1. the CUDA execution provider loads for every graph, and the GPU's name (NVML);
2. code agreement with the CPU, TF32 off (the default) and on, on real photo crops (tiles of
   docs/default_reconstructions.png) and on smooth synthetic images;
3. offline encoder and decoder images/s at batch 256, TF32 off and on;
4. batch buckets: the first run of a new batch size without buckets, the start-up warm-up with
   them, and the slowest batch of every size 1..max batch after it;
5. sampling latency at n = 1 and 64: on the GPU (IOBinding step loop) and on one CPU thread
   (what VQTOK_CPU_SAMPLE_MAX routes small n to), plus n = 2..16 for choosing that threshold.
Every figure goes into one JSON file with the device and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import smooth_images
from service.bundle import DECODER, ENCODER, Bundle
from service.bundle.sampling import noise_for
from service.runtime.backend import OrtBackend
from service.runtime.session import CUDA, RuntimeConfig, gpu_name, open_session

DEVICE = "cuda"  # --device cpu: a smoke run of this script on a machine without a GPU


def photo_crops(size: int) -> np.ndarray:
    """size x size tiles of the held-out reconstruction grid in docs/ (real photo content)."""
    from PIL import Image

    grid = np.asarray(Image.open(ROOT / "docs" / "default_reconstructions.png").convert("RGB"))
    tiles = [grid[y:y + size, x:x + size] for y in range(0, grid.shape[0] - size + 1, size // 2)
             for x in range(0, grid.shape[1] - size + 1, size // 2)]
    return np.stack(tiles)


def rate(fn, seconds: float = 2.0) -> float:
    """Calls per second of ``fn`` (after one unmeasured call)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def agreement(bundle: Bundle, images: np.ndarray, tf32: bool) -> dict:
    cpu = open_session(bundle.path(ENCODER), RuntimeConfig(device="cpu"))
    gpu = open_session(bundle.path(ENCODER), RuntimeConfig(device=DEVICE, tf32=tf32))
    names = [o.name for o in cpu.get_outputs()]
    out = {}
    for name, a, b in zip(names, cpu.run(None, {"images": images}), gpu.run(None, {"images": images})):
        out[name] = float((a == b).mean())
    return out


def throughput(bundle: Bundle, tf32: bool, batch: int = 256) -> dict:
    cfg = RuntimeConfig(device=DEVICE, tf32=tf32)
    enc, dec = open_session(bundle.path(ENCODER), cfg), open_session(bundle.path(DECODER), cfg)
    images = np.ascontiguousarray(np.resize(smooth_images(64, bundle.image_size), (batch, bundle.image_size,
                                                                                   bundle.image_size, 3)))
    codes = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, {"images": images})))
    feeds = {i.name: codes[i.name] for i in dec.get_inputs()}
    return {"batch": batch, "encoder_images_per_s": batch * rate(lambda: enc.run(None, {"images": images})),
            "decoder_images_per_s": batch * rate(lambda: dec.run(None, feeds))}


def buckets(bundle: Bundle, max_batch: int = 32) -> dict:
    size = bundle.image_size
    plain = open_session(bundle.path(ENCODER), RuntimeConfig(device=DEVICE))
    plain.run(None, {"images": np.zeros((1, size, size, 3), np.uint8)})
    first, again = {}, {}
    for b in (3, 5, 7, 12, 19, 27):  # sizes a dynamic batcher makes
        x = np.zeros((b, size, size, 3), np.uint8)
        t0 = time.perf_counter()
        plain.run(None, {"images": x})
        first[b] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        plain.run(None, {"images": x})
        again[b] = (time.perf_counter() - t0) * 1000
    backend = OrtBackend(bundle, RuntimeConfig(device=DEVICE, warmup_batch=max_batch, sample_warmup_batch=64,
                                               cpu_sample_max=0))
    t0 = time.perf_counter()
    backend.warmup()
    warm_s = time.perf_counter() - t0
    worst = {}
    for b in range(1, max_batch + 1):
        x = np.zeros((b, size, size, 3), np.uint8)
        t0 = time.perf_counter()
        backend.encode(x)
        worst[b] = (time.perf_counter() - t0) * 1000
    return {"no_buckets_first_run_ms": first, "no_buckets_second_run_ms": again, "buckets": backend.buckets,
            "startup_warmup_s": warm_s, "with_buckets_first_run_ms_by_size": worst,
            "with_buckets_slowest_first_run_ms": max(worst.values())}


def sampling(bundle: Bundle) -> dict:
    gpu = OrtBackend(bundle, RuntimeConfig(device=DEVICE, cpu_sample_max=0, buckets=False))
    cpu = OrtBackend(bundle, RuntimeConfig(device="cpu", intra_op_threads=1))
    out: dict = {"gpu_ms": {}, "cpu_1thread_ms": {}}
    for n in (1, 2, 4, 8, 16, 64):
        args = (noise_for(bundle, 0, n), np.ones(n, np.float32), np.zeros(n, np.int64))
        for name, backend in (("gpu_ms", gpu), ("cpu_1thread_ms", cpu)):
            if name == "cpu_1thread_ms" and n > 16:
                continue
            backend.sample(*args)  # first run of this n (kernel choice, allocation)
            times = []
            for _ in range(3 if n <= 16 else 2):
                t0 = time.perf_counter()
                backend.sample(*args)
                times.append((time.perf_counter() - t0) * 1000)
            out[name][n] = float(np.median(times))
        print(f"  sampling n={n}: gpu {out['gpu_ms'][n]:.1f} ms  cpu {out['cpu_1thread_ms'].get(n, float('nan')):.1f} ms",
              flush=True)
    same = gpu.sample(*(noise_for(bundle, 3, 4), np.ones(4, np.float32), np.zeros(4, np.int64)))
    ref = cpu.sample(*(noise_for(bundle, 3, 4), np.ones(4, np.float32), np.zeros(4, np.int64)))
    out["same_codes_gpu_vs_cpu"] = {k: float((same[k] == ref[k]).mean()) for k in ref}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_checks.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke-test the script")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    bundle = Bundle.load(args.model)
    import onnxruntime as ort

    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "onnxruntime": ort.__version__, "machine": platform.node(), "gpu": gpu_name(),
                    "bundle": bundle.name}
    backend = OrtBackend(bundle, RuntimeConfig(device=DEVICE))
    result["providers"] = {g: s.get_providers()[0] for g, s in backend.sessions.items()}
    result["cuda_everywhere"] = all(p == CUDA for p in result["providers"].values())
    print(json.dumps(result, indent=2), flush=True)
    photos, synthetic = photo_crops(bundle.image_size), smooth_images(512, bundle.image_size)
    result["agreement"] = {f"tf32_{'on' if tf32 else 'off'}": {"photo_crops": agreement(bundle, photos, tf32),
                                                               "synthetic": agreement(bundle, synthetic, tf32)}
                           for tf32 in (False, True)}
    result["agreement"]["photo_crops_count"] = len(photos)
    print(json.dumps(result["agreement"], indent=2), flush=True)
    result["offline"] = {f"tf32_{'on' if t else 'off'}": throughput(bundle, t) for t in (False, True)}
    print(json.dumps(result["offline"], indent=2), flush=True)
    result["buckets"] = buckets(bundle)
    print(json.dumps({k: v for k, v in result["buckets"].items() if "by_size" not in k}, indent=2), flush=True)
    result["sampling"] = sampling(bundle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
