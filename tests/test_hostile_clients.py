"""Hostile clients against a real ``vqtok serve`` (issue 10, items 5 and 8): a stalled body gets 408
within the request timeout, bodies held at once and connections are capped, and SIGTERM or SIGINT end the
process even with a batch stuck in the backend."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import random_images
from service_support import ROOT, free_port, metric_value, png_bytes, serve_process

BOUNDARY = "b0undary"
PREFIX = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
          "Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n"


def _stalled(port: int, promised: int = 100_000) -> socket.socket:
    """A connection whose headers promise ``promised`` bytes, then send a multipart prefix, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall((f"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                  f"Content-Length: {promised}\r\n\r\n").encode() + PREFIX)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the one response on ``sock`` (read until the server closes or has sent it all)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
                  None)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def test_slow_bodies_many_connections_and_bytes_in_flight(tiny_bundle):
    env = {"VQTOK_REQUEST_TIMEOUT_S": "3", "VQTOK_MAX_CONNECTIONS": "4", "VQTOK_MAX_BYTES_IN_FLIGHT": "250000"}
    good = png_bytes(random_images(1)[0])
    with serve_process(tiny_bundle, env=env) as (_proc, url):
        port = int(url.rsplit(":", 1)[1])
        start = time.monotonic()
        s1, s2 = _stalled(port), _stalled(port)
        time.sleep(0.3)  # both are in the app, holding what they promised
        # A third promise of 100 kB would take the bytes in flight past 250 kB: refused at once.
        with _stalled(port) as s3:
            status, body = _answer(s3)
            assert status == 503 and json.loads(body)["error"]["code"] == "overloaded"
        # Connections: two stalled plus an idle one fill the cap of 4 with the next request's own.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:
            time.sleep(0.2)
            r = httpx.post(f"{url}/v1/encode", files=[("images", ("a.png", good, "image/png"))], timeout=10)
            assert r.status_code == 503
            idle.close()
        # The stalled bodies get 408 once the request timeout (3 s) has passed, not never.
        for sock in (s1, s2):
            status, body = _answer(sock)
            assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
            sock.close()
        assert time.monotonic() - start < 15
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/encode", files=[("images", ("a.png", good, "image/png"))], timeout=10)
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "vqtok_requests_total", endpoint="/v1/encode", status="408") == 2
        assert metric_value(metrics, "vqtok_requests_total", endpoint="/v1/encode", status="500") == 0


HANGING_SERVER = """
import sys, threading
from service.api import server

real = server.load_backend

def hanging(bundle, settings):
    backend = real(bundle, settings)
    encode = backend.encode

    def stuck_on_64(images):
        if images.shape[1] == 64:  # a fit=none 64x64 image never comes back
            threading.Event().wait()
        return encode(images)

    backend.encode = stuck_on_64
    return backend

server.load_backend = hanging
sys.exit(server.serve(sys.argv[1], "127.0.0.1", int(sys.argv[2])))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_never_hangs_on_a_stuck_worker_thread(tiny_bundle, sig):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQTOK_")}
    env.update({"VQTOK_DEVICE": "cpu", "VQTOK_INTRA_OP_THREADS": "1", "VQTOK_REQUEST_TIMEOUT_S": "1",
                "VQTOK_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)})
    with subprocess.Popen([sys.executable, "-c", HANGING_SERVER, str(tiny_bundle), str(port)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            native = png_bytes(np.full((64, 64, 3), 7, np.uint8))
            r = httpx.post(f"{url}/v1/encode", params={"fit": "none"},
                           files=[("images", ("a.png", native, "image/png"))], timeout=10)
            assert r.status_code == 504  # the batch is stuck in the backend for good
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=30)  # without the fix: waits for the stuck thread forever
        finally:
            if proc.poll() is None:
                proc.kill()
    if sig == signal.SIGTERM:  # uvicorn re-raises SIGTERM once shut down: its default action ends the process
        assert proc.returncode == -signal.SIGTERM, out
    else:  # SIGINT comes back as KeyboardInterrupt; the stuck thread would then hold up the interpreter's exit
        assert proc.returncode == 130 and "worker threads still busy: vqtok-encode" in out, out


def test_the_malloc_bounds_are_applied_on_glibc():
    # What keeps the soak's RSS flat (bench/soak.py: RSS +44 % over 60 s with glibc's defaults, +3 % with these); here only
    # that glibc accepts them (mallopt returns 1) and that 0 leaves glibc's default alone.
    import platform

    from service.api.config import Settings
    from service.engine.host import bound_malloc

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert bound_malloc(Settings().malloc_arena_max, Settings().malloc_mmap_threshold) is True
    assert bound_malloc(0, 0) is True
