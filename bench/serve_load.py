"""Load benchmark of the encode endpoint: closed-loop clients over loopback, batching on vs off.

    python bench/serve_load.py [--model artifacts/default] [--duration 10]

For each mode it starts a ``vqtok serve`` subprocess and runs C clients (C in --concurrency) that
each send one image, wait for the answer and send the next, for --duration seconds per point:

- batching on: the server's default settings (on CPU, one stream of batches per core, each
  ONNX Runtime session run on one thread, batches of at most 8);
- batching off: the same with VQTOK_MAX_BATCH=1;
- one stream: one batch of at most 32 at a time on every core (VQTOK_STREAMS=1), the server's
  layout and defaults before streams.

It records throughput, p50/p99 latency and CPU per request, then measures offline ONNX Runtime
encode throughput (no HTTP, no PNG decoding) at each batch size for both layouts (one stream on
every core; one single-threaded stream per core), and compares the served rate with the best of
all of them. Writes bench/results/serve_load.json and .png.

    python bench/serve_load.py --layouts [--load wrk|python] [--images 1,16] [--workers N] [--device cpu|cuda]

compares process layouts instead, in one run: the plain FastAPI app (``bench/plain_app.py``: one
ORT call per request on every core; CPU only), ``vqtok serve`` as one process (VQTOK_WORKERS=1) and
in the workers layout (N front ends + one engine process), with requests of 1 and of 16 images.
The load comes from ``wrk`` (a Lua script sends the multipart body) or, where wrk is missing, from
the Python generator below spread over several processes. Writes bench/results/serve_layouts.json.

    python bench/serve_load.py --versions BEFORE,work [--concurrency 1,32] [--rounds 3] [--model-arg ...]

compares code versions instead, in one run: each git revision is checked out into a temporary
worktree (``work`` is this working tree) and served with the same settings; every round measures
each version at each concurrency, in alternating order, so drift on a shared machine hits them all
alike. ``--extra-env NAME=VALUE`` applies to ``work`` only (a second bundle, say). Writes
bench/results/serve_versions.json.

The load generator is a minimal keep-alive HTTP/1.1 client on raw asyncio streams with the request
bytes built once, so that on a small machine the clients take as little CPU from the server as
possible (it still shares the cores: the numbers are a lower bound for a separate client host).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.bundle import Bundle

DEFAULT_CONCURRENCY = (1, 4, 16, 32, 64)


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: compress like photos do, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (yy + xx) / 2], -1)[None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3))
    return (np.clip(base + rng.normal(0, 0.05, (n, size, size, 3)), 0, 1) * 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def encode_request(blob: bytes, port: int) -> bytes:
    return encode_request_body(multipart_body([blob]), port)


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length")
    await reader.readexactly(length)
    return status


async def closed_loop(port: int, requests: list[bytes], concurrency: int, duration: float,
                      warmup: float, keep_latencies: bool = False) -> dict:
    latencies: list[float] = []
    errors = 0
    start_measure = time.perf_counter() + warmup
    stop = start_measure + duration

    async def worker(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                writer.write(requests[k % len(requests)])
                k += concurrency
                status = await read_response(reader)
                t1 = time.perf_counter()
                if t0 >= start_measure:
                    if status == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    lat = np.array(latencies) * 1000
    out = {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
           "throughput_rps": len(latencies) / duration,
           "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
           "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}
    if keep_latencies:
        out["latencies_ms"] = lat
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, env: dict[str, str], plain: bool = False, root: Path = ROOT,
                 args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """``vqtok serve`` of the checkout at ``root`` (or, with ``plain``, the baseline app) on a free port,
    once /readyz is 200."""
    import httpx

    port = free_port()
    # Keep any PYTHONPATH (the GPU machine's staged runtime lives on it), the checkout first.
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "VQTOK_LOG_LEVEL": "warning", "PYTHONPATH": path, **env}
    # -m from the root, so the plain app imports bench.plain_app like any module of the checkout.
    cmd = [sys.executable, "-m", "bench.plain_app"] if plain else [sys.executable, "-m", "service.cli", "serve"]
    proc = subprocess.Popen([*cmd, "--model", str(model), *args, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=root, env=full_env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def batch_stats(port: int) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith('vqtok_batch_size_sum{op="encode"}'):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith('vqtok_batch_size_count{op="encode"}'):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """The same for a process and all its descendants (front-end workers, the engine process)."""
    total = 0.0
    try:
        total = process_cpu_s(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu_s(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def served(model: Path, blobs: list[bytes], concurrency: list[int], duration: float, warmup: float,
           env: dict[str, str]) -> list[dict]:
    import httpx

    proc, port = start_server(model, env)
    info = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()
    layout = {"streams": info["streams"], "intra_op_threads": info["intra_op_threads"],
              "max_batch": info["limits"]["max_batch"]}
    requests = [encode_request(b, port) for b in blobs]
    rows = []
    try:
        for c in concurrency:
            before = batch_stats(port)
            # CPU per request, server and load generator apart: on a shared 2-core machine this
            # says where the cores go (the counts include the unmeasured warm-up requests).
            server_cpu, client_cpu = process_cpu_s(proc.pid), time.process_time()
            row = asyncio.run(closed_loop(port, requests, c, duration, warmup))
            server_cpu, client_cpu = process_cpu_s(proc.pid) - server_cpu, time.process_time() - client_cpu
            after = batch_stats(port)
            handled = max(after[0] - before[0], 1)
            row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            row["server_cpu_ms_per_request"] = 1000 * server_cpu / handled
            row["client_cpu_ms_per_request"] = 1000 * client_cpu / handled
            row.update(layout)
            rows.append(row)
            print(f"  c={c:3d}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:.1f} ms  "
                  f"p99 {row['p99_ms']:.1f} ms  mean batch {row['mean_batch']:.1f}  errors {row['errors']}  "
                  f"cpu ms/req server {row['server_cpu_ms_per_request']:.2f} client {row['client_cpu_ms_per_request']:.2f}",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def run_streams(sess, batch: np.ndarray, streams: int, duration: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of ``streams`` threads running ``batch`` through ``sess`` at once."""
    counts = [0] * streams
    stop = time.perf_counter() + duration

    def stream(i: int) -> None:
        while time.perf_counter() < stop:
            sess.run(None, {"images": batch})
            counts[i] += len(batch)

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    n = sum(counts)
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / n


