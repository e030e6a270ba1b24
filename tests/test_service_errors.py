"""Bad input, overload, deadlines and failing batches: each gets its status and the error shape,
and the server keeps serving afterwards."""
from __future__ import annotations

import asyncio
import struct
import threading
import zlib

import numpy as np
import pytest
from conftest import random_images
from service_support import eventually, image_files, metric_value, png_bytes, run, serving

from service.bundle import Bundle
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


GOOD = png_bytes(random_images(1, seed=1)[0])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming huge dimensions, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")


def _grid(h, w, value=1):
    return [[value] * w for _ in range(h)]


def _decode_body(top=None, bottom=None):
    return {"items": [{"top": top if top is not None else _grid(4, 4), "bottom": bottom if bottom is not None
                       else _grid(8, 8)}]}


def _multipart(blob: bytes, boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()


# (name, request kwargs, status, error code, text the message must contain)
BAD = [
    ("garbage bytes", {"url": "/v1/encode", "files": image_files([b"definitely not an image"])}, 400,
     "invalid_image", "images[0]"),
    ("truncated png", {"url": "/v1/encode", "files": image_files([GOOD, GOOD[: len(GOOD) // 2]])}, 400,
     "invalid_image", "images[1]"),
    ("zero-byte file", {"url": "/v1/encode", "files": image_files([b""])}, 400, "invalid_image", "empty"),
    ("bomb dimensions", {"url": "/v1/encode", "files": image_files([bomb_png()])}, 413, "too_many_pixels",
     "exceeds the limit"),
    ("bomb via reconstruct", {"url": "/v1/reconstruct", "files": image_files([bomb_png(20_000, 20_000)])}, 413,
     "too_many_pixels", "images[0]"),
    ("wrong content type", {"url": "/v1/encode", "content": GOOD, "headers": {"content-type": "image/png"}}, 415,
     "unsupported_media_type", "multipart"),
    ("decode as form", {"url": "/v1/decode", "data": {"items": "x"}}, 415, "unsupported_media_type", "json"),
    ("invalid base64", {"url": "/v1/encode", "json": {"images": ["not*base64!"]}}, 422, "invalid_base64",
     "images[0]"),
    ("no images", {"url": "/v1/encode", "json": {"images": []}}, 422, "invalid_request", "images"),
    ("multipart without images", {"url": "/v1/encode", "files": [("other", ("a.png", GOOD, "image/png"))]}, 422,
     "invalid_request", "images"),
    ("images as a text field", {"url": "/v1/encode", "data": {"images": "x"}, "files": image_files([GOOD])}, 422,
     "invalid_request", "file part"),
    ("multipart cut short", {"url": "/v1/encode", "content": _multipart(GOOD)[:-40],
                             "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}, 400,
     "invalid_multipart", "closing boundary"),
    ("multipart without a boundary", {"url": "/v1/encode", "content": _multipart(GOOD),
                                      "headers": {"content-type": "multipart/form-data"}}, 400,
     "invalid_multipart", "boundary"),
    ("fit=none, not a multiple of 8", {"url": "/v1/encode", "params": {"fit": "none"},
                                           "files": image_files([png_bytes(np.zeros((30, 32, 3), np.uint8))])},
     422, "invalid_size", "multiples of 8"),
    ("unknown fit", {"url": "/v1/encode", "params": {"fit": "stretch"}, "files": image_files([GOOD])}, 422,
     "invalid_request", "fit"),
    ("malformed json", {"url": "/v1/decode", "content": b'{"items": [', "headers": {"content-type": "application/json"}},
     400, "invalid_json", "JSON"),
    ("code out of range", {"url": "/v1/decode", "json": _decode_body(top=_grid(4, 4, 32))}, 422, "invalid_codes",
     "items[0].top"),
    ("negative code", {"url": "/v1/decode", "json": _decode_body(bottom=[[0] * 7 + [-1]] + _grid(7, 8))}, 422,
     "invalid_codes", "items[0].bottom"),
    ("non-integer code", {"url": "/v1/decode", "json": _decode_body(top=[[1.5] * 4] * 4)}, 422, "invalid_request",
     "items[0].top: codes must be integers"),
    ("string code", {"url": "/v1/decode", "json": _decode_body(top=[["1"] * 4] * 4)}, 422, "invalid_request",
     "items[0].top"),
    ("ragged grid", {"url": "/v1/decode", "json": _decode_body(bottom=_grid(7, 8) + [[1] * 5])}, 422,
     "invalid_request", "items[0].bottom: is ragged"),
    ("inconsistent shapes", {"url": "/v1/decode", "json": _decode_body(bottom=_grid(8, 6))}, 422, "invalid_codes",
     "items[0].bottom: shape [8, 6] does not match items[0].top"),
    ("1-D grid", {"url": "/v1/decode", "json": _decode_body(top=[1, 2, 3])}, 422, "invalid_request", "2-D"),
    ("bad compact grid", {"url": "/v1/decode", "json": _decode_body(top={"shape": [4, 4], "dtype": "uint16",
                                                                       "data": "@@@"})}, 422,
     "invalid_request", "items[0].top: data is not valid base64"),
    ("short compact grid", {"url": "/v1/decode", "json": _decode_body(top={"shape": [4, 4], "dtype": "uint16",
                                                                         "data": "AAAA"})}, 422,
     "invalid_request", "needs 32"),
    ("missing bottom", {"url": "/v1/decode", "json": {"items": [{"top": _grid(4, 4)}]}}, 422, "invalid_request",
     "items[0].bottom"),
    ("n = 0", {"url": "/v1/sample", "json": {"n": 0}}, 422, "invalid_request", "n:"),
    ("n = 10**6", {"url": "/v1/sample", "json": {"n": 10**6}}, 422, "invalid_request", "n:"),
    ("temperature 0", {"url": "/v1/sample", "json": {"n": 1, "temperature": 0}}, 422, "invalid_request",
     "temperature"),
    ("unknown field", {"url": "/v1/sample", "json": {"n": 1, "topk": 3}}, 422, "invalid_request", "topk"),
]


def test_bad_inputs_get_their_4xx_and_the_server_keeps_serving(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            for name, kwargs, status, code, text in BAD:
                r = await c.post(**kwargs)
                assert r.status_code == status, (name, r.text)
                body = r.json()
                assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, name
                assert body["error"]["code"] == code, (name, body)
                assert text in body["error"]["message"], (name, body)
                assert "Traceback" not in r.text
                ok = await c.post("/v1/encode", files=image_files([GOOD]))
                assert ok.status_code == 200, (name, ok.text)
            assert (await c.get("/nope")).json()["error"]["code"] == "not_found"

    run(main())


def test_limits(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend, max_body_bytes=4096, max_image_pixels=48 * 48, max_items=3,
                           max_native_pixels=32 * 48) as (_, c):
            big = png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
            assert len(big) > 4096
            r = await c.post("/v1/encode", files=image_files([big]))
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

            async def chunked():  # no Content-Length: the limit applies while streaming
                yield big

            r = await c.post("/v1/encode", content=chunked(), headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
            # Pixels over the limit, in a small file: refused from the header.
            r = await c.post("/v1/encode", files=image_files([png_bytes(np.zeros((8, 300, 3), np.uint8))]))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
            small = png_bytes(np.full((32, 32, 3), 90, np.uint8))
            r = await c.post("/v1/encode", files=image_files([small] * 4))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
            # Parts are counted while parsing: a flood of tiny parts is refused before it piles up.
            flood = b"".join(b"--b0undary\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n"
                             for _ in range(40)) + b"--b0undary--\r\n"
            r = await c.post("/v1/encode", content=flood,
                             headers={"content-type": "multipart/form-data; boundary=b0undary"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
            r = await c.post("/v1/decode", json={"items": [{"top": _grid(8, 8), "bottom": _grid(16, 16)}]})
            assert r.status_code == 422 and "items[0]" in r.json()["error"]["message"]
            r = await c.post("/v1/encode", params={"fit": "none"},
                             files=image_files([png_bytes(np.zeros((40, 40, 3), np.uint8))]))
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_size"
            assert (await c.post("/v1/encode", files=image_files([small] * 3))).status_code == 200

    run(main())


class Flaky:
    """The real backend, except that ``encode`` raises for the first ``failures`` calls, and can be
    made to block until released (to hold the queue full, or run past a deadline)."""

    def __init__(self, inner, failures: int = 0):
        self.inner, self.failures = inner, failures
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def warmup(self):
        self.inner.warmup()

    def encode(self, images):
        self.calls += 1
        self.entered.set()
        self.gate.wait(30)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("injected failure")
        return self.inner.encode(images)


def test_a_failing_batch_fails_only_itself(tiny_bundle, backend):
    flaky = Flaky(backend, failures=1)

    async def main():
        async with serving(tiny_bundle, flaky) as (_, c):
            r = await c.post("/v1/encode", files=image_files([GOOD]))
            assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
            assert "Traceback" not in r.text and "injected" not in r.text
            for _ in range(3):
                assert (await c.post("/v1/encode", files=image_files([GOOD]))).status_code == 200
            assert metric_value((await c.get("/metrics")).text, "vqtok_batch_failures_total", op="encode") == 1

    run(main())


def test_full_queue_is_503_and_deadline_is_504(tiny_bundle, backend):
    flaky = Flaky(backend)

    async def main():
        # One stream: the batch held in the backend stops the queue from draining.
        async with serving(tiny_bundle, flaky, max_batch=1, queue_limit=2, max_delay_ms=0, streams=1,
                           request_timeout_s=30) as (app, c):
            flaky.gate.clear()
            flaky.entered.clear()
            running = asyncio.ensure_future(c.post("/v1/encode", files=image_files([GOOD])))
            await asyncio.to_thread(flaky.entered.wait, 30)  # one batch is in the backend, blocked
            queued = [asyncio.ensure_future(c.post("/v1/encode", files=image_files([GOOD]))) for _ in range(2)]
            engine = app.state.vqtok.default.engine
            await eventually(lambda: engine.encoder.depth == 2)
            r = await c.post("/v1/encode", files=image_files([GOOD]))
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"
            # More items than the queue can ever hold: refused for good, not "retry later".
            r = await c.post("/v1/encode", files=image_files([GOOD] * 3))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items"
            flaky.gate.set()
            assert all(x.status_code == 200 for x in await asyncio.gather(running, *queued))

        async with serving(tiny_bundle, flaky, request_timeout_s=0.3) as (app, c):
            flaky.gate.clear()
            r = await c.post("/v1/encode", files=image_files([GOOD]))
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
            flaky.gate.set()
            assert (await c.post("/v1/encode", files=image_files([GOOD]))).status_code == 200

    run(main())
