"""Container images: size, what takes the space, cold start to /readyz, and the serving rate with and
without uvloop and httptools. Writes bench/results/images.json.

    python bench/images.py [--before REV] [--rounds 3] [--duration 10] [--gpu]

Builds, with podman through the shared container tools (tests/container_support.py):

- ``before``: the Dockerfile and tree of git revision --before (the image as it was before the lock
  and the diet: ``pip install ".[cpu]"`` with uvicorn[standard]);
- ``after``: this tree's Dockerfile (--after-context: another copy of the tree to build instead);
- for the load only, ``after`` in uvicorn's other flavours: uvicorn runs uvloop and httptools when
  they are installed, else asyncio's loop and h11; the variants take them out of ``after``, or add
  them (the versions ``before`` has) where ``after`` lacks them.

For before and after it records the image size (all layers, uncompressed, as ``podman images``
counts it; the base is the local python:3.11-slim stand-in, so the figure that is ours is the size
on top of the base), the layers, the bytes of each installed distribution (its RECORD, .pyc files
included) and the cold start: the seconds from ``podman run -d`` to the first 200 from /readyz
(container start, imports, bundle check, ONNX Runtime sessions, warm-up), best and median of
--cold-starts runs.

The load (skip it with --no-load) compares the four flavours (uvloop or asyncio, httptools or h11)
in the same run, each round in another order, over --rounds rounds: closed-loop clients (bench/serve_load.py's) sending
one-image encode requests, 1 and 32 at once, --duration seconds each after a warm-up; throughput,
p50/p99 and the server's CPU milliseconds per request (its processes' user + system time).

--gpu also builds Dockerfile.gpu (pip resolves and downloads the CUDA wheels: several GB) and
records its size and what takes the space; --gpu-only does just that and adds it to the results
already in --out. It cannot run here: no GPU is visible in a container
on these machines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from container_support import (
    BASE_IMAGE,
    build,
    ensure_base,
    image_size,
    inspect,
    podman,
    podman_unavailable,
    running,
    wait_ready,
)

from bench.serve_load import closed_loop, encode_request, png, smooth_images, tree_cpu_s

DEFAULT_BEFORE = "b0a8802"  # the last commit with the unlocked Dockerfile and uvicorn[standard]
FAST = ("uvloop", "httptools")
# Per distribution: bytes of the files its RECORD lists (with the .pyc files pip compiled).
SPACE = r"""
import importlib.metadata as md, json, os, sys
dists = {}
for d in md.distributions():
    total = 0
    for f in d.files or []:
        p = d.locate_file(f)
        if os.path.isfile(p):
            total += os.path.getsize(p)
    dists[d.metadata["Name"]] = total
app = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk("/app") for f in fs)
print(json.dumps({"dists": dists, "app": app}))
"""


def layers(tag: str) -> list[dict]:
    rows = json.loads(podman("history", "--format", "json", tag).stdout)
    return [{"bytes": int(r["size"]), "created_by": " ".join(r.get("CreatedBy", "").split())[:160]}
            for r in rows if int(r["size"])]


def space(tag: str, top: int = 15) -> dict:
    out = podman("run", "--rm", "--entrypoint", "python", tag, "-c", SPACE).stdout
    found = json.loads(out)
    dists = sorted(found["dists"].items(), key=lambda kv: -kv[1])
    return {"app_bytes": found["app"], "packages_bytes": sum(v for _, v in dists),
            "largest": [{"name": n, "bytes": v} for n, v in dists[:top]], "installed": sorted(found["dists"])}


def cold_starts(tag: str, runs: int) -> dict:
    seconds = []
    for i in range(runs):
        t0 = time.monotonic()
        with running(tag, f"vqtok-bench-cold-{os.getpid()}-{i}", ready=False) as url:
            wait_ready(url, timeout=180)
            seconds.append(time.monotonic() - t0)
    return {"runs": runs, "best_s": round(min(seconds), 2), "median_s": round(statistics.median(seconds), 2),
            "all_s": [round(s, 2) for s in seconds]}


def describe(tag: str, base_bytes: int, cold_runs: int, build_s: float | None) -> dict:
    size = image_size(tag)
    return {"tag": tag, "bytes": size, "mb": round(size / 1e6, 1), "over_base_mb": round((size - base_bytes) / 1e6, 1),
            "build_s": round(build_s, 1) if build_s is not None else None, "layers": layers(tag),
            "space": space(tag), "cold_start": cold_starts(tag, cold_runs) if cold_runs else None}


def versions(tag: str, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as md, json, sys;"
            "print(json.dumps({n: md.version(n) for n in sys.argv[1:]}))")
    return json.loads(podman("run", "--rm", "--entrypoint", "python", tag, "-c", code, *names).stdout)


def build_variant(base_tag: str, tag: str, step: str) -> None:
    """``base_tag`` with one more RUN step as root (the other loop flavour for the load)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "Dockerfile").write_text(f"FROM {base_tag}\nUSER root\nRUN {step}\nUSER 10001\n")
        build(tag, context=Path(tmp))


