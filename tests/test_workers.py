"""The workers layout (VQTOK_WORKERS > 1): front-end processes and one engine process sharing
tensors through shared memory. End to end on CPU with 2 workers, plus the slab allocator alone."""
from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TINY_SIZE, export_tiny_bundle, random_images
from PIL import Image
from service_support import image_files, metric_value, png_bytes, read_log, serve_process

from service.bundle import Bundle
from service.bundle.sampling import noise_for
from service.engine.shm import ALIGN, Slab, layout
from service.runtime.backend import OrtBackend
from service.runtime.session import RuntimeConfig


def test_slab_allocates_first_fit_and_merges_freed_regions():
    slab = Slab.create(8 * ALIGN)
    try:
        a, b, c = slab.alloc(ALIGN), slab.alloc(2 * ALIGN - 5), slab.alloc(ALIGN)
        assert (a, b, c) == (0, ALIGN, 3 * ALIGN)  # sizes round up to ALIGN
        assert slab.alloc(5 * ALIGN) is None and slab.free_bytes == 4 * ALIGN
        slab.free(b)
        assert slab.alloc(3 * ALIGN) == 4 * ALIGN  # the 2-line hole is too small: first fit after c
        slab.free(a)
        slab.free(c)  # a, b and c's regions merge into one free run at the start
        assert slab.alloc(4 * ALIGN) == 0
        specs, nbytes = layout([((2, 3), "<i8"), ((5,), "|u1")], start=ALIGN)
        assert specs == [(ALIGN, (2, 3), "<i8"), (2 * ALIGN, (5,), "|u1")] and nbytes == 2 * ALIGN
        view = slab.view(specs[0])
        view[...] = np.arange(6).reshape(2, 3)
        other = Slab.open(slab.name)  # another mapping of the same memory sees the same numbers
        assert (other.view(specs[0]) == np.arange(6).reshape(2, 3)).all()
        del view
        other.close()
    finally:
        slab.close()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _all_ready(url: str, timeout: float = 60.0) -> None:
    """serve_process saw one front end ready; on a busy machine the other may still be starting (and
    answer 503 until it has connected to the engine). Fresh connections land on either of them."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 20:
        assert time.monotonic() < deadline, "not every front end became ready"
        streak = streak + 1 if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 else 0


def _segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return OrtBackend(Bundle.load(tiny_bundle), RuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory):
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-b", seed=1)


def test_two_workers_and_an_engine_answer_like_one_process(tiny_bundle, bundle_b, reference):
    images = random_images(4, seed=21)
    before = _segments()
    env = {"VQTOK_WORKERS": "2", "VQTOK_QUEUE_LIMIT": "4", "VQTOK_EXTRA_MODELS": f"b={bundle_b}",
           "VQTOK_ADMIN_KEY": "admin"}
    with serve_process(tiny_bundle, env=env) as (proc, url):
        _all_ready(url)
        # The parent, two front ends and the engine (plus multiprocessing's resource tracker).
        spawned = [c for c in _children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]
        assert len(spawned) == 3, spawned
        with httpx.Client(base_url=url, timeout=60) as c:
            info = c.get("/v1/model").json()
            assert info["provider"] == "CPUExecutionProvider" and info["gpu"] is None
            r = c.post("/v1/encode", files=image_files([png_bytes(im) for im in images]))
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            want = reference.encode(images)
            for i, item in enumerate(items):
                assert (np.array(item["top"]) == want["top"][i]).all()
                assert (np.array(item["bottom"]) == want["bottom"][i]).all()
            # Decode through the engine gives the reference decoder's pixels (PNG is lossless).
            r = c.post("/v1/decode", json={"items": [{"top": it["top"], "bottom": it["bottom"]} for it in items[:2]]})
            assert r.status_code == 200, r.text
            got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]])
            assert (got == reference.decode({k: v[:2] for k, v in want.items()})).all()
            # Sampling: same seed, same codes as the backend run directly.
            r = c.post("/v1/sample", json={"n": 2, "seed": 7, "return_codes": True})
            assert r.status_code == 200, r.text
            direct = reference.sample(noise_for(reference.bundle, 7, 2), np.ones(2, np.float32), np.zeros(2, np.int64))
            for i, codes in enumerate(r.json()["codes"]):
                assert (np.array(codes["top"]) == direct["top"][i]).all()
            # A bad image is a 400 for its request only, while others go on being answered.
            with ThreadPoolExecutor(4) as pool:
                bad = pool.submit(c.post, "/v1/encode", files=image_files([b"not an image"]))
                good = [pool.submit(c.post, "/v1/encode", files=image_files([png_bytes(images[k])])) for k in range(3)]
                assert bad.result().status_code == 400 and bad.result().json()["error"]["code"]
                assert [g.result().status_code for g in good] == [200] * 3, [g.result().text for g in good]
            # An error the engine raises reaches the client with its status and code.
            r = c.post("/v1/encode", files=image_files([png_bytes(images[k % 4]) for k in range(5)]))
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_items", r.text
            assert "queue holds at most 4" in r.json()["error"]["message"]
            # fit=none at a size of its own travels through shared memory too.
            wide = random_images(1, size=TINY_SIZE + 8, seed=4)
            r = c.post("/v1/encode", params={"fit": "none"}, files=image_files([png_bytes(wide[0])]))
            assert r.status_code == 200 and len(r.json()["items"][0]["bottom"]) == (TINY_SIZE + 8) // 4
            # The engine process holds the second bundle too: its codes, its version, and its tag checked.
            b = OrtBackend(Bundle.load(bundle_b), RuntimeConfig(device="cpu", intra_op_threads=1))
            assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["tiny", "b"]
            r = c.post("/v1/encode", params={"model": "b"}, files=image_files([png_bytes(images[0])]))
            assert r.status_code == 200 and r.json()["version"] == Bundle.load(bundle_b).version_id(), r.text
            assert (np.array(r.json()["items"][0]["top"]) == b.encode(images[:1])["top"][0]).all()
            tagged = {k: r.json()["items"][0][k] for k in ("top", "bottom", "version")}
            assert c.post("/v1/decode", params={"model": "tiny"}, json={"items": [tagged]}).status_code == 409
            assert c.post("/v1/decode", json={"items": [tagged]}).status_code == 200
            # Loading at run time is the one-process layout's: here a restart (501 says so).
            r = c.post("/admin/models", json={"path": str(bundle_b)}, headers={"Authorization": "Bearer admin"})
            assert r.status_code == 501, r.text
            # The engine's batch metrics show on a front end's /metrics, next to its own request counts.
            text = c.get("/metrics").text
            assert metric_value(text, "vqtok_batch_size_count", op="encode") >= 2
            assert "vqtok_requests_total" in text
        slabs = _segments() - before
        assert len(slabs) >= 2  # one slab per front end (other processes may make segments too)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, read_log(proc)
        for pid in spawned:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not slabs & _segments(), "shared memory left behind"


def test_workers_setting_is_auto_by_device(monkeypatch):
    from service.api.config import Settings
    from service.runtime.session import CPU, CUDA

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    s = Settings(workers=0, api_keys=[])
    assert s.workers_for(CPU) == 1 and s.workers_for(CUDA) == 14
    assert Settings(workers=3, api_keys=[]).workers_for(CPU) == 3
