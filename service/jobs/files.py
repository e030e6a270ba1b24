"""Image files for the folder jobs: listing, reading through transient errors, preprocessing.

A folder being filled while a job runs has files that are still being copied, and a busy machine
runs out of file descriptors now and then. Neither is the file's fault, so neither may end up in
``errors.jsonl`` for good:

- ``EMFILE``/``ENFILE``/``EAGAIN``/``EINTR``/``EBUSY`` on open or read are retried with backoff;
- a file whose size or mtime changes while it is read is read again;
- a file that fails to decode while it is younger than ``settle_s`` is judged only once it has
  been left alone that long (a copy in progress looks exactly like a truncated image).

What still fails after the retries is *deferred*: neither encoded nor recorded, so a rerun tries
it again. Decoding and refusals are the service's own intake (``service.bundle.intake``), so a
refused file carries the status and code ``/v1/encode`` answers for it.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle.images import open_image
from service.bundle.intake import ImageRefused, IntakeLimits, displayed_size, take
from service.jobs.retry import Backoff

TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR, errno.EBUSY})


@dataclass(frozen=True)
class ReadPolicy:
    retries: int = 5  # per file, for transient read errors and files still changing
    backoff: Backoff = field(default_factory=lambda: Backoff(first_s=0.1, cap_s=5.0))
    settle_s: float = 2.0  # a file modified more recently than this may still be being written


class TransientReadError(OSError):
    """The file could not be read yet (still changing, too many open files): try again later."""


@dataclass(frozen=True)
class Refusal:
    """Why a file is recorded in ``errors.jsonl``: an intake refusal (the status and code
    ``/v1/encode`` answers for it), or ``unreadable_file`` (status 0) when it cannot be read at all."""
    status: int
    code: str
    message: str

    @classmethod
    def of(cls, e: ImageRefused) -> Refusal:
        return cls(e.status, e.code, e.message)


@dataclass(frozen=True)
class Stamp:
    """What a file looked like when read: if this changes, the bytes read may be stale."""
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)

    def age_s(self) -> float:
        return time.time() - self.mtime_ns / 1e9


def sleep(seconds: float) -> None:  # module-level so tests can watch the pauses
    time.sleep(seconds)


def read_file(path: Path, policy: ReadPolicy) -> tuple[bytes, Stamp]:
    """The file's bytes and its stamp, retrying transient errors and reads that raced a writer.

    Raises ``TransientReadError`` when it keeps failing that way, ``OSError`` for anything else
    (missing, permission denied, a directory).
    """
    last: OSError | None = None
    for attempt in range(policy.retries + 1):
        if attempt:
            sleep(policy.backoff.delay(attempt - 1))
        try:
            before = Stamp.of(path)
            data = path.read_bytes()
            after = Stamp.of(path)
        except OSError as e:
            if e.errno not in TRANSIENT_ERRNOS:
                raise
            last = e
            continue
        if before == after and len(data) == after.size:
            return data, after
        last = TransientReadError(f"{path.name} changed while it was read")
    raise TransientReadError(f"{path.name}: still failing after {policy.retries} retries: {last}")


def header_size(data: bytes) -> tuple[int, int]:
    """The source (height, width) from a file's bytes; (0, 0) if the header cannot be read."""
    try:
        with open_image(data) as im:
            return displayed_size(im)
    except Exception:  # noqa: BLE001 - only called for files the service already accepted
        return 0, 0


def still_settling(path: Path, stamp: Stamp, policy: ReadPolicy) -> bool:
    """A failure on this file may be a copy in progress: it changed since read, or is too young to judge.

    Waits until the file is ``settle_s`` old, so the caller can simply read it again.
    """
    try:
        now = Stamp.of(path)
    except OSError:
        return False
    if now != stamp:
        return True
    young = policy.settle_s - now.age_s()
    if young > 0:
        sleep(young)
        return True
    return False


@dataclass
class Loaded:
    """One file's outcome: pixels and size, or a refusal, or deferred (``transient``)."""
    path: str
    pixels: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    refusal: Refusal | None = None
    transient: str | None = None


def load_file(root: Path, rel: str, limits: IntakeLimits, policy: ReadPolicy) -> Loaded:
    """Read and take in one file (``service.bundle.intake``: what ``/v1/encode`` does), with the retries
    above. Runs in the decode pool's processes and Ray tasks."""
    path = root / rel
    for _ in range(policy.retries + 1):
        try:
            data, stamp = read_file(path, policy)
        except TransientReadError as e:
            return Loaded(rel, transient=str(e))
        except OSError as e:
            return Loaded(rel, refusal=Refusal(0, "unreadable_file", str(e)))
        try:
            pixels, size = take(data, "center_crop", limits)
            return Loaded(rel, pixels=pixels, size=size)
        except ImageRefused as e:
            if not still_settling(path, stamp, policy):
                return Loaded(rel, refusal=Refusal.of(e))
    return Loaded(rel, transient=f"{rel} kept changing; left for a rerun")


def load_files(root: str, rels: list[str], limits: IntakeLimits, policy: ReadPolicy) -> list[Loaded]:
    """``load_file`` over a chunk: one task for the pool, so per-task overhead is paid per chunk."""
    return [load_file(Path(root), rel, limits, policy) for rel in rels]


def stack(loaded: list[Loaded], image_size: int) -> np.ndarray:
    """uint8 [n, S, S, 3] of the files that decoded (an empty batch keeps its shape)."""
    good = [x.pixels for x in loaded if x.pixels is not None]
    return np.stack(good) if good else np.zeros((0, image_size, image_size, 3), np.uint8)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
