"""The output folder of a tokenize job: shards, the error log, the lock, and resuming after a crash.

Every job (HTTP, local, Ray) writes through ``JobOutput``, so they share one format and one set of
guarantees:

- ``OUT/shard-000000.npz`` and on: ``paths`` (relative to DIR), ``height``/``width`` (the source
  image, EXIF orientation applied), one uint16 [n, h, w] grid per level, ``bundle_version`` (the id
  ``/v1/decode`` takes back with the codes) and ``bundle_name`` / ``bundle_sha256``. Numbers are
  zero-padded to 6 digits and sorted as integers, so shard 1,000,000 follows 999,999. With ``parquet=True`` each shard gets a Parquet twin for trainers
  (``service.jobs.parquet``), written before the npz: the npz is the commit mark.
- Shards are written whole: a hidden temporary file, fsync, rename, fsync of the folder.
- ``OUT/errors.jsonl``: one line per refused file (path, status, code, message).
- ``OUT/.lock`` is held (``flock``) for the whole job: two jobs never write one folder.
- Resuming skips every path in a shard or in errors.jsonl. What a crash can leave is repaired
  first: temporary files are removed, a torn last line of errors.jsonl is cut, a shard that does
  not load (empty, truncated) is set aside as ``*.corrupt`` and its images are done again.
- Shards record the bundle; resuming with another bundle is refused (codes of two models must
  never mix in one dataset).
- A failed write (a full disk) stops the job with the original OS error, leaving no partial file.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from service.bundle.wire import to_uint16
from service.jobs.parquet import write_parquet
from service.jobs.records import BundleId, Encoded, write_atomic

log = logging.getLogger("vqtok.jobs")

ERRORS = "errors.jsonl"
LOCK = ".lock"
INDEX_DIGITS = 6
_SHARD = re.compile(r"^shard-(\d+)\.npz$")


class JobAborted(RuntimeError):
    """A failure that is not about one file; the shards written so far stay valid."""


class OutputLocked(JobAborted):
    pass


class BundleMismatch(JobAborted):
    pass


class WriteFailed(JobAborted):
    """Writing to OUT failed (a full disk, say); the message is the OS's, the cause the OSError."""


@dataclass
class JobReport:
    encoded: int = 0
    failed: int = 0  # refused, recorded in errors.jsonl
    skipped: int = 0  # done by an earlier run
    deferred: int = 0  # transient failures, left for a rerun
    shards: int = 0
    set_aside: list[str] = field(default_factory=list)  # corrupt shards found on resume

    def as_json(self, out: Path) -> dict:
        return {"encoded": self.encoded, "refused": self.failed, "already_done": self.skipped,
                "deferred": self.deferred, "shards_written": self.shards, "set_aside": self.set_aside,
                "out": str(out)}


def shard_name(index: int) -> str:
    return f"shard-{index:0{INDEX_DIGITS}d}.npz"


def shard_files(out: Path) -> list[Path]:
    """Complete shards in numeric order (any number of digits: older 5-digit names included)."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _SHARD.match(p.name))]
    return [p for _, p in sorted(found)]


def _read_shard(path: Path, full: bool) -> tuple[list[str], BundleId | None]:
    """A shard's paths and bundle; ``full`` also reads (and so CRC-checks) every array."""
    with np.load(path, allow_pickle=False) as data:
        paths = [str(p) for p in data["paths"]]
        bundle = (BundleId(str(data["bundle_name"]), str(data["bundle_sha256"]))
                  if "bundle_sha256" in data.files else None)
        if full:
            for key in data.files:
                data[key]
    return paths, bundle


