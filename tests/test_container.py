"""The CPU image and docker-compose.yml, built and run with podman (there is no Docker engine here).

One build of ``Dockerfile`` from this tree serves every check: encode, decode and sample through a
published port; the HEALTHCHECK; a non-root user and no torch, training/ or models/ inside; a
graceful SIGTERM; compose's CPU service up and down; the gpu profile's config. podman comes from
the shared container tools (tests/container_support.py); the module skips, saying why, only where
podman cannot run at all.

The HEALTHCHECK is run with ``podman healthcheck run``: podman schedules health checks through
systemd, which these machines lack, so nothing would run it on its own.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
from conftest import random_images
from container_support import ROOT, compose, free_port, inspect, logs, podman, podman_unavailable, running, wait_ready

pytestmark = pytest.mark.timeout(900)  # the first test also builds the base and the image (minutes, cold)

IMAGE = "localhost/vqtok:test"
BUNDLE_NAME = json.loads((ROOT / "artifacts" / "default" / "manifest.json").read_text())["name"]


@pytest.fixture(scope="module")
def image() -> str:
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    from container_support import build, ensure_base

    ensure_base()
    build(IMAGE)
    return IMAGE


@pytest.fixture(scope="module")
def served(image):
    """One container of the image, on a free loopback port; yields (name, base URL)."""
    name = f"vqtok-test-{os.getpid()}"
    with running(image, name) as url:
        yield name, url


def test_the_image_serves_encode_decode_and_sample_through_a_published_port(served):
    from service.client import Client

    _, url = served
    with Client(url, timeout=120) as c:
        info = c.model()
        assert info["name"] == BUNDLE_NAME and info["provider"] == "CPUExecutionProvider"
        size = info["image_size"]
        pixels = random_images(2, size=size, seed=4)
        codes = c.encode(list(pixels))
        assert len(codes) == 2 and all(level.ndim == 2 for code in codes for level in code.values())
        decoded = c.decode(codes)
        assert [im.size for im in decoded] == [(size, size)] * 2
        samples = c.sample(2, seed=5, return_codes=True)
        assert len(samples.images) == 2 and samples.images[0].size == (size, size)
        # A sample's codes decode to its image: the same sessions behind both endpoints.
        assert np.array_equal(np.asarray(c.decode(samples.codes[:1])[0]), np.asarray(samples.images[0]))


def test_the_healthcheck_reports_healthy(served):
    name, _ = served
    config = inspect("container", name)["Config"]["Healthcheck"]
    assert "/readyz" in " ".join(config["Test"])  # kept because the image is built in Docker format
    result = podman("healthcheck", "run", name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr + logs(name)
    state = inspect("container", name)["State"]
    health = state.get("Health") or state.get("Healthcheck")  # podman renamed the key in 4.x
    assert health["Status"] == "healthy", health


def test_the_image_runs_as_non_root_and_holds_no_torch_training_or_models(served):
    name, _ = served
    assert inspect("image", IMAGE)["Config"]["User"] == "10001"
    server_uids = podman("exec", name, "sh", "-c", "grep ^Uid: /proc/1/status").stdout.split()[1:]
    assert server_uids and all(uid == "10001" for uid in server_uids)  # the server process itself
    probe = ("import importlib.util as u, json, os, subprocess, sys;"
             "print(json.dumps({'specs': {m: u.find_spec(m) is not None for m in ('torch', 'training', 'models')},"
             " 'dirs': sorted(p for p in sys.path if p and any(os.path.isdir(os.path.join(p, m))"
             " for m in ('torch', 'training', 'models'))),"
             " 'app': sorted(os.listdir('/app')),"
             " 'pip': subprocess.run([sys.executable, '-m', 'pip', 'list', '--format', 'json'],"
             " capture_output=True, text=True).stdout}))")
    found = json.loads(podman("exec", name, "python", "-c", probe).stdout)
    assert found["specs"] == {"torch": False, "training": False, "models": False}, found
    assert found["dirs"] == [] and found["app"] == ["artifacts"], found
    installed = {p["name"].lower() for p in json.loads(found["pip"])}
    assert "vqtok" in installed and not {n for n in installed if n.startswith("torch")}, installed


def test_sigterm_finishes_requests_in_flight_and_exits_0_within_the_graceful_timeout(image):
    from service_support import metric_value

    from service.client import AsyncClient

    graceful = 30
    name = f"vqtok-test-term-{os.getpid()}"
    # A long batching delay keeps the requests queued when the signal arrives.
    env = {"VQTOK_MAX_DELAY_MS": "2000", "VQTOK_MAX_BATCH": "64", "VQTOK_GRACEFUL_TIMEOUT_S": str(graceful)}
    with running(image, name, env=env) as url:
        stopped: dict = {}

        def stop() -> None:  # SIGTERM, then SIGKILL only if the server outlives the graceful timeout
            stopped["result"] = podman("stop", "-t", str(graceful), name, check=False, timeout=graceful + 60)

        async def load():
            async with AsyncClient(url, timeout=120) as ac:
                pixels = random_images(3, size=64, seed=7)
                tasks = [asyncio.ensure_future(ac.sample(1, seed=i)) for i in range(3)]
                tasks += [asyncio.ensure_future(ac.encode(p)) for p in pixels]
                for _ in range(400):  # until the server has queued every request
                    await asyncio.sleep(0.02)
                    metrics = (await ac._http.get("/metrics")).text
                    if (metric_value(metrics, "vqtok_queue_depth", op="sample") == 3
                            and metric_value(metrics, "vqtok_queue_depth", op="encode") == 3):
                        break
                else:
                    pytest.fail(f"the requests never queued:\n{metrics[-2000:]}")
                stopper = threading.Thread(target=stop)
                stopper.start()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.to_thread(stopper.join)
                return results

        results = asyncio.run(load())
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert stopped["result"].returncode == 0, stopped["result"].stderr
        state = inspect("container", name)["State"]
        # 0, not 137: the server exited by itself before `podman stop` gave up waiting and killed it.
        assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False), logs(name)
        assert "Application shutdown complete" in logs(name)


@pytest.fixture(scope="module")
def compose_available():
    if shutil.which("podman-compose") is None:
        pytest.fail("podman-compose is missing: it comes with the dev extra (pip install -e '.[dev]')")


def test_compose_brings_the_cpu_service_up_and_down(image, compose_available):
    project = f"vqtoktest{os.getpid()}"
    port = free_port()
    env = {"VQTOK_PORT": str(port)}
    podman("tag", image, "vqtok:latest")  # compose's image for the CPU service: this build, no rebuild
    try:
        compose("up", "-d", "--no-build", "vqtok", project=project, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=120)
        except RuntimeError as e:
            out = compose("logs", project=project, env=env, check=False)
            raise AssertionError(f"{e}\n{out.stdout[-3000:]}{out.stderr[-2000:]}") from None
        from service.client import Client

        with Client(url) as c:
            assert c.ready() and c.model()["name"] == BUNDLE_NAME
    finally:
        compose("down", project=project, env=env, check=False, timeout=240)
    left = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}", "--format", "{{.Names}}")
    assert left.stdout.strip() == ""


def _dockerfile_healthcheck(name: str) -> tuple[dict[str, str], list[str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    options, command = re.search(r"^HEALTHCHECK (.*?)CMD (\[.*\])$", text, re.MULTILINE).groups()
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), json.loads(command)


def test_compose_gpu_profile_config_builds_dockerfile_gpu_and_checks_health(image, compose_available):
    yaml = pytest.importorskip("yaml")  # podman-compose's own dependency
    from service.api.config import Settings

    plain = yaml.safe_load(compose("config", project="vqtokconfig").stdout)["services"]
    assert set(plain) == {"vqtok"}  # the GPU service only with its profile
    services = yaml.safe_load(compose("--profile", "gpu", "config", project="vqtokconfig").stdout)["services"]
    gpu = services["vqtok-gpu"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu" and os.path.samefile(gpu["build"]["context"], ROOT)
    assert gpu["image"] == "vqtok:gpu" and gpu["profiles"] == ["gpu"]
    assert gpu["environment"].get("VQTOK_DEVICE") in (None, "cuda")  # the image sets cuda
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    # The compose health check is the image's own: same command, interval, timeout and start period.
    options, command = _dockerfile_healthcheck("Dockerfile.gpu")
    health = gpu["healthcheck"]
    assert health["test"] == ["CMD", *command] and "/readyz" in command[-1]
    assert (health["interval"], health["timeout"], health["start_period"]) == (
        options["interval"], options["timeout"], options["start-period"])
    assert health["retries"] >= 1
    # Both services let SIGTERM's graceful shutdown run its course before the kill.
    graceful = Settings.model_construct().graceful_s
    for svc in (services["vqtok"], gpu):
        assert float(svc["stop_grace_period"].rstrip("s")) > graceful
