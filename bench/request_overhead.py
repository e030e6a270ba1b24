"""What one small encode request costs outside the model: CPU per request of the service's request
path with an instant backend, and of a bare uvicorn app under the same load.

    python bench/request_overhead.py [--requests 4000] [--src DIR]

1. In-process: the real app (middleware, routing, multipart, PNG decoding, batcher, JSON answer)
   driven directly through ASGI by 32 concurrent tasks, with a backend that returns zero codes at
   once. Best of three rounds of CPU time per request.
2. The same with the real ONNX Runtime backend (default streams and threads), next to the model's
   own CPU per image offline in that layout: what running both in one process adds.
3. Floor: a bare ASGI app that reads the body and answers a fixed JSON, served by uvicorn (the
   server's own HTTP stack), loaded by serve_load's closed-loop client at concurrency 32.

``--src`` imports ``service`` from another checkout (to measure an older version of the request
path with this script). Writes bench/results/request_overhead.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

BARE_APP = '''
BODY = b'{"ok":true}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": BODY})
'''


class InstantBackend:
    """The Backend interface with no model: zero codes, black images."""

    provider = "CPUExecutionProvider"
    sampler_method = None
    can_sample = False

    def __init__(self, bundle):
        self.bundle = bundle
        size = bundle.image_size
        self.grids = {lv["name"]: (size // lv["stride"], size // lv["stride"]) for lv in bundle.manifest["levels"]}

    def encode(self, images):
        return {name: np.zeros((len(images), *grid), np.int64) for name, grid in self.grids.items()}

    def decode(self, codes):
        n = len(next(iter(codes.values())))
        return np.zeros((n, self.bundle.image_size, self.bundle.image_size, 3), np.uint8)

    def warmup(self):
        pass


def split_request(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
    return [(k.lower(), v) for k, v in headers], body


def settings_for(model: Path):
    from service.config import Settings

    return Settings(model_dir=model, device="cpu", api_keys=[], queue_limit=4096, log_level="warning")


async def in_process(model: Path, raw_request: bytes, n: int, concurrency: int, backend) -> float:
    from asgi_lifespan import LifespanManager

    from service.app import create_app

    app = create_app(settings_for(model), bundle=backend.bundle, backend=backend)
    headers, body = split_request(raw_request)

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/encode", "raw_path": b"/v1/encode", "query_string": b"",
                 "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
                 "root_path": "", "state": {}}
        done = asyncio.Event()
        sent_body = False
        status = []

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # the client stays connected until the answer is out
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        done.set()
        assert status == [200], status

    async def worker(k: int) -> None:
        for _ in range(k):
            await one()

    async with LifespanManager(app):
        while not app.state.vqtok.ready.is_set():
            await asyncio.sleep(0.01)
        await worker(200)
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
            best = min(best, time.process_time() - t0)
    return 1000 * best / n


def floor(raw_request_for, duration: float, concurrency: int) -> dict:
    import serve_load

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bare_app.py").write_text(BARE_APP)
        port = serve_load.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                                 "--log-level", "warning", "--no-access-log"], cwd=tmp)
        try:
            time.sleep(2.0)
            cpu0 = serve_load.process_cpu_s(proc.pid)
            row = asyncio.run(serve_load.closed_loop(port, [raw_request_for(port)], concurrency, duration, 0.0))
            cpu = serve_load.process_cpu_s(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait()
    return {"throughput_rps": row["throughput_rps"], "server_cpu_ms_per_request": 1000 * cpu / row["requests"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--src", type=Path, default=ROOT, help="checkout whose service/ is measured")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "request_overhead.json")
    args = p.parse_args(argv)
    import serve_load

    if args.src.resolve() != ROOT:  # measure that checkout's service package instead of this one's
        sys.path.insert(0, str(args.src.resolve()))
        for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
            del sys.modules[name]
    size = serve_load.Bundle.load(args.model).image_size
    blob = serve_load.png(serve_load.smooth_images(1, size)[0])
    import uvloop

    from service.app import load_backend
    from service.bundle import Bundle

    bundle = Bundle.load(args.model)
    request = serve_load.encode_request(blob, 8000)
    ms = uvloop.run(in_process(args.model, request, args.requests, 32, InstantBackend(bundle)))
    print(f"in-process request path: {ms:.3f} CPU ms per request", flush=True)
    backend = load_backend(bundle, settings_for(args.model))
    with_model = uvloop.run(in_process(args.model, request, args.requests // 2, 32, backend))
    print(f"in-process with the model: {with_model:.3f} CPU ms per request", flush=True)
    settings = settings_for(args.model)  # checkouts from before streams ran one batch at a time
    streams = settings.streams_for(backend.provider) if hasattr(settings, "streams_for") else 1
    batch = np.stack([serve_load.smooth_images(1, size)[0]] * 4)
    _, model_ms = serve_load.run_streams(backend.sessions["encoder"], batch, streams, 3.0)
    print(f"model alone ({streams} streams, batch 4): {model_ms:.3f} CPU ms per image", flush=True)
    bare = floor(lambda port: serve_load.encode_request(blob, port), 4.0, 32)
    print(f"bare uvicorn: {bare['server_cpu_ms_per_request']:.3f} CPU ms per request "
          f"({bare['throughput_rps']:.0f} req/s)", flush=True)
    import service

    commit = subprocess.run(["git", "-C", str(args.src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(args.src), "status", "--porcelain", "service"], capture_output=True,
                           text=True, check=False).stdout.strip()
    result = {"service_from": str(Path(service.__file__).parent), "commit": commit + ("+changes" if dirty else ""),
              "png_bytes": len(blob), "requests": args.requests,
              "in_process_cpu_ms_per_request": ms, "in_process_with_model_cpu_ms_per_request": with_model,
              "model_alone_cpu_ms_per_image": model_ms, "model_alone_layout": {"streams": streams, "batch": 4},
              "bare_uvicorn": bare}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
