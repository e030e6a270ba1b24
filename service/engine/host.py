"""What the engine needs of the process it runs in: glibc's malloc kept bounded, memory handed back
after a bundle is unloaded, and an exit that never waits on a batch thread stuck in the backend."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time

log = logging.getLogger("vqtok.service")

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt(3) parameters


def bound_malloc(arena_max: int, mmap_threshold: int) -> bool:
    """Bound glibc's malloc (elsewhere a no-op; 0 leaves a parameter alone): VQTOK_MALLOC_ARENA_MAX and
    VQTOK_MALLOC_MMAP_THRESHOLD. Done before any thread starts, so every arena follows them. True if
    glibc took them."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    if arena_max:
        ok &= mallopt(M_ARENA_MAX, arena_max) == 1
    if mmap_threshold:
        ok &= mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return ok


def release_memory() -> None:
    """After an unload: collect the sessions' Python objects and hand freed heap back to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def exit_now(code: int) -> int:
    """Return ``code``, unless a worker thread is still busy (a batch stuck in the backend): then
    end the process at once, since the interpreter would otherwise wait for that thread forever
    (thread pools join their threads at exit)."""
    workers = [t for t in threading.enumerate() if not t.daemon and t.name.startswith("vqtok-")]
    deadline = time.monotonic() + 2.0  # idle workers of a shut-down pool end within moments
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in workers if t.is_alive()]
    if stuck:
        log.error("exiting with worker threads still busy: %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
