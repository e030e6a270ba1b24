"""Hostile load, admission (issue 10, items 1-4): decoding is admitted work in pixels and never runs
on the event loop, refused formats never reach a decoder, the pixels in flight and the answers are
bounded, and large JSON is parsed off the loop within a bound."""
from __future__ import annotations

import asyncio
import io
import json
import struct
import threading

import numpy as np
import pytest
from conftest import random_images
from PIL import Image
from service_support import image_files, metric_value, png_bytes, run, serving
from test_service_errors import Flaky

import service.api.call as call_module
from service.bundle import Bundle
from service.bundle.intake import Header
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig

GOOD = png_bytes(random_images(1, seed=3)[0])


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


def solid_png(side: int, value: int = 90) -> bytes:
    return png_bytes(np.full((side, side, 3), value, np.uint8), compress_level=9)


def record_threads(monkeypatch, owner, name: str) -> list[bool]:
    """Wrap ``owner.name``; the list gets, per call, whether it ran on the event loop's thread.

    Off the loop is checked by where the work runs, not by how late probes answer: timings fail on a
    busy machine (the loop can lose the CPU to another process whatever the code does)."""
    on_loop: list[bool] = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return on_loop


def test_a_pixel_bomb_body_decodes_off_the_event_loop(tiny_bundle, backend, monkeypatch):
    # 14 solid-colour 2048x2048 PNGs: about 230 kB of body, 59 Mpx to decode (the scenario).
    bomb = solid_png(2048)
    assert len(bomb) * 14 < 256 * 1024
    decoded_on_loop = record_threads(monkeypatch, Header, "decode")

    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            r = await c.post("/v1/encode", files=image_files([bomb] * 14))
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 14
            assert decoded_on_loop == [False] * 14  # every image decoded in the work pool
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_pixels_in_flight") == 0  # released once answered

    run(main())