class ErrorLog:
    """``errors.jsonl``, append-only; every line is flushed so a rerun can trust it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def add(self, path: str, status: int, code: str, message: str) -> None:
        try:
            self.file.write(json.dumps({"path": path, "status": status, "code": code, "message": message}) + "\n")
            self.file.flush()
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e}") from e

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the failed flush was reported already
            pass


def read_errors(path: Path) -> set[str]:
    """Paths recorded in errors.jsonl, after cutting a torn last line (a crash mid-write)."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run", path, len(raw) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    done = set()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["path"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JobAborted(f"{path}:{number} is not a valid record; fix or delete that line") from None
    return done


def finished_paths(out: Path) -> set[str]:
    """Paths an earlier run encoded (in a shard) or recorded as refused. Read-only: no repair."""
    done: set[str] = set()
    for shard in shard_files(out):
        done.update(_read_shard(shard, full=False)[0])
    if (out / ERRORS).exists():
        for line in (out / ERRORS).read_text().splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


class ShardWriter:
    """Collects results and writes a shard whenever ``shard_size`` are in."""

    def __init__(self, out: Path, shard_size: int, bundle: BundleId, next_index: int, parquet: bool):
        self.out, self.shard_size, self.bundle, self.parquet = out, shard_size, bundle, parquet
        self.next_index = next_index
        self.pending: list[Encoded] = []
        self.count = 0
        self.written = 0
        self.failed = False  # after a failed write nothing more is attempted

    def add(self, batch: Encoded) -> None:
        while len(batch):
            room = self.shard_size - self.count
            head = Encoded(batch.paths[:room], batch.sizes[:room], {k: v[:room] for k, v in batch.codes.items()})
            batch = Encoded(batch.paths[room:], batch.sizes[room:], {k: v[room:] for k, v in batch.codes.items()})
            self.pending.append(head)
            self.count += len(head)
            if self.count >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.count or self.failed:
            return
        rows = Encoded([p for b in self.pending for p in b.paths],
                       np.concatenate([b.sizes for b in self.pending]).astype(np.int32),
                       {k: to_uint16(np.concatenate([b.codes[k] for b in self.pending]))
                        for k in self.pending[0].codes})
        final = self.out / shard_name(self.next_index)
        try:
            if self.parquet:
                write_parquet(final.with_suffix(".parquet"), rows, self.bundle)
            buf = io.BytesIO()
            np.savez(buf, paths=np.array(rows.paths), height=rows.sizes[:, 0], width=rows.sizes[:, 1],
                     bundle_name=np.array(self.bundle.name), bundle_sha256=np.array(self.bundle.sha256),
                     bundle_version=np.array(self.bundle.version), **rows.codes)
            write_atomic(final, buf.getvalue())
        except OSError as e:
            self.failed = True
            final.with_suffix(".parquet").unlink(missing_ok=True)
            raise WriteFailed(f"cannot write {final}: {e}") from e
        self.next_index += 1
        self.written += 1
        self.pending, self.count = [], 0


class JobOutput:
    """OUT, locked and repaired, with what is done; the one place every job writes results to.

    Use as a context manager; on exit whatever is pending is written (unless a write failed).
    """

    def __init__(self, out: Path, bundle: BundleId, shard_size: int = 4096, parquet: bool = False):
        self.out, self.bundle, self.shard_size, self.parquet = Path(out), bundle, shard_size, parquet
        self.report = JobReport()
        self.done: set[str] = set()
        self._lock_file = None

    def __enter__(self) -> Self:
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            next_index = self._repair_and_load()
            self.writer = ShardWriter(self.out, self.shard_size, self.bundle, next_index, self.parquet)
            self.errors = ErrorLog(self.out / ERRORS)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.writer.flush()  # whatever was encoded before a stop is kept
        finally:
            self.report.shards = self.writer.written
            self.errors.close()
            self._unlock()

    # -- what the jobs call ---------------------------------------------------------------------
    def todo(self, paths: list[str]) -> list[str]:
        left = [p for p in paths if p not in self.done]
        self.report.skipped = len(paths) - len(left)
        return left

    def add(self, batch: Encoded) -> None:
        self.writer.add(batch)
        self.report.encoded += len(batch)

    def refuse(self, path: str, status: int, code: str, message: str) -> None:
        self.errors.add(path, status, code, message)
        self.report.failed += 1

    def defer(self, path: str, reason: str) -> None:
        log.warning("%s: %s", path, reason)
        self.report.deferred += 1

    # -- internals ------------------------------------------------------------------------------
    def _lock(self) -> None:
        f = open(self.out / LOCK, "a+")  # noqa: SIM115 - held until _unlock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OutputLocked(f"{self.out} is in use by another tokenize job ({holder}); "
                               "wait for it or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock_file = f

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def _repair_and_load(self) -> int:
        for leftover in self.out.glob(".shard-*.tmp"):  # a run killed mid-write
            leftover.unlink()
        shards = shard_files(self.out)
        next_index = int(_SHARD.match(shards[-1].name).group(1)) + 1 if shards else 0
        for i, shard in enumerate(shards):
            try:
                # The last shard is the one a crash can tear: read it whole. The others only for paths.
                paths, bundle = _read_shard(shard, full=i == len(shards) - 1)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                aside = shard.with_name(shard.name + ".corrupt")
                log.warning("%s does not load (%s: %s); set aside as %s, its images will be done again",
                            shard, type(e).__name__, e, aside.name)
                os.replace(shard, aside)
                shard.with_suffix(".parquet").unlink(missing_ok=True)
                self.report.set_aside.append(aside.name)
                continue
            if bundle != self.bundle:
                was = f"{bundle.name} (sha256 {bundle.sha256[:12]})" if bundle else "an unrecorded bundle"
                raise BundleMismatch(f"{shard} holds codes from {was}, but this job uses {self.bundle.name} "
                                     f"(sha256 {self.bundle.sha256[:12]}); codes of two bundles must not mix: "
                                     "use another --out")
            self.done.update(paths)
            if self.parquet and not shard.with_suffix(".parquet").exists():
                self._parquet_from_npz(shard)
        self._drop_orphan_parquet()
        self.done |= read_errors(self.out / ERRORS)
        return next_index

    def _parquet_from_npz(self, shard: Path) -> None:
        """A crash between the two renames, or an earlier run without ``parquet``: add the twin."""
        with np.load(shard, allow_pickle=False) as data:
            levels = [k for k in data.files
                      if k not in ("paths", "height", "width", "bundle_name", "bundle_sha256", "bundle_version")]
            rows = Encoded([str(p) for p in data["paths"]], np.stack([data["height"], data["width"]], 1),
                           {k: data[k] for k in levels})
        write_parquet(shard.with_suffix(".parquet"), rows, self.bundle)

    def _drop_orphan_parquet(self) -> None:
        for pq in self.out.glob("shard-*.parquet"):
            if not pq.with_suffix(".npz").exists():  # written just before a crash; its rows are redone
                pq.unlink()
