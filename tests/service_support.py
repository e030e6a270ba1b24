"""Helpers for the service tests: an in-process app behind httpx's ASGI transport, a real
``vqtok serve`` subprocess on a loopback port, and images in every format the API takes."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.api.app import create_app
from service.api.config import Settings
from service.bundle import MANIFEST, Bundle, prior_graph

ROOT = Path(__file__).resolve().parent.parent


def settings_for(bundle_dir: Path, **overrides) -> Settings:
    # Explicit values beat any VQTOK_* variables the test runner happens to have.
    base = {"model_dir": bundle_dir, "device": "cpu", "intra_op_threads": 1, "max_delay_ms": 2.0, "api_keys": []}
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def serving(bundle_dir: Path, backend=None, **overrides):
    """Yields (app, AsyncClient) with the lifespan running and the warm-up done."""
    settings = settings_for(bundle_dir, **overrides)
    app = create_app(settings, bundle=Bundle.load(bundle_dir), backend=backend)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.vqtok.ready.wait(), 60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


async def eventually(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail (instead of hanging the suite) after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def run(coro):
    return asyncio.run(coro)


def png_bytes(pixels: np.ndarray | Image.Image, **save) -> bytes:
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    im.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def image_files(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"im{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in Prometheus text format whose labels include ``labels``
    (0 if none): ``op="sample"`` adds up every loaded model's series."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        if "{" in key:
            metric, rest = key.split("{", 1)
            got = set(rest.rstrip("}").split(","))
        else:
            metric, got = key, set()
        if metric == name and want <= got:
            total += float(value)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(bundle_dir: Path, env: dict[str, str] | None = None, ready_timeout: float = 60,
                  args: tuple[str, ...] = ()):
    """A ``python -m service.cli serve`` subprocess; yields (process, base_url) once /readyz is 200.
    ``args``: more ``vqtok serve`` arguments (``--model``, ``--models``)."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VQTOK_")}
    full_env.update({"VQTOK_DEVICE": "cpu", "VQTOK_INTRA_OP_THREADS": "1", "VQTOK_LOG_LEVEL": "warning",
                     "PYTHONPATH": str(ROOT), **(env or {})})
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a file, not a pipe: a chatty server never blocks
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(bundle_dir), *args,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=full_env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{read_log(proc)}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready:\n{read_log(proc)}")
            time.sleep(0.1)
        yield proc, base_url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def read_log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def without_priors(bundle_dir: Path, out: Path) -> Path:
    """A copy of a bundle without its priors: it encodes and decodes, but cannot sample or score."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    drop = {prior_graph(level["name"]) for level in manifest["levels"]}
    drop |= {info[k] for info in manifest.pop("sampling", {}).values() for k in ("row", "pixel", "cond") if info.get(k)}
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in drop}
    out.mkdir(parents=True)
    for entry in manifest["files"].values():
        shutil.copy(bundle_dir / entry["path"], out / entry["path"])
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out