def ico_holding(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory says ``claimed`` x ``claimed`` but whose one entry is ``png``."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_refused_formats_are_415_before_any_decoder_runs(tiny_bundle, backend):
    ico_bomb = ico_holding(solid_png(6000))
    psd = b"8BPS\x00\x01" + b"\x00" * 64
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 6000 6000\n"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="ICO")  # a genuine small ICO is refused as well

    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            for name, blob in [("ICO", ico_bomb), ("ICO", buf.getvalue()), ("PSD", psd), ("EPS", eps)]:
                r = await c.post("/v1/encode", files=image_files([GOOD, blob]))
                assert r.status_code == 415, (name, r.text)
                error = r.json()["error"]
                assert error["code"] == "unsupported_image_format" and name in error["message"], error
                assert "images[1]" in error["message"] and "PNG" in error["message"]
            # The same through JSON base64 and reconstruct.
            import base64
            r = await c.post("/v1/reconstruct", json={"images": [base64.b64encode(ico_bomb).decode()]})
            assert r.status_code == 415
            assert (await c.post("/v1/encode", files=image_files([GOOD]))).status_code == 200

    run(main())


def test_pixels_in_flight_are_bounded_and_released(tiny_bundle, backend):
    flaky = Flaky(backend)
    side = 64
    per_image = side * side

    async def main():
        async with serving(tiny_bundle, flaky, max_pixels_in_flight=5 * per_image, streams=1, max_batch=8,
                           max_delay_ms=0) as (app, c):
            native = png_bytes(random_images(1, size=side, seed=1)[0])
            # More than the whole budget in one request: never fits.
            r = await c.post("/v1/encode", params={"fit": "none"}, files=image_files([native] * 6))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
            assert "VQTOK_MAX_PIXELS_IN_FLIGHT" in r.json()["error"]["message"]
            # Hold 4 images' pixels in a blocked batch; the next request of 2 images does not fit now.
            flaky.gate.clear()
            flaky.entered.clear()
            held = asyncio.ensure_future(c.post("/v1/encode", params={"fit": "none"}, files=image_files([native] * 4)))
            await asyncio.to_thread(flaky.entered.wait, 30)
            budget = app.state.vqtok.budget
            assert budget.held == 4 * per_image
            r = await c.post("/v1/encode", params={"fit": "none"}, files=image_files([native] * 2))
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"
            # A small request still fits (center_crop: 32x32 arrays, header pixels 64x64).
            small = asyncio.ensure_future(c.post("/v1/encode", files=image_files([GOOD])))
            flaky.gate.set()
            assert (await held).status_code == 200 and (await small).status_code == 200
            assert budget.held == 0
            # Failed requests release their pixels too.
            bad = png_bytes(random_images(1, size=side)[0])[:200]
            for _ in range(3):
                assert (await c.post("/v1/encode", files=image_files([GOOD, bad]))).status_code == 400
            assert budget.held == 0
            assert (await c.post("/v1/encode", params={"fit": "none"}, files=image_files([native] * 5))
                    ).status_code == 200

    run(main())


def test_answers_are_capped_before_any_work(tiny_bundle, backend):
    flaky = Flaky(backend)
    side = 64

    async def main():
        # 4 bytes a pixel: one 64x64 reconstruct may answer 16 kB; two may not.
        async with serving(tiny_bundle, flaky, max_response_bytes=4 * side * side + 10) as (_, c):
            native = png_bytes(random_images(1, size=side, seed=2)[0])
            r = await c.post("/v1/reconstruct", params={"fit": "none"}, files=image_files([native] * 2))
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["code"] == "response_too_large" and "VQTOK_MAX_RESPONSE_BYTES" in error["message"]
            assert flaky.calls == 0  # refused before the model ran
            grid = {"top": [[1] * 8] * 8, "bottom": [[1] * 16] * 16}  # 64x64 each
            r = await c.post("/v1/decode", json={"items": [grid, grid]})
            assert r.status_code == 413 and r.json()["error"]["code"] == "response_too_large"
            assert (await c.post("/v1/decode", json={"items": [grid]})).status_code == 200
            assert (await c.post("/v1/reconstruct", params={"fit": "none"}, files=image_files([native]))
                    ).status_code == 200

    run(main())


def test_large_json_is_parsed_off_the_loop_and_bounded(tiny_bundle, backend, monkeypatch):
    # 64 items of 512x512-pixel grids as JSON lists: ~4 MB; the last code is out of range, so the
    # request ends in a 422 after the parse (no inference: the parse is the work measured here).
    bottom = np.random.default_rng(0).integers(0, 31, (128, 128)).tolist()
    top = np.random.default_rng(1).integers(0, 31, (64, 64)).tolist()
    items = [{"top": top, "bottom": bottom} for _ in range(64)]
    items[-1] = {"top": top, "bottom": [*bottom[:-1], [*bottom[-1][:-1], 99]]}
    body = json.dumps({"items": items}).encode()
    assert len(body) > 3_000_000

    parsed_on_loop = record_threads(monkeypatch, call_module, "_validate_json")

    async def main():
        async with serving(tiny_bundle, backend, max_native_pixels=512 * 512) as (_, c):
            r = await c.post("/v1/decode", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "items[63].bottom" in r.json()["error"]["message"], r.text
            assert parsed_on_loop == [False]  # the 4 MB body was parsed in the work pool
        async with serving(tiny_bundle, backend, max_json_bytes=1_000_000) as (_, c):
            r = await c.post("/v1/decode", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "VQTOK_MAX_JSON_BYTES" in r.json()["error"]["message"]
            small = {"items": [{"top": [[1] * 4] * 4, "bottom": [[1] * 8] * 8}]}
            assert (await c.post("/v1/decode", json=small)).status_code == 200
            assert parsed_on_loop == [False, True]  # a small body is parsed inline: a thread hop costs more

    run(main())


def test_decoding_stops_with_its_request():
    """A request cancelled (deadline, disconnect) while its images decode: a job not started never
    runs, a running one stops before its next image."""
    import threading

    from service.engine.admission import WorkPool

    started, release = threading.Event(), threading.Event()
    decoded: list[int] = []

    def decode_all(stop, n):
        for i in range(n):
            if stop.is_set():
                return decoded
            started.set()
            release.wait(10)
            decoded.append(i)
        return decoded

    async def main():
        pool = WorkPool(1)
        running = asyncio.ensure_future(pool.run(decode_all, 5))
        waiting = asyncio.ensure_future(pool.run(decode_all, 5))
        await asyncio.to_thread(started.wait, 10)
        running.cancel()
        waiting.cancel()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        release.set()  # the running job's current image ends now
        pool.shutdown()
        await asyncio.to_thread(lambda: pool._executor.shutdown(wait=True))

    run(main())
    assert decoded == [0]  # the running job finished its image and stopped; the waiting one never started
