"""What one small encode request costs outside the model, piece by piece.

    python bench/request_overhead.py [--requests 4000] [--src DIR]

In-process (the app driven directly through ASGI by 32 concurrent tasks; best of three rounds):
1. the service's request path (middleware, routing, multipart, PNG decoding, batcher, JSON answer)
   with a backend that returns zero codes at once;
2. the same with the real ONNX Runtime backend (default streams and threads), next to the model's
   own CPU per image offline in that layout: what running both in one process adds.

Over HTTP (uvicorn, the server's own HTTP stack, loaded by serve_load's closed-loop client at
concurrency 32), server CPU per request of:
3. a bare app that reads the body and answers a fixed JSON;
4. an app that does only the essential work: parse the multipart body, decode the PNG, answer
   the JSON of a code grid;
5. the same work as a plain FastAPI route (FastAPI's own cost, without the service's middleware,
   batcher and disconnect watch);
6. the service itself with the instant backend.

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

# The apps served over HTTP, as module sources ({src}: the checkout that provides ``service``).
BARE_APP = '''
BODY = b'{{"ok":true}}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]}})
    await send({{"type": "http.response.body", "body": BODY}})
'''

ESSENTIAL_APP = '''
import sys
sys.path.insert(0, {src!r})
import numpy as np, orjson
from service.bundle.intake import IntakeLimits, take
from service.api.multipart import MultipartReader
LIMITS = IntakeLimits(64, 8, 4096 * 4096, 1024 * 1024)
TOP, BOTTOM = np.zeros((8, 8), np.int64), np.zeros((16, 16), np.int64)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    reader = MultipartReader(headers[b"content-type"].decode(), 80) if scope["method"] == "POST" else None
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
        if reader is not None:
            reader.feed(message.get("body", b""))
    answer = b"{{}}"
    if reader is not None:
        image = take(reader.close()[0].data, "center_crop", LIMITS)[0]
        answer = orjson.dumps({{"model": "x", "items": [{{"height": image.shape[0], "width": image.shape[1],
                                                        "top": TOP.tolist(), "bottom": BOTTOM.tolist()}}]}})
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]}})
    await send({{"type": "http.response.body", "body": answer}})
'''

FASTAPI_APP = '''
import sys
sys.path.insert(0, {src!r})
import numpy as np, orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from service.bundle.intake import IntakeLimits, take
from service.api.multipart import read_multipart
LIMITS = IntakeLimits(64, 8, 4096 * 4096, 1024 * 1024)
TOP, BOTTOM = np.zeros((8, 8), np.int64), np.zeros((16, 16), np.int64)
app = FastAPI()

@app.get("/readyz")
async def readyz():
    return {{"status": "ready"}}

@app.post("/v1/encode")
async def encode(request: Request):
    parts = await read_multipart(request.stream(), request.headers["content-type"], 80)
    image = take(parts[0].data, "center_crop", LIMITS)[0]
    return Response(orjson.dumps({{"model": "x", "items": [{{"height": image.shape[0], "width": image.shape[1],
                    "top": TOP.tolist(), "bottom": BOTTOM.tolist()}}]}}), media_type="application/json")
'''

SERVICE_APP = '''
import sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {bench!r})
from pathlib import Path
from request_overhead import InstantBackend, settings_for
from service.api.app import create_app
from service.bundle import Bundle
bundle = Bundle.load({model!r})
app = create_app(settings_for(Path({model!r})), bundle=bundle, backend=InstantBackend(bundle))
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
    from service.api.config import Settings

    return Settings(model_dir=model, device="cpu", api_keys=[], queue_limit=4096, log_level="warning")


async def in_process(model: Path, raw_request: bytes, n: int, concurrency: int, backend) -> float:
    from asgi_lifespan import LifespanManager

    from service.api.app import create_app

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


def over_http(app_source: str, raw_request_for, duration: float, concurrency: int) -> dict:
    """Serve ``app_source`` (a module defining ``app``) with uvicorn; server CPU per request under load."""
    import httpx
    import serve_load

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench_app.py").write_text(app_source)
        port = serve_load.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench_app:app", "--port", str(port),
                                 "--log-level", "warning", "--no-access-log"], cwd=tmp)
        try:
            deadline = time.monotonic() + 60
            while True:  # up, and for the service warmed up
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("benchmark app did not start")
                time.sleep(0.2)
            cpu0 = serve_load.process_cpu_s(proc.pid)
            row = asyncio.run(serve_load.closed_loop(port, [raw_request_for(port)], concurrency, duration, 0.0))
            cpu = serve_load.process_cpu_s(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait()
    if row["errors"]:
        raise SystemExit(f"{row['errors']} requests failed")
    return {"throughput_rps": row["throughput_rps"], "server_cpu_ms_per_request": 1000 * cpu / row["requests"]}


def service_dir() -> str:
    import service

    return str(Path(service.__file__).parent)


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
    try:  # the loop the measured server runs: uvloop where installed (the [gpu] extra), else asyncio's
        from uvloop import run as run_loop
    except ImportError:
        from asyncio import run as run_loop

    from service.api.app import load_backend
    from service.bundle import Bundle

    bundle = Bundle.load(args.model)
    request = serve_load.encode_request(blob, 8000)
    ms = run_loop(in_process(args.model, request, args.requests, 32, InstantBackend(bundle)))
    print(f"in-process request path: {ms:.3f} CPU ms per request", flush=True)
    backend = load_backend(bundle, settings_for(args.model))
    with_model = run_loop(in_process(args.model, request, args.requests // 2, 32, backend))
    print(f"in-process with the model: {with_model:.3f} CPU ms per request", flush=True)
    settings = settings_for(args.model)  # checkouts from before streams ran one batch at a time
    streams = settings.streams_for(backend.provider) if hasattr(settings, "streams_for") else 1
    batch = np.stack([serve_load.smooth_images(1, size)[0]] * 4)
    _, model_ms = serve_load.run_streams(backend.sessions["encoder"], batch, streams, 3.0)
    print(f"model alone ({streams} streams, batch 4): {model_ms:.3f} CPU ms per image", flush=True)
    src = str(Path(service_dir()).parent)
    # The essential-work app is a floor for any version, so it always uses this checkout's parsers.
    apps = {"bare_uvicorn": BARE_APP.format(), "essential_work": ESSENTIAL_APP.format(src=str(ROOT)),
            "essential_work_in_fastapi": FASTAPI_APP.format(src=str(ROOT)),
            "service_instant_backend": SERVICE_APP.format(src=src, bench=str(Path(__file__).resolve().parent),
                                                          model=str(args.model.resolve()))}
    http = {}
    for name, source in apps.items():
        http[name] = over_http(source, lambda port: serve_load.encode_request(blob, port), 4.0, 32)
        print(f"over HTTP, {name}: {http[name]['server_cpu_ms_per_request']:.3f} CPU ms per request "
              f"({http[name]['throughput_rps']:.0f} req/s)", flush=True)

    commit = subprocess.run(["git", "-C", str(args.src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(args.src), "status", "--porcelain", "service"], capture_output=True,
                           text=True, check=False).stdout.strip()
    result = {"service_from": service_dir(), "commit": commit + ("+changes" if dirty else ""),
              "png_bytes": len(blob), "requests": args.requests,
              "in_process_cpu_ms_per_request": ms, "in_process_with_model_cpu_ms_per_request": with_model,
              "model_alone_cpu_ms_per_image": model_ms, "model_alone_layout": {"streams": streams, "batch": 4},
              "over_http": http}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