def loaded_modules(name: str) -> list[str]:
    """Which of uvloop/httptools the running server has loaded (its memory maps)."""
    maps = podman("exec", name, "cat", "/proc/1/maps").stdout
    return [m for m in FAST if f"/{m}/" in maps]


def load_point(tag: str, label: str, concurrency: list[int], duration: float, warmup: float) -> list[dict]:
    name = f"vqtok-bench-load-{os.getpid()}"
    with running(tag, name, env={"VQTOK_LOG_LEVEL": "warning"}) as url:
        port = int(url.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"{url}/v1/model") as resp:
            size = json.load(resp)["image_size"]
        requests = [encode_request(png(im), port) for im in smooth_images(16, size, seed=1)]
        pid = inspect("container", name)["State"]["Pid"]
        fast = loaded_modules(name)
        rows = []
        for c in concurrency:
            asyncio.run(closed_loop(port, requests, c, warmup, 0.0))  # warm-up, not counted
            cpu0 = tree_cpu_s(pid)
            row = asyncio.run(closed_loop(port, requests, c, duration, 0.0))
            cpu = tree_cpu_s(pid) - cpu0
            rows.append({"variant": label, "loaded": fast, **row,
                         **{k: round(row[k], 1) for k in ("throughput_rps", "p50_ms", "p99_ms")},
                         "server_cpu_ms_per_request": round(1000 * cpu / row["requests"], 2)})
            print(f"  {label:13s} c={c:2d}: {row['throughput_rps']:6.1f} req/s  p50 {row['p50_ms']:6.1f} ms"
                  f"  p99 {row['p99_ms']:6.1f} ms  cpu/req {rows[-1]['server_cpu_ms_per_request']} ms", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        for c in dict.fromkeys(r["concurrency"] for r in rows):
            got = [r for r in rows if r["variant"] == label and r["concurrency"] == c]
            out.append({"variant": label, "concurrency": c, "rounds": len(got),
                        **{k: round(statistics.median(r[k] for r in got), 2)
                           for k in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request")}})
    return out


def gpu_image(context: Path, base: int) -> dict:
    print("building the GPU image (CUDA wheels: several GB) ...", flush=True)
    tag = "localhost/vqtok:bench-gpu"
    seconds = build(tag, dockerfile="Dockerfile.gpu", context=context, timeout=3600)
    found = {**describe(tag, base, 0, seconds), "note": "built, not run: no GPU is visible in a container here"}
    print(f"  {found['mb']} MB ({found['over_base_mb']} MB over the base) in {seconds:.0f} s", flush=True)
    return found


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' image")
    p.add_argument("--after-context", type=Path, default=ROOT, help="the tree to build 'after' from")
    p.add_argument("--cold-starts", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--no-load", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="build before and after without podman's layer cache "
                   "(their build_s is then a cold build's, with every download)")
    p.add_argument("--gpu", action="store_true", help="also build Dockerfile.gpu and record its size")
    p.add_argument("--gpu-only", action="store_true", help="only that, added to the results already in --out")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "images.json")
    args = p.parse_args()

    reason = podman_unavailable()
    if reason:
        raise SystemExit(reason)
    ensure_base()
    base = image_size(BASE_IMAGE)
    if args.gpu_only:
        result = json.loads(args.out.read_text())
        result["gpu"] = gpu_image(args.after_context, base)
        result["gpu"]["command"] = "python bench/images.py " + " ".join(sys.argv[1:])
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    tags = {"before": "localhost/vqtok:bench-before", "after": "localhost/vqtok:bench-after",
            "variant": "localhost/vqtok:bench"}
    result: dict = {
        "command": "python bench/images.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "podman": podman("version", "--format", "{{.Client.Version}}").stdout.strip(),
                    "load_note": "shared 2-core machine (another job may hold a core): compare rows of one run"},
        "base": {"image": BASE_IMAGE, "bytes": base, "mb": round(base / 1e6, 1),
                 "note": "local stand-in for python:3.11-slim built from Debian's packages (larger than the "
                         "official image): the size over the base is what the Dockerfile adds"},
        "before": {"revision": git("rev-parse", "--short", args.before)},
        "build_s": "cold builds, every download included" if args.no_cache else "podman's layer cache reused",
        "after": {"revision": git("rev-parse", "--short", "HEAD"), "context": "this tree" if args.after_context.resolve() == ROOT else "--after-context",
                  "worktree_changes": bool(git("status", "--porcelain"))},
    }
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        print("building before ...", flush=True)
        before_s = build(tags["before"], context=old, no_cache=args.no_cache)
    print("building after ...", flush=True)
    after_s = build(tags["after"], context=args.after_context, no_cache=args.no_cache)
    for key, build_s in (("before", before_s), ("after", after_s)):
        print(f"measuring {key} ...", flush=True)
        result[key].update(describe(tags[key], base, args.cold_starts, build_s))
        print(f"  {result[key]['mb']} MB ({result[key]['over_base_mb']} MB over the base), cold start "
              f"{result[key]['cold_start']}", flush=True)
    result["dropped"] = sorted(set(result["before"]["space"]["installed"]) - set(result["after"]["space"]["installed"]))

    if not args.no_load:
        # The same image in each of uvicorn's four flavours: uvloop or asyncio's loop, httptools or h11
        # (uvicorn picks uvloop and httptools whenever they are installed). The other flavours are
        # `after` with uvloop/httptools taken out, or added in the versions `before` has.
        have = {m for m in FAST if m in result["after"]["space"]["installed"]}
        pins = versions(tags["before"], FAST)
        images, steps = {}, {}
        for keep in ({"uvloop", "httptools"}, {"uvloop"}, {"httptools"}, set()):
            label = ("uvloop" if "uvloop" in keep else "asyncio") + ("+httptools" if "httptools" in keep else "+h11")
            out, add = sorted(have - keep), sorted(keep - have)
            step = " && ".join(([f"pip uninstall -y {' '.join(out)}"] if out else []) +
                               ([f"pip install --no-cache-dir --no-deps {' '.join(f'{n}=={pins[n]}' for n in add)}"]
                                if add else []))
            if step:
                build_variant(tags["after"], f"{tags['variant']}-{label.replace('+', '-')}", step)
            images[label] = f"{tags['variant']}-{label.replace('+', '-')}" if step else tags["after"]
            steps[label] = f"after, then RUN {step}" if step else "after as built"
        rows = []
        for r in range(args.rounds):  # each round in another order, so that drift in the machine's load evens out
            order = sorted(images)
            for label in order[r % len(order):] + order[:r % len(order)]:
                rows += load_point(images[label], label, args.concurrency, args.duration, args.warmup)
        result["load"] = {"what": "closed-loop clients, one 1-image encode request each at a time (bench/serve_load.py's "
                                  "generator on this machine), one container per flavour and round",
                          "images": steps, "duration_s": args.duration, "warmup_s": args.warmup,
                          "rounds": rows, "median": summarize(rows)}

    if args.gpu:
        result["gpu"] = gpu_image(args.after_context, base)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and not args.gpu:  # keep an earlier run's GPU figures
        earlier = json.loads(args.out.read_text())
        if "gpu" in earlier:
            result["gpu"] = earlier["gpu"]
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