def offline(model: Path, images: np.ndarray, layouts: dict[str, tuple[int, int]], duration: float) -> dict:
    """ONNX Runtime alone: images/s at each batch size, for each (streams, threads) layout.

    ``streams`` Python threads call one session concurrently, each run on ``threads`` intra-op
    threads, with the server's session options.
    """
    from service.runtime.session import RuntimeConfig, open_session, session_options

    encoder = str(Bundle.load(model).path("encoder"))  # loading verifies every file's sha256: once
    out: dict = {"layouts": {}}
    for name, (streams, threads) in layouts.items():
        cfg = RuntimeConfig(device="cpu", intra_op_threads=threads)
        sess = open_session(encoder, cfg, session_options(cfg))
        per_batch, cpu_ms = {}, {}
        for b in (1, 2, 4, 8, 16, 32, 64):
            batch = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))
            sess.run(None, {"images": batch})
            per_batch[b], cpu_ms[b] = run_streams(sess, batch, streams, duration)
            print(f"  offline {name} batch {b:3d}: {per_batch[b]:8.1f} images/s  cpu {cpu_ms[b]:.2f} ms/image",
                  flush=True)
        best = max(per_batch, key=per_batch.get)
        out["layouts"][name] = {"streams": streams, "threads": threads, "images_per_s": per_batch,
                                "cpu_ms_per_image": cpu_ms, "best_batch": best, "best_images_per_s": per_batch[best]}
    best_layout = max(out["layouts"], key=lambda k: out["layouts"][k]["best_images_per_s"])
    out["best_layout"] = best_layout
    out["best_batch"] = out["layouts"][best_layout]["best_batch"]
    out["best_images_per_s"] = out["layouts"][best_layout]["best_images_per_s"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = (("batching_on", "o-", "C0"), ("batching_off", "s--", "C1"), ("one_stream", "^:", "C2"))
    for mode, style, color in modes:
        rows = result["served"].get(mode)
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        name = mode.replace("_", " ")
        ax1.plot(xs, [r["throughput_rps"] for r in rows], style, color=color, label=name)
        ax2.plot(xs, [r["p99_ms"] for r in rows], style, color=color, label=f"{name} p99")
        ax2.plot(xs, [r["p50_ms"] for r in rows], style, color=color, alpha=0.35, label=f"{name} p50")
    best = result["offline"]
    ax1.axhline(best["best_images_per_s"], color="grey", ls=":",
                label=f"offline ORT best ({best['best_layout']}, batch {best['best_batch']})")
    ticks = [r["concurrency"] for r in result["served"]["batching_on"]]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("encode requests/s (1 image each)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    fig.suptitle(f"vqtok serve: {result['model']} ({result['image_size']}px), {result['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- process layouts (--layouts) -------------------------------------------------------------------
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=vqtokbenchboundary"
local f = assert(io.open(os.getenv("VQTOK_WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "bad_status": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d, "mean_us": %f}\\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def multipart_body(blobs: list[bytes]) -> bytes:
    boundary = "vqtokbenchboundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + b + b"\r\n" for i, b in enumerate(blobs)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def wrk_point(port: int, body: bytes, concurrency: int, duration: float, warmup: float, tmp: Path) -> dict:
    """One closed-loop point with wrk (one thread: the load generator shares the cores)."""
    (tmp / "body").write_bytes(body)
    (tmp / "post.lua").write_text(WRK_LUA)
    env = {**os.environ, "VQTOK_WRK_BODY": str(tmp / "body")}
    url = f"http://127.0.0.1:{port}/v1/encode"
    threads = max(1, min(concurrency, (os.cpu_count() or 1) // 4))  # 1 here; a few on a 16-core box
    for secs in ([warmup] if warmup > 0 else []) + [duration]:
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(secs, 1):.0f}s",
                              "--timeout", "30s", "-s", str(tmp / "post.lua"), url],
                             capture_output=True, text=True, env=env, check=True).stdout
    res = json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON "))[8:])
    seconds = res["duration_us"] / 1e6
    return {"concurrency": concurrency, "requests": res["requests"], "errors": res["bad_status"] + res["socket_errors"],
            "throughput_rps": res["requests"] / seconds, "p50_ms": res["p50_us"] / 1000,
            "p99_ms": res["p99_us"] / 1000, "mean_ms": res["mean_us"] / 1000}


def _python_load(args: tuple) -> dict:
    port, body, concurrency, duration, warmup = args
    return asyncio.run(closed_loop(port, [encode_request_body(body, port)], concurrency, duration, warmup,
                                   keep_latencies=True))


def python_point(port: int, body: bytes, concurrency: int, duration: float, warmup: float, procs: int) -> dict:
    """The Python generator in ``procs`` processes (one process cannot load a 16-core server)."""
    from concurrent.futures import ProcessPoolExecutor

    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        parts = list(pool.map(_python_load, [(port, body, c, duration, warmup) for c in shares]))
    lat = np.concatenate([p.pop("latencies_ms") for p in parts])
    return {"concurrency": concurrency, "requests": sum(p["requests"] for p in parts),
            "errors": sum(p["errors"] for p in parts), "throughput_rps": sum(p["throughput_rps"] for p in parts),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None}


def encode_request_body(body: bytes, port: int) -> bytes:
    head = (f"POST /v1/encode HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=vqtokbenchboundary\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def compare_layouts(args: argparse.Namespace, bundle: Bundle, blobs: list[bytes]) -> dict:
    """Every layout's server runs for the whole run, and each point measures them back to back, in
    alternating order over ``--rounds``: on a shared machine whose speed drifts, the layouts of a
    point then see the same conditions (an idle server costs next to nothing)."""
    import tempfile

    import httpx

    cores = os.cpu_count() or 1
    common = {"VQTOK_DEVICE": args.device, "VQTOK_API_KEYS": "", "VQTOK_MAX_ITEMS": "64",
              "VQTOK_QUEUE_LIMIT": str(max(512, 16 * 4 * max(args.concurrency)))}
    if args.tf32:
        common["VQTOK_TF32"] = "true"
    layouts: dict[str, tuple[dict[str, str], bool]] = {
        "one_process": ({**common, "VQTOK_WORKERS": "1"}, False),
        "workers": ({**common, "VQTOK_WORKERS": str(args.workers)}, False)}
    if args.device == "cpu":  # the baseline is the plain CPU app of the issue
        layouts = {"plain_fastapi": ({}, True), **layouts}
    result: dict = {"model": bundle.name, "image_size": bundle.image_size, "cpu_count": cores,
                    "machine": platform.processor() or platform.machine(), "device": args.device,
                    "load_generator": args.load, "duration_s": args.duration, "workers": args.workers,
                    "rounds": args.rounds, "layouts": {name: [] for name in layouts}}
    servers: dict[str, tuple[subprocess.Popen, int, dict]] = {}
    try:
        for name, (env, plain) in layouts.items():
            proc, port = start_server(args.model, env, plain=plain)
            servers[name] = (proc, port, {} if plain else httpx.get(f"http://127.0.0.1:{port}/v1/model").json())
        with tempfile.TemporaryDirectory() as tmp:
            for n_images in args.images:
                body = multipart_body([blobs[i % len(blobs)] for i in range(n_images)])
                for c in args.concurrency:
                    for rnd in range(args.rounds):
                        for name in (list(servers) if rnd % 2 == 0 else list(servers)[::-1]):
                            row = layout_point(args, servers[name], body, c, Path(tmp))
                            row.update(images_per_request=n_images, images_per_s=row["throughput_rps"] * n_images,
                                       round=rnd)
                            result["layouts"][name].append(row)
                            args.out.write_text(json.dumps(result, indent=2))  # what a time limit leaves behind
                            print(f"  {name:13s} {n_images:2d} img/req c={c:3d} round {rnd}  {row['throughput_rps']:8.1f} "
                                  f"req/s ({row['images_per_s']:.0f} img/s)  p50 {row['p50_ms']:.2f} ms  p99 "
                                  f"{row['p99_ms']:.2f} ms  errors {row['errors']}  batch {row.get('mean_batch', 0):.1f}"
                                  f"  server cpu {row['server_cpu_ms_per_request']:.2f} ms/req", flush=True)
    finally:
        for proc, _, _ in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    result["summary"] = layouts_summary(result["layouts"])
    return result


def layout_point(args: argparse.Namespace, server: tuple[subprocess.Popen, int, dict], body: bytes,
                 concurrency: int, tmp: Path) -> dict:
    proc, port, info = server
    before = batch_stats(port) if info else None
    cpu0 = tree_cpu_s(proc.pid)
    if args.load == "wrk":
        row = wrk_point(port, body, concurrency, args.duration, args.warmup_s, tmp)
    else:
        row = python_point(port, body, concurrency, args.duration, args.warmup_s, args.load_procs)
    # CPU over warm-up and measurement alike, per measured request: an upper bound.
    row["server_cpu_ms_per_request"] = 1000 * (tree_cpu_s(proc.pid) - cpu0) / max(row["requests"], 1)
    if before is not None:
        after = batch_stats(port)
        row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    row["provider"] = info.get("provider", "CPUExecutionProvider")
    row["gpu"] = info.get("gpu")
    return row


def layouts_summary(layouts: dict[str, list[dict]]) -> dict:
    """Per point, each layout's mean over the rounds, and its ratios to the plain app (or, on a GPU
    box, to the one process), all within the run."""
    ref_name = "plain_fastapi" if "plain_fastapi" in layouts else "one_process"
    points = sorted({(r["images_per_request"], r["concurrency"]) for rows in layouts.values() for r in rows})
    out: dict = {"reference": ref_name, "points": {}}
    for n, c in points:
        means = {}
        for name, rows in layouts.items():
            mine = [r for r in rows if (r["images_per_request"], r["concurrency"]) == (n, c) and r["p50_ms"]]
            if mine:
                means[name] = {"throughput_rps": float(np.mean([r["throughput_rps"] for r in mine])),
                               "p50_ms": float(np.mean([r["p50_ms"] for r in mine])),
                               "p99_ms": float(np.mean([r["p99_ms"] for r in mine]))}
        ref = means.get(ref_name)
        for name, m in means.items():
            if ref and name != ref_name:
                m["throughput_ratio"] = m["throughput_rps"] / ref["throughput_rps"]
                m["p50_ratio"] = m["p50_ms"] / ref["p50_ms"]
        out["points"][f"{n}img/c{c}"] = means
    return out


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def compare_versions(args: argparse.Namespace, blobs: list[bytes]) -> dict:
    """Each version served by its own checkout, all up for the whole run, measured in alternating order."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="vqtok-versions-"))
    roots: dict[str, Path] = {}
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    env = {"VQTOK_DEVICE": "cpu", "VQTOK_API_KEYS": "", "VQTOK_QUEUE_LIMIT": str(max(512, 4 * max(args.concurrency)))}
    try:
        for rev in args.versions:
            if rev == "work":
                roots[rev] = ROOT
            else:
                roots[rev] = tmp / rev
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(roots[rev]), rev],
                               check=True)
        results: dict[str, dict[int, list[dict]]] = {rev: {c: [] for c in args.concurrency} for rev in args.versions}
        commits = {rev: subprocess.run(["git", "-C", str(roots[rev]), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, check=True).stdout.strip() for rev in args.versions}
        for rev in args.versions:  # one at a time: their warm-ups would disturb each other
            extra = dict(kv.split("=", 1) for kv in args.extra_env) if rev == "work" else {}
            servers[rev] = start_server(args.model, {**env, **extra}, root=roots[rev],
                                        args=tuple(args.serve_arg) if rev == "work" else ())
        for r in range(args.rounds):
            order = args.versions if r % 2 == 0 else list(reversed(args.versions))
            for c in args.concurrency:
                for rev in order:
                    port = servers[rev][1]
                    requests = [encode_request(b, port) for b in blobs]
                    row = asyncio.run(closed_loop(port, requests, c, args.duration, args.warmup_s))
                    results[rev][c].append(row)
                    print(f"  round {r} {rev:>10} c={c:3d}  {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:.2f} ms"
                          f"  p99 {row['p99_ms']:.2f} ms  errors {row['errors']}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
        for rev, root in roots.items():
            if root != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(rows: list[dict], key: str) -> float:
        return float(np.median([row[key] for row in rows]))

    summary = {rev: {str(c): {"throughput_rps": median(rows, "throughput_rps"), "p50_ms": median(rows, "p50_ms"),
                              "p99_ms": median(rows, "p99_ms"), "errors": sum(row["errors"] for row in rows),
                              "rounds": len(rows)}
                     for c, rows in by_c.items()} for rev, by_c in results.items()}
    base = args.versions[0]
    for rev in args.versions[1:]:
        for c in args.concurrency:
            s, b = summary[rev][str(c)], summary[base][str(c)]
            s["throughput_vs_" + base] = s["throughput_rps"] / b["throughput_rps"]
            s["p50_vs_" + base] = s["p50_ms"] / b["p50_ms"]
            # Noise: the spread of the baseline's own rounds (max / min throughput).
            rates = [row["throughput_rps"] for row in results[base][c]]
            s["baseline_round_spread"] = max(rates) / min(rates)
    return {"versions": {rev: {"commit": commits[rev], "checkout": "working tree" if rev == "work" else rev,
                               "serve_args": list(args.serve_arg) if rev == "work" else [],
                               "extra_env": list(args.extra_env) if rev == "work" else []}
                         for rev in args.versions},
            "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else args.model.name,
            "duration_s": args.duration, "rounds": args.rounds, "cpu_count": os.cpu_count(),
            "rows": {rev: {str(c): rows for c, rows in by_c.items()} for rev, by_c in results.items()},
            "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per point (default 20%%)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_CONCURRENCY))
    p.add_argument("--max-batch", type=int, default=None, help="VQTOK_MAX_BATCH with batching on (default: the server's)")
    p.add_argument("--max-delay-ms", type=float, default=None, help="VQTOK_MAX_DELAY_MS (default: the server's)")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/serve_load.json, or serve_layouts.json with --layouts")
    p.add_argument("--layouts", action="store_true", help="compare process layouts (see above)")
    p.add_argument("--load", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python")
    p.add_argument("--load-procs", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                   help="processes of the Python load generator")
    p.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                   help="images per request (--layouts)")
    p.add_argument("--workers", type=int, default=2, help="front ends of the workers layout (--layouts)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(--layouts)")
    p.add_argument("--tf32", action="store_true", help="VQTOK_TF32 on CUDA (--layouts)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per layout and point (--layouts, --versions)")
    p.add_argument("--versions", type=lambda s: s.split(","), default=None,
                   help="git revisions to compare (work: this working tree), the first is the baseline")
    p.add_argument("--extra-env", action="append", default=[], help="NAME=VALUE for the working tree's server")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra vqtok serve argument (working tree)")
    args = p.parse_args(argv)
    warmup = args.duration * 0.2 if args.warmup is None else args.warmup
    args.warmup_s = warmup

    bundle = Bundle.load(args.model)
    images = smooth_images(64, bundle.image_size)
    blobs = [png(im) for im in images]
    if args.versions:
        args.out = args.out or ROOT / "bench" / "results" / "serve_versions.json"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = compare_versions(args, blobs)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["summary"], indent=2))
        print(f"wrote {args.out}")
        return 0
    if args.layouts:
        args.out = args.out or ROOT / "bench" / "results" / "serve_layouts.json"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = compare_layouts(args, bundle, blobs)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["summary"], indent=2))
        print(f"wrote {args.out}")
        return 0
    args.out = args.out or ROOT / "bench" / "results" / "serve_load.json"
    cores = os.cpu_count() or 1
    # Streams and threads are left to the server's defaults except in the one-stream mode.
    common = {"VQTOK_DEVICE": "cpu", "VQTOK_API_KEYS": "", "VQTOK_STREAMS": "0", "VQTOK_INTRA_OP_THREADS": "0",
              "VQTOK_QUEUE_LIMIT": str(max(512, 4 * max(args.concurrency)))}
    if args.max_delay_ms is not None:
        common["VQTOK_MAX_DELAY_MS"] = str(args.max_delay_ms)
    on = {**common, **({"VQTOK_MAX_BATCH": str(args.max_batch)} if args.max_batch else {})}
    modes = {"batching_on": on,
             "batching_off": {**common, "VQTOK_MAX_BATCH": "1"},
             # The layout before streams, with its max batch then (32).
             "one_stream": {**common, "VQTOK_MAX_BATCH": str(args.max_batch or 32), "VQTOK_STREAMS": "1"}}
    result: dict = {"model": bundle.name, "bundle": str(args.model), "image_size": bundle.image_size,
                    "cpu_count": cores, "machine": platform.processor() or platform.machine(),
                    "duration_s": args.duration, "served": {}}
    for mode, env in modes.items():
        print(f"{mode}:", flush=True)
        result["served"][mode] = served(args.model, blobs, args.concurrency, args.duration, warmup, env)
    print("offline:", flush=True)
    layouts = {f"{cores} streams x 1 thread": (cores, 1), f"1 stream x {cores} threads": (1, cores)}
    result["offline"] = offline(args.model, images, layouts, max(args.duration / 4, 0.2))

    on = {r["concurrency"]: r["throughput_rps"] for r in result["served"]["batching_on"]}
    off = {r["concurrency"]: r["throughput_rps"] for r in result["served"]["batching_off"]}
    ref = 32 if 32 in on else max(on)
    first = result["served"]["batching_on"][0]
    result["summary"] = {
        "concurrency": ref,
        "speedup_on_vs_off": on[ref] / off[ref] if off.get(ref) else None,
        "best_served_images_per_s": max(on.values()),
        "served_fraction_of_offline_best": max(on.values()) / result["offline"]["best_images_per_s"],
        "offline_best_layout": result["offline"]["best_layout"],
        "offline_best_batch1_fraction": max(v["images_per_s"][1] for v in result["offline"]["layouts"].values())
        / result["offline"]["best_images_per_s"],
        "server_layout": {k: first[k] for k in ("streams", "intra_op_threads", "max_batch")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
