"""The real thing: ``vqtok serve`` as a subprocess on a loopback port, driven by the clients;
graceful SIGTERM; refusing a broken bundle; and no torch anywhere in the service."""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY_SIZE, random_images
from PIL import Image
from service_support import ROOT, metric_value, serve_process

from service.client import AsyncClient, Client, InvalidRequestError


def test_serve_subprocess_with_sync_and_async_clients(tiny_bundle):
    images = random_images(8, seed=9)
    with serve_process(tiny_bundle, env={"VQTOK_MAX_DELAY_MS": "20"}) as (_proc, url):
        with Client(url) as c:
            info = c.model()
            assert info["name"] == "tiny" and info["provider"] == "CPUExecutionProvider"
            codes = c.encode([Image.fromarray(im) for im in images[:2]])
            assert codes[0].top.shape == (TINY_SIZE // 8, TINY_SIZE // 8)
            decoded = c.decode(codes)
            rec = c.reconstruct(images[0])
            assert np.array_equal(np.asarray(rec[0].image), np.asarray(decoded[0])) and rec[0].psnr > 0
            s1, s2 = c.sample(2, seed=3, top_k=5, return_codes=True), c.sample(2, seed=3, top_k=5)
            assert [np.asarray(a).tolist() for a in s1.images] == [np.asarray(b).tolist() for b in s2.images]
            assert np.array_equal(np.asarray(c.decode(s1.codes[:1])[0]), np.asarray(s1.images[0]))
            with pytest.raises(InvalidRequestError):
                c.sample(65)
            unbatched = [c.encode(im)[0] for im in images]

        async def concurrent():
            async with AsyncClient(url) as ac:
                return await asyncio.gather(*(ac.encode(images[i % 8]) for i in range(32)))

        results = asyncio.run(concurrent())
        for i, (got,) in enumerate(results):
            assert np.array_equal(got.top, unbatched[i % 8].top) and np.array_equal(got.bottom, unbatched[i % 8].bottom)
        with Client(url) as c:
            metrics = c._http.get("/metrics").text
        assert metric_value(metrics, "vqtok_requests_total", endpoint="/v1/encode", status="200") == 1 + 8 + 32
        assert metric_value(metrics, "vqtok_batch_size_count", op="encode") < 1 + 8 + 32  # some batching


def test_sigterm_lets_in_flight_requests_finish(tiny_bundle):
    # A long batching delay keeps the requests in flight when the signal arrives.
    with serve_process(tiny_bundle, env={"VQTOK_MAX_DELAY_MS": "1500", "VQTOK_MAX_BATCH": "64"}) as (proc, url):
        async def load():
            async with AsyncClient(url) as ac:
                tasks = [asyncio.ensure_future(ac.sample(1, seed=i)) for i in range(6)]
                tasks += [asyncio.ensure_future(ac.encode(random_images(1, seed=i)[0])) for i in range(6)]
                for _ in range(200):  # until the server has queued every request
                    await asyncio.sleep(0.05)
                    metrics = (await ac._http.get("/metrics")).text
                    if (metric_value(metrics, "vqtok_queue_depth", op="sample") == 6
                            and metric_value(metrics, "vqtok_queue_depth", op="encode") == 6):
                        break
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(load())
        assert not [r for r in results if isinstance(r, BaseException)], results
        # uvicorn re-raises the signal once it has shut down gracefully, so the status says SIGTERM.
        assert proc.wait(30) in (0, -signal.SIGTERM)


def test_a_disconnected_client_leaves_the_queue(tiny_bundle):
    import socket

    import httpx
    from service_support import png_bytes

    blob = png_bytes(random_images(1)[0])
    with serve_process(tiny_bundle, env={"VQTOK_MAX_DELAY_MS": "2000", "VQTOK_MAX_BATCH": "64"}) as (_proc, url):
        def metric(name, **labels):
            return metric_value(httpx.get(f"{url}/metrics").text, name, **labels)

        request = httpx.Request("POST", f"{url}/v1/encode", files=[("images", ("a.png", blob, "image/png"))])
        body = request.read()
        head = (f"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            for _ in range(300):
                if metric("vqtok_queue_depth", op="encode") == 1:
                    break
        # The socket is closed: the request must leave the queue without waiting for its batch.
        for _ in range(300):
            if metric("vqtok_queue_depth", op="encode") == 0:
                break
        assert metric("vqtok_queue_depth", op="encode") == 0
        assert metric("vqtok_requests_total", endpoint="/v1/encode", status="499") == 1
        with Client(url) as c:
            c.encode(blob)
        assert metric("vqtok_batch_size_sum", op="encode") == 1  # only the second request ran


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_broken_bundle_refuses_to_start_and_names_the_file(tiny_bundle, tmp_path, damage):
    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, broken)
    if damage == "missing":
        (broken / "decoder.onnx").unlink()
        name = "decoder.onnx"
    else:
        with open(broken / "prior_top.onnx", "ab") as f:
            f.write(b"\0")
        name = "prior_top.onnx"
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model", str(broken), "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert name in proc.stderr and damage in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_service_never_imports_torch(tiny_bundle):
    script = textwrap.dedent(f"""
        import asyncio, sys
        import httpx
        import numpy as np
        import importlib, pkgutil, service
        for module in pkgutil.iter_modules(service.__path__):  # every module, new ones included
            importlib.import_module("service." + module.name)
        from service.api.app import create_app
        from service.api.config import Settings

        async def main():
            app = create_app(Settings(model_dir={str(tiny_bundle)!r}, device="cpu", intra_op_threads=1))
            async with app.router.lifespan_context(app):
                await asyncio.wait_for(app.state.vqtok.ready.wait(), 60)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    r = await c.post("/v1/encode", json={{"images": []}})
                    assert r.status_code == 422
                    r = await c.post("/v1/sample", json={{"n": 1, "seed": 0}})
                    assert r.status_code == 200, r.text
        asyncio.run(main())
        from service import cli
        cli.build_parser().parse_args(["serve"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
        assert not heavy, heavy
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
