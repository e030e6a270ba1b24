"""Soak: many clients mixing good and hostile requests against one ``vqtok serve``, for a minute.

    python -m bench.soak [--model artifacts/default] [--clients 64] [--duration 60] [--warmup 10]

Each client is a closed loop: it picks a request kind at random (by weight), sends it, waits for the
answer and goes on. Good requests (encode, reconstruct, decode, sample) reuse a keep-alive
connection; hostile ones each open their own: garbage and truncated images, a pixel bomb header, an
ICO hiding a large PNG, a Content-Length of 40 MB with no body, a body that stalls (408 after the
request timeout), a client that leaves before its answer, missing and wrong API keys, ``top_k`` of
1e20, a temperature of 1e39, a reconstruct whose answer could pass the response cap, 59 Mpx of
solid PNGs in a small body, 4 MB of JSON code grids, a wrong content type.

Recorded (bench/results/soak.json): per kind the statuses and good-path p50/p99; every answer that
is not the kind's expected status ("unexpected"; 5xx among them are failures, except 503 overloaded,
the admission's retry-later answer, which is counted on its own); the server's RSS after the warm-up
and at the end (growth must stay under 10 %); ``/healthz`` latency from a probe that asks every
50 ms (the event loop's responsiveness under all this); the CPU seconds of server and load
generator. The load generator is raw asyncio streams with every request's bytes built once, so it
takes little CPU from the 2 cores it shares with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import multipart_body, png, process_cpu_s, smooth_images, start_server
from service.bundle import DEFAULT_BUNDLE, Bundle

KEY = "soak-key"
BOUNDARY = "vqtokbenchboundary"


@dataclass
class Kind:
    name: str
    weight: float
    request: bytes
    expected: int | None  # None: the client leaves before any answer
    good: bool = False
    stall: bool = False  # send the request, then nothing more (the body never completes)
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    dropped: int = 0  # connection closed or reset without an answer


def http(method: str, path: str, body: bytes, content_type: str | None, *, key: str | None = KEY,
         length: int | None = None, close: bool = False) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    if key:
        head.append(f"Authorization: Bearer {key}")
    head.append(f"Content-Length: {len(body) if length is None else length}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def images_request(path: str, blobs: list[bytes], **kw) -> bytes:
    return http("POST", path, multipart_body(blobs), f"multipart/form-data; boundary={BOUNDARY}", **kw)


def json_request(path: str, obj, **kw) -> bytes:
    return http("POST", path, json.dumps(obj).encode(), "application/json", **kw)


def solid_png(side: int, value: int = 90) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def bomb_header_png(side: int = 100_000) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def kinds(bundle: Bundle) -> list[Kind]:
    size = bundle.image_size
    photo = png(smooth_images(1, size, seed=1)[0])
    photos = [png(im) for im in smooth_images(8, size, seed=2)]
    grids = {name: {"shape": [size // lv.stride] * 2, "dtype": "uint16",
                    "data": base64.b64encode(np.full((size // lv.stride,) * 2, 3, "<u2").tobytes()).decode()}
             for name, lv in bundle.levels.items()}
    close = {"close": True}
    ico = struct.pack("<HHH", 0, 1, 1)
    inner = solid_png(6000)
    ico += struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    # 64 items of 512x512-pixel grids as JSON lists (4 MB); the very last code is out of range (422).
    big_grids = {lv.name: [[1] * (512 // lv.stride)] * (512 // lv.stride) for lv in bundle.levels.values()}
    finest = bundle.levels[bundle.level_names[-1]]
    rows = big_grids[finest.name]
    bad_last = {**big_grids, finest.name: [*rows[:-1], [finest.codebook_size] * len(rows[-1])]}
    json_grids = {"items": [big_grids] * 63 + [bad_last]}
    multipart = f"multipart/form-data; boundary={BOUNDARY}"
    return [
        # good (keep-alive)
        Kind("encode_1", 40, images_request("/v1/encode", [photo]), 200, good=True),
        Kind("encode_8", 8, images_request("/v1/encode", photos), 200, good=True),
        Kind("reconstruct_1", 10, images_request("/v1/reconstruct", [photo]), 200, good=True),
        Kind("decode_1", 10, json_request("/v1/decode", {"items": [grids]}), 200, good=True),
        Kind("sample_1", 3, json_request("/v1/sample", {"n": 1}), 200, good=True),
        # hostile (a connection each)
        Kind("garbage_image", 2, images_request("/v1/encode", [b"not an image at all"], **close), 400),
        Kind("truncated_png", 2, images_request("/v1/encode", [photo[: len(photo) // 2]], **close), 400),
        Kind("bomb_header", 2, images_request("/v1/encode", [bomb_header_png()], **close), 413),
        Kind("ico_bomb", 1, images_request("/v1/encode", [ico], **close), 415),
        Kind("top_k_1e20", 2, json_request("/v1/sample", {"n": 1, "top_k": 1e20}, **close), 422),
        Kind("temperature_1e39", 1, json_request("/v1/sample", {"n": 1, "temperature": 1e39}, **close), 422),
        Kind("no_key", 2, images_request("/v1/encode", [photo], key=None, **close), 401),
        Kind("wrong_key", 1, images_request("/v1/encode", [photo], key="guess", **close), 401),
        Kind("prefix_path_no_key", 1, images_request("/x/v1/encode", [photo], key=None, **close), 401),
        Kind("wrong_content_type", 1, http("POST", "/v1/encode", photo, "image/png", **close), 415),
        Kind("truncated_multipart", 1, http("POST", "/v1/encode", multipart_body([photo])[:-30], multipart, **close),
             400),
        Kind("content_length_40mb", 1, http("POST", "/v1/encode", b"", multipart, length=40 * 2**20, **close), 413),
        # 64 x 520x520 reconstructed: up to 69 MB of base64 PNGs, over the 64 MiB cap: refused before any work.
        Kind("answer_over_cap", 0.5, images_request("/v1/reconstruct?fit=none", [solid_png(520)] * 64, **close),
             413),
        Kind("pixels_59mpx", 0.3, images_request("/v1/encode", [solid_png(2048)] * 14, **close), 200),
        Kind("json_4mb", 0.3, json_request("/v1/decode", json_grids, **close), 422),
        Kind("stalled_body", 0.3, images_request("/v1/encode", [photo], length=100_000, **close), 408, stall=True),
        Kind("leaves_early", 1, json_request("/v1/sample", {"n": 4}, **close), None),
    ]


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) of one response; its body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, keep = 0, True
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"connection" and v.strip().lower() == b"close":
            keep = False
    await reader.readexactly(length)
    return status, keep


class Soak:
    def __init__(self, port: int, kinds: list[Kind], clients: int, seed: int):
        self.port, self.kinds, self.clients = port, kinds, clients
        self.weights = [k.weight for k in kinds]
        self.rng = random.Random(seed)
        self.measuring = False
        self.probe: list[float] = []

    async def _one_off(self, kind: Kind, counted: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(kind.request)
            await writer.drain()
            if kind.expected is None:  # leave before the answer
                await asyncio.sleep(0.01)
                return
            status, _ = await asyncio.wait_for(read_answer(reader), 120)
            if counted:  # sent while measuring (a stall from the warm-up may end after it)
                kind.statuses[status] = kind.statuses.get(status, 0) + 1
        except (ConnectionError, asyncio.IncompleteReadError):
            kind.dropped += counted
        finally:
            writer.close()

    async def client(self, stop: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < stop:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            counted = self.measuring
            if counted:
                kind.sent += 1
            if not kind.good:
                await self._one_off(kind, counted)
                continue
            t0 = time.perf_counter()
            for attempt in (1, 2):
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = conn
                try:
                    writer.write(kind.request)
                    status, keep = await read_answer(reader)
                    break
                except (ConnectionError, asyncio.IncompleteReadError):
                    # The server closes a keep-alive connection idle for 5 s (this client may have
                    # spent 10 s on a stalled body): send again on a new one, as HTTP clients do.
                    writer.close()
                    conn = None
                    if attempt == 2:
                        kind.dropped += counted
            else:
                continue
            if counted:
                kind.statuses[status] = kind.statuses.get(status, 0) + 1
                if status == 200:
                    kind.latencies.append(time.perf_counter() - t0)
            if not keep:
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    async def healthz_probe(self, stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        request = http("GET", "/healthz", b"", None, key=None)
        while time.perf_counter() < stop:
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            writer.write(request)
            await read_answer(reader)
            if self.measuring:
                self.probe.append(time.perf_counter() - t0)
        writer.close()

    async def run(self, warmup: float, duration: float) -> None:
        start = time.perf_counter()
        stop = start + warmup + duration

        async def flip() -> None:
            await asyncio.sleep(warmup)
            for k in self.kinds:  # what the warm-up saw is not counted
                k.statuses.clear()
                k.latencies.clear()
                k.sent = k.dropped = 0
            self.measuring = True

        await asyncio.gather(flip(), self.healthz_probe(stop), *(self.client(stop) for _ in range(self.clients)))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.array(values) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=10.0, help="VQTOK_REQUEST_TIMEOUT_S of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra server environment")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = p.parse_args(argv)

    bundle = Bundle.load(args.model)
    all_kinds = kinds(bundle)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    env = {"VQTOK_API_KEYS": KEY, "VQTOK_REQUEST_TIMEOUT_S": str(args.request_timeout), "VQTOK_LOG_LEVEL": "warning",
           **dict(kv.split("=", 1) for kv in args.env)}
    # The server's output goes to a file (counted for tracebacks afterwards), not to this terminal.
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        proc, port = start_server(args.model, env)
    finally:
        os.dup2(saved, 2)
    rss: list[tuple[float, float]] = []
    done = threading.Event()

    def sample_rss() -> None:
        t0 = time.perf_counter()
        while not done.wait(1.0):
            rss.append((time.perf_counter() - t0, rss_mb(proc.pid)))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    rss_start = rss_mb(proc.pid)
    load_before = os.getloadavg()
    cpu0, gen0 = process_cpu_s(proc.pid), time.process_time()
    sampler.start()
    soak = Soak(port, all_kinds, args.clients, args.seed)
    try:
        asyncio.run(soak.run(args.warmup, args.duration))
        cpu1, gen1 = process_cpu_s(proc.pid), time.process_time()
        done.set()
        sampler.join()
        rss_end = rss_mb(proc.pid)
        metrics = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        held = [ln for ln in metrics.splitlines() if ln.startswith(("vqtok_pixels_in_flight ", "vqtok_queue_depth{"))]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    after_warmup = [mb for t, mb in rss if args.warmup <= t < args.warmup + 5]
    baseline = float(np.median(after_warmup)) if after_warmup else rss_start
    log.seek(0)
    server_log = log.read()

    per_kind, unexpected, overloaded = {}, {}, 0
    for k in all_kinds:
        wrong = {s: n for s, n in k.statuses.items() if s != k.expected and s != 503}
        overloaded += k.statuses.get(503, 0)
        if wrong:
            unexpected[k.name] = wrong
        per_kind[k.name] = {"good": k.good, "expected": k.expected, "sent": k.sent, "statuses": k.statuses,
                            "dropped": k.dropped, **(percentiles(k.latencies) if k.good else {})}
    good = [x for k in all_kinds if k.good for x in k.latencies]
    unexpected_5xx = sum(n for wrong in unexpected.values() for s, n in wrong.items() if s >= 500)
    result = {
        # Other work on the machine shows in the load average (the 1-minute one, before and after).
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "config": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                   "request_timeout_s": args.request_timeout, "model": str(args.model.resolve().relative_to(ROOT))
                   if args.model.resolve().is_relative_to(ROOT) else str(args.model), "seed": args.seed},
        "requests": sum(k.sent for k in all_kinds),
        "good": {"answered_200": len(good), "throughput_rps": round(len(good) / args.duration, 1), **percentiles(good)},
        "hostile_sent": sum(k.sent for k in all_kinds if not k.good),
        "unexpected_5xx": unexpected_5xx,
        "unexpected": unexpected,
        "overloaded_503": overloaded,
        "healthz_probe": {"probes": len(soak.probe), **percentiles(soak.probe)},
        "rss_mb": {"at_start": round(rss_start, 1), "after_warmup": round(baseline, 1), "end": round(rss_end, 1),
                   "max": round(max(mb for _, mb in rss), 1),
                   "growth_pct": round(100 * (rss_end - baseline) / baseline, 2),
                   "every_5s": [round(mb, 1) for t, mb in rss[4::5]]},
        "after_the_load": held,  # nothing may stay admitted or queued
        "cpu_s": {"server": round(cpu1 - cpu0, 1), "load_generator": round(gen1 - gen0, 1)},
        "server_log": {"tracebacks": server_log.count("Traceback"), "error_lines": server_log.count(" ERROR ")},
        "kinds": per_kind,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("requests", "good", "hostile_sent", "unexpected_5xx", "unexpected",
                                      "overloaded_503", "healthz_probe", "rss_mb", "after_the_load", "cpu_s", "server_log")}
    print(json.dumps(summary, indent=2))
    ok = unexpected_5xx == 0 and result["rss_mb"]["growth_pct"] < 10
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
