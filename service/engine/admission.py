"""Admission in pixels, and the bounded pool that does the CPU work requests bring with them.

A request is admitted by what it costs, not by how many items it has: from the moment its image
headers (or code grids, or sample count) are known it holds a ``Ticket`` for its pixels, first the
header pixels it will decode, then the arrays it keeps and the images it answers. All tickets
together stay under ``max_pixels_in_flight``; past it a request gets 503 (retry), and a request
that could never fit gets 413. Tickets are released when the request has been answered, however
it ends (the HTTP layer's ``ReleaseTickets`` releases what a request's ``held`` list holds), so decoded
arrays waiting in a batcher's queue count too.

``WorkPool`` runs image decoding and large JSON parsing in a fixed number of threads; what waits
for it holds its ticket, so the pool's queue is bounded by the same budget. Its work is cancelled
with its request (deadline, disconnect): not started, it never runs; running, it stops at its next
``stop`` check.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import Gauge

from service.engine.errors import Overloaded, TooLarge

T = TypeVar("T")


class PixelBudget:
    def __init__(self, limit: int, retry_after_s: int, gauge: Gauge | None = None):
        self.limit, self.retry_after_s, self.gauge = limit, retry_after_s, gauge
        self.held = 0

    def _add(self, pixels: int) -> None:
        self.held += pixels
        if self.gauge is not None:
            self.gauge.set(self.held)

    def admit(self, held: list, pixels: int, what: str) -> Ticket:
        """A ticket for ``pixels``, appended to ``held`` (what the request releases when answered);
        ``what`` names the cost."""
        ticket = Ticket(self)
        ticket.resize(pixels, what)
        held.append(ticket)
        return ticket


class Ticket:
    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels = budget, 0

    def resize(self, pixels: int, what: str) -> None:
        """Hold ``pixels`` from now on; growing is checked against the budget, shrinking always works."""
        b = self.budget
        grow = pixels - self.pixels
        if grow > 0:
            if pixels > b.limit:
                raise TooLarge(f"{what} come to {pixels} pixels; the server admits at most {b.limit} "
                               "at once (VQTOK_MAX_PIXELS_IN_FLIGHT)", code="too_many_pixels")
            if b.held + grow > b.limit:
                raise Overloaded("too many pixels in flight on this server; retry later", retry_after_s=b.retry_after_s)
        b._add(grow)
        self.pixels = pixels

    def release(self) -> None:
        self.budget._add(-self.pixels)
        self.pixels = 0


class WorkPool:
    """A fixed number of threads for CPU work that must stay off the event loop."""

    def __init__(self, threads: int):
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vqtok-decode")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(stop, *args)`` in a worker thread; ``stop`` (a ``threading.Event``) is set if the
        caller is cancelled while ``fn`` runs, so a long ``fn`` can give up between steps."""
        stop = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, stop, *args)
        try:
            return await future
        except asyncio.CancelledError:
            stop.set()  # a job that has not started is cancelled with the future; a running one sees this
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
