"""The workers layout's front-end side of the engine: a ``RemoteEngine`` (``InferenceEngine`` over the
engine process's socket and a shared-memory slab) and a ``RemoteBackend`` (what a front end knows of
the backend it never sees). The engine side is ``service.engine.process``.

``/metrics`` on a front end shows its own request metrics and the engine's batching metrics, fetched
from the engine at scrape time (``mirror_engine_metrics``).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.bundle import Bundle
from service.bundle.wire import Grids
from service.engine.config import EngineConfig
from service.engine.engine import SAMPLING_UNAVAILABLE
from service.engine.errors import NotServing, from_wire
from service.engine.metrics import Metrics
from service.engine.protocol import SampleItem
from service.engine.shm import HEADER, Slab, frame, layout, read_frame

log = logging.getLogger("vqtok.service")

# Per worker. Pages are only touched as regions are used (first fit from the start); a request that
# does not fit gets a segment of its own. Docker's default /dev/shm is 64 MiB: compose raises it.
SLAB_BYTES = 64 * 1024 * 1024


class RemoteBackend:
    """What a front end knows of the engine's backend: enough for /v1/model and readiness."""

    def __init__(self, bundle: Bundle, info: dict[str, Any]):
        self.bundle = bundle
        self.provider: str = info["provider"]
        self.gpu_name: str | None = info.get("gpu_name")
        self.sampler_method: str | None = info.get("sampler")
        self._can_sample = bool(info.get("can_sample"))
        self.engine_ready = threading.Event()

    @property
    def can_sample(self) -> bool:
        return self._can_sample

    def warmup(self) -> None:
        """The engine warms the sessions; a front end is ready once the engine says so."""
        self.engine_ready.wait()


