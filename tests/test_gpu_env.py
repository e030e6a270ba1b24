"""The GPU image, as far as a machine without a GPU can check it: Dockerfile.gpu lints clean and
copies what exists, the compose `gpu` profile reserves a device and checks health, and the image's
Python environment (the [gpu] extra) resolves in a fresh venv for the image's Python.

Set VQTOK_GPU_ENV_INSTALL=1 to go one step further: install onnxruntime-gpu into the venv and
import it (it imports without a GPU and lists the CUDA provider); that downloads ~255 MB.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint comes with the [dev] extra")
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_lint_clean(name):
    result = subprocess.run(["hadolint", str(ROOT / name)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_dockerfile_installs_the_gpu_extra_and_requires_cuda():
    text = (ROOT / "Dockerfile.gpu").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):  # not from a build stage
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile.gpu copies {src}, which is not in the repository"
    # The [gpu] extra's lock (tests/test_lock.py checks it against pyproject.toml).
    assert "requirements/service-gpu.txt" in text and "VQTOK_DEVICE=cuda" in text and "HEALTHCHECK" in text
    assert "requirements/service-cpu.txt" in (ROOT / "Dockerfile").read_text()  # the CPU image stays on the CPU runtime


def test_compose_gpu_profile_reserves_a_device_and_checks_health():
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = services["vqtok-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/readyz" in " ".join(gpu["healthcheck"]["test"])
    assert gpu["shm_size"]  # the workers' shared-memory slabs outgrow Docker's 64 MiB default
    cpu = services["vqtok"]
    assert "profiles" not in cpu and cpu["build"] == "."  # `docker compose up` is the CPU image as before
    assert {p.split(":")[0] for p in gpu["ports"]}.isdisjoint({p.split(":")[0] for p in cpu["ports"]})


def _gpu_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("gpu-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    return env


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=600, check=False)


def test_gpu_extra_resolves_in_a_fresh_venv(venv, tmp_path):
    """What `pip install .[gpu]` in Dockerfile.gpu would install: resolved, not downloaded."""
    report = tmp_path / "report.json"
    result = _pip(venv, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                  *_gpu_requirements())
    if result.returncode != 0 and re.search(r"NewConnectionError|Temporary failure|Network is unreachable",
                                            result.stderr):
        pytest.skip("no package registry reachable from here")
    assert result.returncode == 0, result.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "nvidia-ml-py" in names
    assert "onnxruntime" not in names  # the CPU runtime would shadow the GPU one
    assert any(n.startswith("nvidia-cudnn") for n in names), names
    assert any(n.startswith("nvidia-cuda-runtime") for n in names), names


@pytest.mark.skipif(os.environ.get("VQTOK_GPU_ENV_INSTALL") != "1", reason="downloads ~255 MB; set VQTOK_GPU_ENV_INSTALL=1")
def test_onnxruntime_gpu_installs_and_imports_without_a_gpu(venv):
    ort_req = next(r for r in _gpu_requirements() if r.startswith("onnxruntime-gpu")).replace("[cuda,cudnn]", "")
    result = _pip(venv, "install", "--quiet", ort_req, "nvidia-ml-py")  # without the CUDA wheels (GBs)
    assert result.returncode == 0, result.stderr[-2000:]
    probe = ("import onnxruntime as o, json; print(json.dumps({'providers': o.get_available_providers(), "
             "'preload': hasattr(o, 'preload_dlls')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert "CUDAExecutionProvider" in info["providers"] and info["preload"]
