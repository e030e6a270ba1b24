"""podman for the container tests and bench/images.py: the shared tools' wrapper and base image,
images built from this tree, and containers on a published loopback port.

There is no Docker engine on these machines. ``../shared/tools/containers/`` (beside the checkout)
holds ``podman.sh``, which runs podman with the settings they need, and ``base-image.sh``, which
builds a local stand-in for ``python:3.11-slim`` from Debian's packages so that the Dockerfiles'
``FROM`` pulls nothing. ``VQTOK_CONTAINER_TOOLS`` names another folder with the same two scripts.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("VQTOK_CONTAINER_TOOLS", ROOT.parent / "shared" / "tools" / "containers"))
BASE_IMAGE = "docker.io/library/python:3.11-slim"


def podman_unavailable() -> str | None:
    """Why podman cannot run here (None when it can). Installs it first where that is possible."""
    if not (TOOLS / "podman.sh").exists():
        return f"the shared container tools are missing ({TOOLS}/podman.sh)"
    if shutil.which("podman") is None:
        if os.geteuid() != 0:
            return "podman is not installed, and installing it (apt-get) needs root"
        ensure_base()  # installs podman, runc and debootstrap, then builds the base image
    probe = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-500:]}"
    return None


def ensure_base() -> None:
    """The python:3.11-slim stand-in (a no-op when it is there; about 1.5 min the first time)."""
    if shutil.which("podman") and podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    subprocess.run(["bash", str(TOOLS / "base-image.sh")], check=True, timeout=900, capture_output=True, text=True)


def podman(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the wrapper; text output captured. Raises with podman's stderr when ``check`` fails."""
    proc = subprocess.run(["bash", str(TOOLS / "podman.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def compose(*args: str, project: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """podman-compose on this tree's docker-compose.yml, through the wrapper."""
    cmd = [shutil.which("podman-compose") or "podman-compose", "--podman-path", str(TOOLS / "podman.sh"),
           "-p", project, "-f", str(ROOT / "docker-compose.yml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def build(tag: str, dockerfile: str = "Dockerfile", context: Path = ROOT, timeout: float = 900,
          no_cache: bool = False) -> float:
    """Build an image (Docker format, so that HEALTHCHECK is kept); returns the seconds it took."""
    t0 = time.monotonic()
    podman("build", "--format", "docker", "--network", "host", *(["--no-cache"] if no_cache else []),
           "-f", str(context / dockerfile), "-t", tag, str(context), timeout=timeout)
    return time.monotonic() - t0


def inspect(kind: str, name: str) -> dict:
    return json.loads(podman(kind, "inspect", name).stdout)[0]


def image_size(tag: str) -> int:
    """Uncompressed bytes of the image, all layers, as ``podman images`` counts them."""
    return int(inspect("image", tag)["Size"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def wait_ready(url: str, name: str | None = None, timeout: float = 120) -> float:
    """Poll ``url``/readyz until it answers 200; returns the seconds waited. Fails with the
    container's log when it exits or never gets ready."""
    t0 = time.monotonic()
    while http_status(f"{url}/readyz", timeout=1) != 200:
        if name is not None and not inspect("container", name)["State"]["Running"]:
            raise RuntimeError(f"container {name} exited:\n{logs(name)}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{url} never got ready" + (f":\n{logs(name)}" if name else ""))
        time.sleep(0.05)
    return time.monotonic() - t0


def logs(name: str) -> str:
    out = podman("logs", name, check=False)
    return (out.stdout + out.stderr)[-4000:]


@contextmanager
def running(image: str, name: str, env: dict[str, str] | None = None, ready: bool = True,
            extra: tuple[str, ...] = ()):
    """A container of ``image`` with port 8000 published on a free loopback port; yields its base
    URL (once /readyz is 200 unless ``ready`` is False). Removed afterwards."""
    port = free_port()
    podman("rm", "-f", name, check=False)
    env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", *env_args, *extra, image)
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url, name)
        yield url
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
