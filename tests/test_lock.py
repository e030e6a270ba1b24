"""The images' lock files (requirements/*.txt) against pyproject.toml.

Offline: every dependency of the service (and of its [cpu] or [gpu] extra, and the build backend) is
pinned with hashes in its lock and the pin satisfies pyproject's specifier; both images share
versions; both Dockerfiles install the locks with --require-hashes. With the package index:
``requirements/lock.py --check`` resolves pyproject again, keeping the locked pins where they are
still allowed, and must reproduce the locks to the letter (it also catches a lock that still pins
what pyproject dropped). Refresh the locks with ``python requirements/lock.py``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
# The images' interpreter and platform, which the locks are resolved for (requirements/lock.py).
TARGET = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)(.*?)$")


def read_lock(text: str) -> dict[str, tuple[str, int]]:
    """{canonical name: (version, number of hashes)} of a hashed requirements file."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), 0)
        elif stripped.startswith("--hash=sha256:") and current is not None:
            pins[current] = (pins[current][0], pins[current][1] + 1)
        elif stripped and not stripped.startswith("#") and not line.startswith(" "):
            raise AssertionError(f"not a pin: {line!r}")
    return pins


def problems(requirements: list[str], pins: dict[str, tuple[str, int]]) -> list[str]:
    """What a lock gets wrong about a list of pyproject requirements (empty when it agrees)."""
    found = []
    for spec in requirements:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({**TARGET, "extra": ""}):
            continue  # not for the images' platform
        name = canonicalize_name(req.name)
        if name not in pins:
            found.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            found.append(f"{req.name}=={pins[name][0]} does not satisfy {spec}")
    found += [f"{name}=={version} has no hashes" for name, (version, hashes) in pins.items() if not hashes]
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("lock,extra", [("service-cpu.txt", "cpu"), ("service-gpu.txt", "gpu")])
def test_each_lock_pins_every_service_dependency_with_hashes(lock, extra):
    project = pyproject()["project"]
    wanted = project["dependencies"] + project["optional-dependencies"][extra]
    assert problems(wanted, read_lock((LOCKS / lock).read_text())) == []


def test_the_build_lock_pins_the_build_backend():
    wanted = pyproject()["build-system"]["requires"]
    assert problems(wanted, read_lock((LOCKS / "build.txt").read_text())) == []


def test_the_offline_check_catches_a_missing_or_stale_pin():
    pins = read_lock((LOCKS / "service-cpu.txt").read_text())
    assert problems(["numpy>=1.26"], pins) == []
    assert problems(["not-a-dependency-yet>=1"], pins) == ["not-a-dependency-yet is not in the lock"]
    locked = pins["numpy"][0]
    assert problems([f"numpy>{locked}"], pins) == [f"numpy=={locked} does not satisfy numpy>{locked}"]
    assert problems(["pywin32>=300; sys_platform == 'win32'"], pins) == []  # not the images' platform


def test_the_cpu_and_gpu_images_get_the_same_versions_of_what_they_share():
    cpu, gpu = (read_lock((LOCKS / name).read_text()) for name in ("service-cpu.txt", "service-gpu.txt"))
    shared = set(cpu) & set(gpu)
    assert {"numpy", "fastapi", "uvicorn", "pillow"} <= shared
    assert {n: (cpu[n][0], gpu[n][0]) for n in shared if cpu[n][0] != gpu[n][0]} == {}
    assert "onnxruntime" in cpu and "onnxruntime" not in gpu and "onnxruntime-gpu" in gpu


@pytest.mark.parametrize("dockerfile,lock", [("Dockerfile", "service-cpu.txt"), ("Dockerfile.gpu", "service-gpu.txt")])
def test_the_dockerfiles_install_only_the_locks_with_hashes(dockerfile, lock):
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    installs = [line for line in re.findall(r"^RUN (.*)$", text, re.MULTILINE) if "pip install" in line]
    assert f"COPY requirements/{lock} /tmp/requirements.txt" in text
    assert any("--require-hashes --no-deps -r /tmp/requirements.txt" in line for line in installs)
    assert any("--require-hashes --no-deps -r requirements/build.txt" in line for line in installs)
    # Anything else pip installs is vqtok's own wheel, without dependencies: nothing unlocked.
    for line in installs:
        for cmd in re.findall(r"pip install ([^&]*)", line):
            assert "--require-hashes" in cmd or cmd.split() == ["--no-deps", "/tmp/wheels/*.whl"], cmd


@pytest.fixture(scope="module")
def uv():
    if shutil.which("uv") is None:
        try:
            import uv  # noqa: F401
        except ImportError:
            pytest.fail("uv is missing: it comes with the dev extra (pip install -e '.[dev]')")


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCKS / "lock.py"), "--check", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)


def test_the_locks_are_what_pyproject_resolves_to(uv):
    result = _check()
    assert result.returncode == 0, (f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}\n"
                                    "refresh them: python requirements/lock.py")


def test_the_resolving_check_fails_when_pyproject_adds_a_dependency(uv, tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    edited = text.replace('dependencies = [\n', 'dependencies = [\n    "six>=1.16",\n', 1)
    assert edited != text
    (tmp_path / "pyproject.toml").write_text(edited)
    result = _check("--pyproject", str(tmp_path / "pyproject.toml"))
    assert result.returncode == 1 and "+six==" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
