"""Tensors between the front-end workers and the engine process, through shared memory.

Each front-end worker owns one shared-memory slab; a request's input arrays and the arrays the
engine writes back lie in a region of it, and only small headers (offsets, shapes, dtypes; JSON)
travel over the worker's socket. A request that does not fit the slab right now gets a segment of
its own. Frames on the socket are a 4-byte little-endian length and an orjson body.
"""
from __future__ import annotations

import asyncio
import bisect
import struct
import sys
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import orjson

ALIGN = 64  # every array starts on a cache line
HEADER = struct.Struct("<I")

ArraySpec = tuple[int, tuple[int, ...], str]  # offset, shape, dtype


def attach(name: str) -> shared_memory.SharedMemory:
    """Open a segment another process created, without taking part in its clean-up.

    Before Python 3.13 every ``SharedMemory`` registers with the resource tracker, which would then
    unlink (or warn about) the creator's segment when this process exits.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Slab:
    """A segment and a first-fit allocator over it. Used from one event loop: no locking."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self.shm, self.owner, self.size = shm, owner, shm.size
        self._free: list[tuple[int, int]] = [(0, shm.size)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}

    @classmethod
    def create(cls, size: int) -> Slab:
        return cls(shared_memory.SharedMemory(create=True, size=size), owner=True)

    @classmethod
    def open(cls, name: str) -> Slab:
        return cls(attach(name), owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free region of ``nbytes`` (rounded up), or None if there is none."""
        nbytes = _aligned(max(nbytes, 1))
        for i, (offset, size) in enumerate(self._free):
            if size >= nbytes:
                if size == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (offset + nbytes, size - nbytes)
                self._used[offset] = nbytes
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, size))
        # Merge with the following and the preceding free region.
        if i < len(self._free) and offset + size == self._free[i][0]:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            i -= 1
            offset, size = self._free[i][0], self._free[i][1] + size
            del self._free[i]
        self._free.insert(i, (offset, size))

    def view(self, spec: ArraySpec) -> np.ndarray:
        offset, shape, dtype = spec
        return np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=self.shm.buf, offset=offset)

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def layout(shapes: Sequence[tuple[tuple[int, ...], str]], start: int = 0) -> tuple[list[ArraySpec], int]:
    """Specs for arrays laid out one after another from ``start``, and the bytes they span."""
    specs, offset = [], start
    for shape, dtype in shapes:
        specs.append((offset, tuple(int(d) for d in shape), dtype))
        offset += _aligned(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return specs, offset - start


async def read_frame(reader: asyncio.StreamReader) -> dict:
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return orjson.loads(await reader.readexactly(length))


def frame(message: dict) -> bytes:
    body = orjson.dumps(message)
    return HEADER.pack(len(body)) + body
