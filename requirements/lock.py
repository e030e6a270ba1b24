"""Writes (or, with --check, verifies) the images' lock files from pyproject.toml with uv.

    python requirements/lock.py            # refresh the locks after editing pyproject.toml
    python requirements/lock.py --upgrade  # also move every pin to the newest release allowed
    python requirements/lock.py --check    # exit 1, with a diff, if a lock is not what pyproject gives

- requirements/service-cpu.txt: the service's dependencies plus the [cpu] extra (Dockerfile);
- requirements/service-gpu.txt: the same plus the [gpu] extra, resolved with service-cpu.txt as a
  constraint so that both images serve the same versions of every package they share
  (Dockerfile.gpu);
- requirements/build.txt: pyproject's [build-system] requires (the wheel of vqtok itself is built
  with these in the images' build stage).

Every pin carries its hashes (pip install --require-hashes). The target is the images' Python:
CPython 3.11 on x86_64 Linux (glibc 2.28 or newer). uv keeps the pins already in a lock unless
pyproject.toml no longer allows them or --upgrade is given, so a refresh after an edit moves only
what the edit needs. uv comes from PyPI (the dev extra installs it); resolving needs the package
index, nothing else.
"""
from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
COMMAND = "python requirements/lock.py"
# (lock file, pyproject extras, lock used as a constraint)
LOCKS = (("service-cpu.txt", ("cpu",), None), ("service-gpu.txt", ("gpu",), "service-cpu.txt"))
BUILD_LOCK = "build.txt"


def uv_bin() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except ImportError:
        found = shutil.which("uv")
        if not found:
            raise SystemExit("uv is missing: pip install uv (it is in the dev extra)") from None
        return found


def compile_lock(sources: list[Path], out: Path, extras: tuple[str, ...], constraint: Path | None,
                 upgrade: bool, cwd: Path) -> None:
    cmd = [uv_bin(), "pip", "compile", "--quiet", *map(str, sources), "--output-file", str(out),
           "--generate-hashes", "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
           "--custom-compile-command", COMMAND, "--no-progress"]
    cmd += [a for e in extras for a in ("--extra", e)]
    if constraint is not None:
        cmd += ["--constraint", str(constraint)]
    if upgrade:
        cmd.append("--upgrade")
    subprocess.run(cmd, cwd=cwd, check=True)


def write_locks(dest: Path, pyproject: Path, upgrade: bool = False) -> None:
    """Write every lock into ``dest``; locks already there are uv's preferences."""
    # A relative path, so that the "# via" comments say pyproject.toml wherever it is.
    for name, extras, constraint in LOCKS:
        compile_lock([Path(pyproject.name)], dest / name, extras, dest / constraint if constraint else None,
                     upgrade, pyproject.parent)
    build = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "build-system.in"
        source.write_text("\n".join(build) + "\n")
        compile_lock([source], dest / BUILD_LOCK, (), None, upgrade, pyproject.parent)
        # Comments name the inputs by path: say what they are wherever the locks were written.
        for name in [n for n, _, _ in LOCKS] + [BUILD_LOCK]:
            text = (dest / name).read_text().replace(f"-r {source}", "pyproject.toml [build-system] requires")
            (dest / name).write_text(text.replace(f"{dest}/", "requirements/"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    p.add_argument("--upgrade", action="store_true", help="newest allowed versions, not the locked ones")
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml", help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    names = [name for name, _, _ in LOCKS] + [BUILD_LOCK]
    if not args.check:
        write_locks(HERE, args.pyproject.resolve(), upgrade=args.upgrade)
        print("wrote " + ", ".join(f"requirements/{n}" for n in names))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp)
        for name in names:  # the current locks are the preferences: only a disagreement changes a pin
            if (HERE / name).exists():
                shutil.copy(HERE / name, dest / name)
        write_locks(dest, args.pyproject.resolve())
        stale = False
        for name in names:
            old = (HERE / name).read_text().splitlines(keepends=True) if (HERE / name).exists() else []
            new = (dest / name).read_text().splitlines(keepends=True)
            if old != new:
                stale = True
                sys.stdout.writelines(difflib.unified_diff(old, new, f"requirements/{name}", f"{name} (from pyproject)"))
    if stale:
        print(f"\nthe locks disagree with pyproject.toml: run {COMMAND} and commit requirements/", file=sys.stderr)
        return 1
    print("the locks agree with pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