class RemoteEngine:
    """``InferenceEngine`` over the engine process (it batches every front end's requests together)."""

    def __init__(self, backend: RemoteBackend, config: EngineConfig, metrics: Metrics, path: str,
                 default_timeout_s: float):
        self.backend, self.path = backend, path
        self.bundle = backend.bundle
        self.levels = self.bundle.level_names
        self.max_batch = config.batch_size(backend.provider)
        self.max_delay_ms = config.batch_delay_ms(backend.provider)
        self.streams = config.streams_for(backend.provider)
        self.default_timeout = default_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._slab: Slab | None = None
        self._task: asyncio.Task | None = None
        self._alive = False
        mirror_engine_metrics(metrics, path)

    @property
    def can_sample(self) -> bool:
        return self.backend.can_sample

    def problem(self, watchdog_s: float) -> str | None:
        """The engine process's own batchers are watched there; here only the connection is."""
        if self._task is not None and self._task.done():
            return "the connection to the engine process is closed"
        return None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-connection")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._slab = Slab.create(SLAB_BYTES)
        self._alive = True
        self._writer.write(frame({"op": "hello", "slab": self._slab.name}))
        try:
            while True:
                msg = await read_frame(reader)
                if msg.get("event") == "ready":
                    self.backend.engine_ready.set()
                    continue
                fut, release = self._pending.pop(msg["id"])
                if fut.cancelled():
                    release()  # its waiter has gone; the engine is done with the region now
                else:
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the engine process closed its connection")
        finally:
            self._alive = False
            for fut, release in self._pending.values():
                release()
                if not fut.done():
                    fut.set_exception(NotServing("the engine process is gone", code="engine_gone"))
            self._pending.clear()
            self._writer.close()
            self._slab.close()

    # -- InferenceEngine ----------------------------------------------------------------------------
    async def encode(self, images: list[np.ndarray], deadline: float | None) -> list[Grids]:
        levels = self.bundle.levels
        out = [(levels[name].grid(*im.shape[:2]), "<i8") for im in images for name in self.levels]
        _, arrays = await self._call("encode", deadline, images, out)
        return [dict(zip(self.levels, arrays[i:i + len(self.levels)])) for i in range(0, len(arrays), len(self.levels))]

    async def decode(self, codes: list[Grids], deadline: float | None) -> list[np.ndarray]:
        return (await self._call("decode", deadline, self._grids(codes), [(self._image_shape(c), "|u1")
                                                                           for c in codes]))[1]

    async def sample(self, items: list[SampleItem], deadline: float | None) -> list[tuple[np.ndarray, Grids]]:
        if not self.backend.can_sample:
            raise NotServing(SAMPLING_UNAVAILABLE, code="sampling_unavailable")
        size, levels = self.bundle.image_size, self.bundle.levels
        per_item = [((size, size, 3), "|u1")] + [(levels[name].grid(size, size), "<i8") for name in self.levels]
        extra = {"items": [[it.seed, it.n, it.index, it.temperature, it.top_k] for it in items]}
        _, arrays = await self._call("sample", deadline, [], per_item * len(items), extra, group=len(per_item))
        k = len(per_item)
        return [(arrays[i], dict(zip(self.levels, arrays[i + 1:i + k]))) for i in range(0, len(arrays), k)]

    async def code_bits(self, codes: list[Grids], deadline: float | None) -> list[dict[str, float]] | None:
        if not self.backend.can_sample:
            return None
        reply, _ = await self._call("bits", deadline, self._grids(codes), [])
        return reply["bits"]

    def _grids(self, codes: list[Grids]) -> list[np.ndarray]:
        return [np.asarray(c[name], dtype=np.int64) for c in codes for name in self.levels]

    def _image_shape(self, codes: Grids) -> tuple[int, int, int]:
        name = self.levels[0]
        stride = self.bundle.levels[name].stride
        h, w = np.shape(codes[name])
        return h * stride, w * stride, 3

    async def _call(self, op: str, deadline: float | None, inputs: list[np.ndarray],
                    outputs: list[tuple[tuple[int, ...], str]], extra: dict | None = None,
                    group: int = 0) -> tuple[dict, list[np.ndarray]]:
        if not self._alive:
            raise NotServing("the engine process is not connected", code="engine_gone")
        loop = asyncio.get_running_loop()
        in_specs, in_bytes = layout([(a.shape, a.dtype.str) for a in inputs])
        out_specs, out_bytes = layout(outputs, start=in_bytes)
        region, base, own = self._slab, self._slab.alloc(in_bytes + out_bytes), None
        if base is None:  # the slab is full right now (or the request is huge): a segment of its own
            own = region = Slab.create(in_bytes + out_bytes)
            base = 0
        in_specs = [(o + base, s, d) for o, s, d in in_specs]
        out_specs = [(o + base, s, d) for o, s, d in out_specs]

        def release() -> None:
            if own is not None:
                own.close()
            else:
                self._slab.free(base)

        for spec, array in zip(in_specs, inputs):
            region.view(spec)[...] = array
        rid = next(self._ids)
        timeout = self.default_timeout if deadline is None else max(deadline - loop.time(), 0.0)
        msg = {"id": rid, "op": op, "model": self.bundle.sha256, "t": timeout, "in": in_specs,
               "out": [out_specs[i:i + group] for i in range(0, len(out_specs), group)] if group else out_specs,
               "seg": own.name if own is not None else None, **(extra or {})}
        fut = loop.create_future()
        self._pending[rid] = (fut, release)
        self._writer.write(frame(msg))
        try:
            reply = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                release()  # the answer came, but our waiter was cancelled before it ran
            elif self._alive:
                self._writer.write(frame({"id": 0, "op": "cancel", "ref": rid}))
            raise
        try:
            if "error" in reply:
                raise from_wire(reply["error"])
            return reply, [np.array(region.view(spec)) for spec in out_specs]
        finally:
            release()


# -- metrics ------------------------------------------------------------------------------------
class EngineMetrics(Collector):
    """The engine's batching metrics, fetched from the engine at scrape time (a short blocking
    round trip on a Unix socket: a scrape costs the worker's loop about a millisecond)."""

    def __init__(self, path: str, skip: set[str]):
        self.path, self.skip = path, skip

    def collect(self):
        try:
            text = fetch_engine_metrics(self.path)
        except OSError as e:
            log.warning("engine metrics unavailable: %s", e)
            return
        for family in text_string_to_metric_families(text):
            if family.name not in self.skip:
                yield family


def fetch_engine_metrics(path: str, timeout: float = 2.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(frame({"id": 0, "op": "metrics"}))
        buf = b""
        while len(buf) < HEADER.size or len(buf) < HEADER.size + HEADER.unpack(buf[:HEADER.size])[0]:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the engine closed the metrics connection")
            buf += chunk
    return json.loads(buf[HEADER.size:])["text"]


def mirror_engine_metrics(metrics: Metrics, path: str) -> None:
    """A front end runs no batches: its batch metrics are replaced by the engine's (once: the engine's
    cover every bundle it holds)."""
    if metrics.mirrored:
        return
    metrics.mirrored = True
    for metric in (metrics.queue_time, metrics.inference_time, metrics.batch_size, metrics.queue_depth,
                   metrics.batch_failures):
        metrics.registry.unregister(metric)
    own = {family.name for family in metrics.registry.collect()}
    metrics.registry.register(EngineMetrics(path, own))
