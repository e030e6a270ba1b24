"""Dynamic batching: one bounded queue per operation, owned by one asyncio task.

A request is a list of items (images, code grids, samples). ``Batcher.run`` groups its items by
key (the input shape: only equal shapes stack into one tensor), splits each group into chunks of at
most ``max_batch`` items and queues the chunks as jobs. The owning task closes a batch when a key
has ``max_batch`` items waiting, or when the oldest waiting job is ``max_delay`` old, and runs the
batch function in a worker thread so the event loop keeps accepting requests meanwhile. Among the
keys that are due, the one whose oldest job has waited longest goes first (age-based fairness: a
steady stream of full batches of one shape cannot starve an older job of another shape). Up to
``streams`` batches run at once; while all of them run the queue fills up, which is what makes
batches grow under load. (On a CPU, several single-threaded batches at once beat one batch on
every core: ONNX Runtime's intra-op threads wait on each other after every operator.)

Failure isolation: an exception in the batch function fails that batch's jobs only. A job whose
request has gone (client disconnected, deadline passed) is cancelled and leaves the queue at once;
one cancelled while its batch formed is left out of it. A batch function that takes a second
argument (``stoppable``) gets a ``should_stop()`` that turns true once nobody waits for any of its
jobs, so a long loop (sampling) can stop early.

Health: ``problem()`` names a batcher whose task has ended or whose batch has run past the
watchdog limit; ``/readyz`` turns 503 on it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service.engine.errors import BackendFailed, DeadlineExceeded, NotServing, Overloaded, TooLarge
from service.engine.metrics import Metrics, OpMetrics

log = logging.getLogger("vqtok.service")

BatchFn = Callable[[list[Any]], Sequence[Any]]  # items -> one result per item, in order
STOP_JOIN_S = 1.0  # how long stop() waits for its worker threads to end (a stuck batch's never does)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32
    max_delay_s: float = 0.005
    queue_limit: int = 512  # items waiting (not yet running)
    retry_after_s: int = 1
    streams: int = 1  # batches running at once, each in its own thread
    stoppable: bool = False  # the batch function takes (items, should_stop)


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: list[Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, name: str, fn: BatchFn, key: Callable[[Any], Hashable], config: BatcherConfig,
                 metrics: Metrics | None = None, model: str = ""):
        self.name, self.fn, self.key, self.config = name, fn, key, config
        self.metrics: OpMetrics | None = metrics.for_op(name, model) if metrics is not None else None
        self._queues: dict[Hashable, deque[_Job]] = {}
        self._counts: dict[Hashable, int] = {}
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, float] = {}  # batch task -> when it started (perf_counter)
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=config.streams, thread_name_prefix=f"vqtok-{name}")

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
            self._task.add_done_callback(self._on_task_end)

    def _on_task_end(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        # It should run until stop(): say loudly why it did not.
        if task.cancelled():
            log.error("%s batcher task was cancelled; /readyz now answers 503", self.name)
        else:
            log.error("%s batcher task ended unexpectedly: %r; /readyz now answers 503", self.name, task.exception())

    def problem(self, watchdog_s: float) -> str | None:
        """Why this batcher cannot serve (its task ended, a batch is stuck), or None."""
        if self._task is not None and self._task.done():
            return f"the {self.name} batcher has stopped"
        now = time.perf_counter()
        oldest = min(self._running.values(), default=now)
        if now - oldest > watchdog_s:
            return f"a {self.name} batch has been running for {now - oldest:.1f} s (watchdog {watchdog_s:g} s)"
        return None

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # A task that died of an error has been logged already (``_on_task_end``).
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(NotServing("the server is shutting down", code="shutting_down"))
        self._queues.clear()
        self._counts.clear()
        self._set_depth(0)
        threads = list(getattr(self._executor, "_threads", ()))
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A worker thread holds its last call (the batch function: the engine, its backend's sessions) until
        # it has handed the result over and come round its loop, which on a busy machine can be after the
        # request was answered and the unload went on. Wait briefly for the threads to end, so that an unload
        # frees the sessions before it hands memory back (``release_memory``); never for a stuck batch.
        if threads:
            await asyncio.to_thread(_join, threads, STOP_JOIN_S)

    @property
    def depth(self) -> int:
        return self._depth

    # -- submitting -----------------------------------------------------------------------------
    async def run(self, items: Sequence[Any], deadline: float | None = None) -> list[Any]:
        """Results for ``items`` in order. ``deadline`` is a ``loop.time()`` value.

        Raises TooLarge for a request that can never fit the queue, Overloaded when the queue is
        full now, DeadlineExceeded past the deadline, BackendFailed if its batch raised.
        """
        if self._task is None:
            raise NotServing("the server is not serving yet")
        n = len(items)
        if n > self.config.queue_limit:
            raise TooLarge(f"{n} items can never fit: the {self.name} queue holds at most {self.config.queue_limit}")
        if self._depth + n > self.config.queue_limit:
            raise Overloaded(f"the {self.name} queue is full; retry later", retry_after_s=self.config.retry_after_s)
        groups: dict[Hashable, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self.key(item), []).append(i)
        loop = asyncio.get_running_loop()
        parts: list[tuple[list[int], asyncio.Future]] = []
        step = self.config.max_batch
        for key, idx in groups.items():
            for s in range(0, len(idx), step):
                chunk = idx[s:s + step]
                job = _Job(key, [items[i] for i in chunk], loop.create_future())
                self._enqueue(job)
                parts.append((chunk, job.future))
        futures = [f for _, f in parts]
        try:
            # return_exceptions: every chunk's outcome is retrieved, none is left to warn at GC.
            async with asyncio.timeout_at(deadline):
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError:
            raise DeadlineExceeded(f"the request did not finish within its deadline ({self.name})") from None
        finally:
            for f in futures:  # no-op for finished ones; takes still-queued ones out of the queue
                f.cancel()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        out: list[Any] = [None] * n
        for (chunk, _), results in zip(parts, outcomes):
            for i, result in zip(chunk, results):
                out[i] = result
        return out

    def _enqueue(self, job: _Job) -> None:
        self._queues.setdefault(job.key, deque()).append(job)
        self._counts[job.key] = self._counts.get(job.key, 0) + len(job.items)
        self._set_depth(self._depth + len(job.items))
        job.future.add_done_callback(lambda f, job=job: self._on_done(job))
        self._wakeup.set()

    def _on_done(self, job: _Job) -> None:
        # A job cancelled while still queued (its client left) must not hold a place any longer.
        if job.future.cancelled():
            queue = self._queues.get(job.key)
            if queue is not None and job in queue:
                queue.remove(job)
                self._forget(job)

    def _forget(self, job: _Job) -> None:
        self._counts[job.key] -= len(job.items)
        if not self._queues[job.key]:
            del self._queues[job.key]
            del self._counts[job.key]
        self._set_depth(self._depth - len(job.items))

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self.metrics is not None:
            self.metrics.queue_depth.set(depth)

    # -- the owning task ------------------------------------------------------------------------
    def _ready_key(self, now: float) -> tuple[bool, Hashable, float | None]:
        """(ready, key to run now, seconds until the oldest job's delay runs out if none is ready).

        A key is due when it has a full batch or its oldest job has waited ``max_delay``; of the due
        keys, the one with the oldest job runs: once due, jobs run in arrival order whatever their shape."""
        best_key, best = None, None
        oldest = None
        for key, queue in self._queues.items():
            head = queue[0].enqueued
            if self._counts[key] >= self.config.max_batch or head + self.config.max_delay_s <= now:
                if best is None or head < best:
                    best_key, best = key, head
            elif oldest is None or head < oldest:
                oldest = head
        if best is not None:
            return True, best_key, None
        if oldest is None:
            return False, None, None
        return False, None, oldest + self.config.max_delay_s - now

    def _take(self, key: Hashable) -> list[_Job]:
        queue, jobs, size = self._queues[key], [], 0
        while queue and size + len(queue[0].items) <= self.config.max_batch:
            job = queue.popleft()
            self._forget(job)
            if job.future.cancelled():  # its done-callback has not run yet
                continue
            size += len(job.items)
            jobs.append(job)
        return jobs

    async def _next_key(self) -> Hashable:
        """Wait until some key's batch is due (full, or its oldest job has waited max_delay)."""
        while True:
            ready, key, wait = self._ready_key(time.perf_counter())
            if ready:
                return key
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _loop(self) -> None:
        streams = asyncio.Semaphore(self.config.streams)
        while True:
            # A free stream first, then the batch: while every stream is busy the queue keeps filling.
            await streams.acquire()
            jobs = self._take(await self._next_key())
            if not jobs:  # every job of that key had been cancelled
                streams.release()
                continue
            task = asyncio.create_task(self._run_batch(jobs), name=f"batch-{self.name}")
            self._running[task] = time.perf_counter()
            task.add_done_callback(lambda t: (self._running.pop(t, None), streams.release()))

    async def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            await self._execute(jobs)
        except asyncio.CancelledError:  # shutting down mid-batch: nobody will set these results
            _fail(jobs, NotServing("the server is shutting down", code="shutting_down"))
            raise
        except Exception:  # a batch task must never leave its requests waiting
            log.exception("%s batcher: unexpected error", self.name)
            _fail(jobs, BackendFailed(f"{self.name} failed"))

    async def _execute(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # cancelled while the batch formed
        if not jobs:
            return
        items = [item for job in jobs for item in job.items]
        start = time.perf_counter()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            for job in jobs:
                self.metrics.queue_time.observe(start - job.enqueued)
        loop = asyncio.get_running_loop()
        args: tuple = (items,)
        if self.config.stoppable:
            # Read from the worker thread: a future's done() is a plain attribute read.
            args = (items, lambda: all(job.future.done() for job in jobs))
        try:
            results = await loop.run_in_executor(self._executor, self.fn, *args)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as e:  # whatever the batch raised fails this batch only
            if all(job.future.done() for job in jobs):  # nobody waits (it stopped early, say): not a failure
                log.debug("%s batch of %d items ended with nobody waiting: %r", self.name, len(items), e)
                return
            log.exception("%s batch of %d items failed", self.name, len(items))
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            _fail(jobs, BackendFailed(f"{self.name} failed ({type(e).__name__})"))
            return
        finally:
            if self.metrics is not None:
                self.metrics.inference_time.observe(time.perf_counter() - start)
        offset = 0
        for job in jobs:
            part = results[offset:offset + len(job.items)]
            offset += len(job.items)
            if not job.future.done():
                job.future.set_result(part)


def _join(threads: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _fail(jobs: list[_Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
