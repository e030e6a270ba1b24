"""The HTTP API in process (httpx ASGI transport against the tiny bundle): what each endpoint
returns, the image formats it takes, and the client library on top."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from conftest import TINY_CODES, TINY_SIZE, random_images
from PIL import Image
from service_support import image_files, metric_value, png_bytes, run, serving

from service.bundle import Bundle
from service.client import AsyncClient, AuthenticationError, Codes, InvalidRequestError
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


@pytest.fixture(scope="module")
def backend(tiny_bundle):
    """One set of ORT sessions for every app in this module (sessions are what is slow to build)."""
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def images():
    return random_images(4, seed=3)


def _b64_grid(grid) -> dict:
    g = np.asarray(grid, dtype="<u2")
    return {"shape": list(g.shape), "dtype": "uint16", "data": base64.b64encode(g.tobytes()).decode()}


def test_encode_decode_reconstruct_roundtrip(tiny_bundle, backend, images):
    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            r = await c.post("/v1/encode", files=image_files([png_bytes(im) for im in images]))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "tiny" and len(body["items"]) == len(images)
            item = body["items"][0]
            assert (item["height"], item["width"]) == (TINY_SIZE, TINY_SIZE)
            top, bottom = np.array(item["top"]), np.array(item["bottom"])
            assert top.shape == (TINY_SIZE // 8, TINY_SIZE // 8) and bottom.shape == (TINY_SIZE // 4, TINY_SIZE // 4)
            assert top.min() >= 0 and bottom.max() < TINY_CODES
            # Same codes as ONNX Runtime on the raw pixels (the image is already model-sized).
            direct = backend.encode(images[:1])
            assert (top == direct["top"][0]).all() and (bottom == direct["bottom"][0]).all()

            # The compact form carries the same codes.
            r = await c.post("/v1/encode", params={"format": "b64"}, files=image_files([png_bytes(images[0])]))
            grid = r.json()["items"][0]["top"]
            assert grid["dtype"] == "uint16"
            assert (np.frombuffer(base64.b64decode(grid["data"]), "<u2").reshape(grid["shape"]) == top).all()

            # A multipart body that arrives in small chunks (boundaries split across them) parses the same.
            blob = png_bytes(images[0])
            body = (b"--cut\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n"
                    + blob + b"\r\n--cut--\r\n")

            async def in_chunks():
                for i in range(0, len(body), 7):
                    yield body[i:i + 7]

            r = await c.post("/v1/encode", content=in_chunks(),
                             headers={"content-type": "multipart/form-data; boundary=cut"})
            assert r.status_code == 200 and r.json()["items"][0]["top"] == item["top"], r.text

            # JSON input, data URL tolerated.
            b64 = base64.b64encode(png_bytes(images[0])).decode()
            r = await c.post("/v1/encode", json={"images": [b64, "data:image/png;base64," + b64]})
            assert r.status_code == 200 and all(it["top"] == item["top"] for it in r.json()["items"])

            # Decode: list grids and compact grids give the same PNG; Accept: image/png gives raw bytes.
            r1 = await c.post("/v1/decode", json={"items": [{"top": item["top"], "bottom": item["bottom"]}]})
            r2 = await c.post("/v1/decode", json={"items": [{"top": _b64_grid(top), "bottom": _b64_grid(bottom)}]})
            assert r1.status_code == r2.status_code == 200
            assert r1.json()["images"] == r2.json()["images"]
            r3 = await c.post("/v1/decode", json={"items": [{"top": item["top"], "bottom": item["bottom"]}]},
                              headers={"Accept": "image/png"})
            assert r3.headers["content-type"] == "image/png"
            decoded = np.asarray(Image.open(io.BytesIO(r3.content)))
            assert decoded.shape == (TINY_SIZE, TINY_SIZE, 3)
            assert (decoded == backend.decode({k: v[:1] for k, v in direct.items()})[0]).all()

            r = await c.post("/v1/reconstruct", files=image_files([png_bytes(images[0])]))
            assert r.status_code == 200
            rec = r.json()["items"][0]
            png = np.asarray(Image.open(io.BytesIO(base64.b64decode(rec["image"]))))
            assert (png == decoded).all()
            mse = np.mean((png.astype(float) - images[0].astype(float)) ** 2)
            assert rec["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-4)

    run(main())


def test_sample_is_reproducible_and_returns_codes(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            a = await c.post("/v1/sample", json={"n": 3, "seed": 7, "return_codes": True})
            b = await c.post("/v1/sample", json={"n": 3, "seed": 7, "temperature": 1.0})
            other = await c.post("/v1/sample", json={"n": 3, "seed": 8})
            assert a.status_code == b.status_code == other.status_code == 200, a.text
            assert a.json()["seed"] == 7 and len(a.json()["images"]) == 3
            assert a.json()["images"] == b.json()["images"]
            assert a.json()["images"] != other.json()["images"]
            assert b.json()["codes"] is None
            codes = a.json()["codes"]
            assert np.array(codes[0]["top"]).shape == (TINY_SIZE // 8, TINY_SIZE // 8)
            # Decoding the returned codes gives back the sampled image.
            r = await c.post("/v1/decode", json={"items": codes[:1]})
            assert r.json()["images"][0] == a.json()["images"][0]
            # top_k=1 leaves no choice: every seed gives the same image.
            g1 = await c.post("/v1/sample", json={"n": 1, "seed": 1, "top_k": 1})
            g2 = await c.post("/v1/sample", json={"n": 1, "seed": 2, "top_k": 1, "temperature": 0.5})
            assert g1.json()["images"] == g2.json()["images"]
            # No seed: the server picks one and says which, so the call can be repeated.
            r = await c.post("/v1/sample", json={"n": 1})
            again = await c.post("/v1/sample", json={"n": 1, "seed": r.json()["seed"]})
            assert r.json()["images"] == again.json()["images"]

    run(main())


def test_concurrent_samples_do_not_depend_on_their_batch(tiny_bundle, backend):
    """Two requests batched into one sampling loop give what each gives alone."""
    import asyncio

    async def main():
        async with serving(tiny_bundle, backend, max_delay_ms=50) as (_app, c):
            alone = [(await c.post("/v1/sample", json={"n": n, "seed": s})).json()["images"]
                     for n, s in ((2, 11), (3, 12))]
            together = await asyncio.gather(*(c.post("/v1/sample", json={"n": n, "seed": s})
                                              for n, s in ((2, 11), (3, 12))))
            assert [r.json()["images"] for r in together] == alone
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_batch_size_bucket", op="sample", le="4.0") < \
                metric_value(metrics, "vqtok_batch_size_count", op="sample")  # a batch of 5 happened

    run(main())


def _encode_one(c, blob: bytes, **params):
    return c.post("/v1/encode", params=params, files=image_files([blob]))


def test_image_modes_and_orientation(tiny_bundle, backend, images):
    rgb = images[0]
    gray8 = rgb.mean(-1).astype(np.uint8)

    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            async def codes(blob: bytes, **params):
                r = await _encode_one(c, blob, **params)
                assert r.status_code == 200, r.text
                return r.json()["items"][0]

            base = await codes(png_bytes(rgb))
            # Opaque RGBA and a palette image of the same pixels are the same image.
            assert await codes(png_bytes(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))) == base
            pal = Image.fromarray(rgb).quantize(256)
            assert await codes(png_bytes(pal)) == await codes(png_bytes(pal.convert("RGB")))
            # 16-bit grayscale is scaled to 8 bits, not clipped: v * 257 comes back as v.
            gray = await codes(png_bytes(gray8))
            assert await codes(png_bytes(Image.fromarray(gray8.astype(np.uint16) * 257))) == gray
            # 1-bit, CMYK (JPEG), transparent palette: accepted.
            for im in (Image.fromarray(gray8).convert("1"), Image.fromarray(rgb).convert("CMYK")):
                fmt = "JPEG" if im.mode == "CMYK" else "PNG"
                await codes(png_bytes(im, format=fmt))
            trans = Image.fromarray(rgb).convert("P")
            trans.info["transparency"] = 0
            await codes(png_bytes(trans, transparency=0))

            # EXIF orientation 6 (rotate 90° clockwise to display): a 32 wide x 48 high file is a
            # 48 x 32 picture, and fit=none tokenizes that picture.
            tall = np.concatenate([rgb, rgb[:16]], axis=0)
            exif = Image.Exif()
            exif[0x0112] = 6
            item = await codes(png_bytes(Image.fromarray(tall), format="JPEG", exif=exif.tobytes()), fit="none")
            assert (item["height"], item["width"]) == (32, 48)
            assert np.array(item["bottom"]).shape == (8, 12)

            # fit=center_crop of a non-square image: resize the shorter side, crop the centre.
            wide = np.concatenate([rgb[:, :8], rgb, rgb[:, :8]], axis=1)  # 32 x 48
            assert await codes(png_bytes(wide)) == base  # shorter side already fits: centre crop only

    run(main())


def test_model_health_metrics_and_docs(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend) as (_, c):
            info = (await c.get("/v1/model")).json()
            assert info["name"] == "tiny" and info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
            assert info["image_size"] == TINY_SIZE and [lv["name"] for lv in info["levels"]] == ["top", "bottom"]
            assert info["limits"]["size_multiple"] == 8 and "encoder" in info["graphs"]
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            assert (await c.get("/readyz")).status_code == 200
            await _encode_one(c, png_bytes(random_images(1)[0]))
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_requests_total", endpoint="/v1/encode", status="200") == 1
            assert metric_value(metrics, "vqtok_batch_size_count", op="encode") >= 1
            for name in ("vqtok_request_latency_seconds_count", "vqtok_queue_time_seconds_count",
                         "vqtok_inference_time_seconds_count"):
                assert name in metrics
            assert "vqtok_queue_depth" in metrics
            spec = (await c.get("/openapi.json")).json()
            schemas = spec["components"]["schemas"]
            for name in ("EncodeJsonRequest", "DecodeRequest", "SampleRequest", "EncodeResponse", "ModelInfo",
                         "ErrorResponse"):
                assert name in schemas
            assert schemas["SampleRequest"]["properties"]["n"]["maximum"] == 64
            params = {q["name"]: q for q in spec["paths"]["/v1/encode"]["post"]["parameters"]}
            assert params["fit"]["schema"]["enum"] == ["center_crop", "none"]
            assert params["format"]["schema"]["default"] == "list"
            assert info["streams"] >= 1 and info["intra_op_threads"] >= 1
            encode_body = spec["paths"]["/v1/encode"]["post"]["requestBody"]["content"]
            assert {"multipart/form-data", "application/json"} <= set(encode_body)
            assert (await c.get("/docs")).status_code == 200

    run(main())


def test_readyz_waits_for_warmup(tiny_bundle, backend):
    import asyncio
    import threading

    from service_support import settings_for

    from service.api.app import create_app

    release = threading.Event()

    class SlowWarmup:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def warmup(self):
            release.wait(30)

    async def main():
        import httpx

        app = create_app(settings_for(tiny_bundle), backend=SlowWarmup(backend))
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 503
            r = await c.post("/v1/sample", json={"n": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            release.set()
            await asyncio.wait_for(app.state.vqtok.ready.wait(), 30)
            assert (await c.get("/readyz")).status_code == 200

    run(main())


def test_api_keys(tiny_bundle, backend):
    async def main():
        async with serving(tiny_bundle, backend, api_keys=["k1", "secret-2"]) as (_, c):
            r = await c.post("/v1/sample", json={"n": 1})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            # The key is checked before the body is even looked at.
            assert (await c.post("/v1/decode", content=b"{", headers={"content-type": "application/json"})
                    ).status_code == 401
            wrong = await c.post("/v1/sample", json={"n": 1}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = await c.post("/v1/sample", json={"n": 1}, headers={"Authorization": "bearer secret-2"})
            assert ok.status_code == 200
            assert (await c.get("/healthz")).status_code == 200 and (await c.get("/readyz")).status_code == 200
            # Refused before routing, yet counted under their endpoint; /docs says which scheme to use.
            metrics = (await c.get("/metrics")).text
            assert metric_value(metrics, "vqtok_requests_total", endpoint="/v1/sample", status="401") == 2
            spec = (await c.get("/openapi.json")).json()
            assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
            assert spec["paths"]["/v1/encode"]["post"]["security"] == [{"bearer": []}]
            assert "security" not in spec["paths"]["/healthz"]["get"]

    run(main())


def test_async_client_in_process(tiny_bundle, backend, images):
    async def main():
        async with serving(tiny_bundle, backend, api_keys=["k"]) as (app, _):
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with AsyncClient("http://test", api_key="k", transport=transport) as client:
                codes = await client.encode([Image.fromarray(images[0]), images[1]])
                assert isinstance(codes[0], Codes) and codes[0].top.dtype == np.int64
                assert codes[0].bottom.shape == (TINY_SIZE // 4, TINY_SIZE // 4)
                pics = await client.decode(codes)
                assert pics[0].size == (TINY_SIZE, TINY_SIZE)
                rec = await client.reconstruct(images[0])
                assert np.array_equal(np.asarray(rec[0].image), np.asarray(pics[0]))
                samples = await client.sample(2, seed=5, return_codes=True)
                assert samples.seed == 5 and len(samples.images) == 2 and samples.codes[1].top.shape == (4, 4)
                with pytest.raises(InvalidRequestError) as e:
                    await client.sample(0)
                assert e.value.status == 422 and "n" in e.value.message
            async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as anonymous:
                with pytest.raises(AuthenticationError):
                    await anonymous.sample(1)

    run(main())
