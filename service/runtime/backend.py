"""The inference backend: ONNX Runtime sessions behind a small interface.

Everything here is synchronous and array-in, array-out; batchers call it from their own thread.
The ``Backend`` protocol is what the API sees, so tests can wrap or replace it. Level names and
graph I/O names come from the bundle.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.bundle import DECODER, ENCODER, Bundle, BundleError, prior_graph
from service.bundle.sampling import noise_for
from service.bundle.wire import GridBatch
from service.runtime.buckets import bucket_for, buckets_up_to, pad_rows
from service.runtime.codelength import prior_bits
from service.runtime.sampler import PriorSampler, never
from service.runtime.session import (
    CUDA,
    DeviceUnavailable,
    RuntimeConfig,
    cuda_device_id,
    gpu_name,
    open_session,
    session_options,
)

log = logging.getLogger("vqtok.runtime")



class Backend(Protocol):
    bundle: Bundle
    provider: str

    @property
    def can_sample(self) -> bool: ...

    @property
    def sampler_method(self) -> str | None:
        """"cached", "naive", or None without priors."""

    def encode(self, images: np.ndarray) -> GridBatch:
        """uint8 [B, H, W, 3] -> {level: int64 [B, H/stride, W/stride]}."""

    def decode(self, codes: GridBatch) -> np.ndarray:
        """{level: int64 grids} -> uint8 [B, H, W, 3]."""

    def sample(self, noise: dict[str, np.ndarray], temperature: np.ndarray, top_k: np.ndarray,
               should_stop: Callable[[], bool] = never) -> GridBatch:
        """Per-sample noise {level: [B, h, w, K]}, temperature [B], top_k [B] -> {level: int64 code grids}.

        ``should_stop`` is asked before every row; true stops the loop (``SamplingStopped``)."""

    def code_bits(self, codes: GridBatch) -> dict[str, np.ndarray]:
        """{level: int64 grids [B, h, w]} -> {level: float64 [B]}, each item's code length under the priors."""

    def warmup(self) -> None:
        """Run every graph once so the first request does not pay for allocation and kernel choice."""


class OrtBackend:
    """ONNX Runtime sessions for every graph the bundle lists (verified by ``Bundle.load``)."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig):
        self.bundle, self.cfg = bundle, cfg
        opts = session_options(cfg)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for graph, entry in bundle.manifest["files"].items():
            if not str(entry["path"]).endswith(".onnx"):
                continue
            try:
                self.sessions[graph] = open_session(bundle.path(graph), cfg, opts)
            except DeviceUnavailable:
                raise
            except Exception as e:
                raise BundleError(f"bundle file {entry['path']} ({graph}) does not load in ONNX Runtime: {e}") from e
            if cfg.device == "auto" and graph == ENCODER and self.sessions[graph].get_providers()[0] != CUDA:
                cfg = cfg.on_cpu()  # don't retry CUDA for every graph
        self.cfg = cfg
        self.provider = self.sessions[ENCODER].get_providers()[0]
        self.gpu_name = gpu_name(cuda_device_id(self.sessions[ENCODER])) if self.provider == CUDA else None
        self.buckets = self.provider == CUDA if cfg.buckets is None else cfg.buckets
        # Input sizes (per operation) whose every bucket has run once, and how often / how long a
        # request brought a new one (fit=none sizes): the API layer exports both as metrics.
        self._warm_sizes: set[tuple] = set()
        self._warm_lock = threading.Lock()
        self.size_warmups: Counter[str] = Counter()
        self.size_warmup_seconds: Counter[str] = Counter()
        # CPU streams run one thread each, which is what several batches at once want; a batch that
        # runs alone (low load) gets a second session of the encoder/decoder on every core instead,
        # with spinning threads: between operators a sleeping thread takes longer to wake than the
        # operator takes (default encoder, batch 1: 1.8 ms spinning, 2.5 ms not, 4.1 ms on one thread;
        # bench/lone_batch.py).
        self._alone: dict[str, ort.InferenceSession] = {}
        if self.provider != CUDA and cfg.alone_threads > cfg.intra_op_threads:
            wide = replace(cfg, intra_op_threads=cfg.alone_threads, spinning=True)
            self._alone = {g: open_session(bundle.path(g), wide, session_options(wide)) for g in (ENCODER, DECODER)}
        self._running = 0
        self._running_lock = threading.Lock()
        self.levels = bundle.level_names
        self._enc_out = [o.name for o in self.sessions[ENCODER].get_outputs()]
        self._dec_in = [i.name for i in self.sessions[DECODER].get_inputs()]
        self.sampler: PriorSampler | None = None
        if bundle.can_sample:
            try:
                self.sampler = PriorSampler(bundle, self.sessions, method=cfg.sampler, cfg=cfg)
            except BundleError as e:
                log.warning("%s; sampling with the naive sampler", e)
                self.sampler = PriorSampler(bundle, self.sessions, method="naive", cfg=cfg)
        # On CUDA a sampling step is a tiny kernel launch-bound call (n=1: 4.6 samples/s on an H200):
        # batches of at most cpu_sample_max samples walk the step graphs on one CPU thread instead.
        self.cpu_sampler: PriorSampler | None = None
        if self.sampler is not None and self.provider == CUDA and cfg.cpu_sample_max > 0:
            self.cpu_sampler = PriorSampler(bundle, method=self.sampler.method,
                                            cfg=replace(cfg.on_cpu(), intra_op_threads=1))

    @property
    def can_sample(self) -> bool:
        return self.sampler is not None

    @property
    def sampler_method(self) -> str | None:
        return self.sampler.method if self.sampler else None

    # -- the operations, padded to a bucket when buckets are on --------------------------------
    def encode(self, images: np.ndarray) -> GridBatch:
        n = len(images)
        if self.buckets:
            self._warm_size("encode", images.shape[1:3], self._encode_zeros)
            images = pad_rows(images, bucket_for(n))
        with self._session(ENCODER) as sess:
            outs = sess.run(None, {"images": images})
        return {name: out[:n] for name, out in zip(self._enc_out, outs)}

    def decode(self, codes: GridBatch) -> np.ndarray:
        feeds = {name: codes[name] for name in self._dec_in}
        n = len(next(iter(feeds.values())))
        if self.buckets:
            self._warm_size("decode", tuple(g.shape[1:] for g in feeds.values()), self._decode_zeros)
            feeds = {name: pad_rows(g, bucket_for(n)) for name, g in feeds.items()}
        with self._session(DECODER) as sess:
            return sess.run(None, feeds)[0][:n]

    @contextmanager
    def _session(self, graph: str) -> Iterator[ort.InferenceSession]:
        """The graph's session for a batch: the every-core one if no other batch is running."""
        with self._running_lock:
            self._running += 1
            alone = self._running == 1
        try:
            yield self._alone[graph] if alone and graph in self._alone else self.sessions[graph]
        finally:
            with self._running_lock:
                self._running -= 1

    def sample(self, noise: dict[str, np.ndarray], temperature: np.ndarray, top_k: np.ndarray,
               should_stop: Callable[[], bool] = never) -> GridBatch:
        if self.sampler is None:
            raise RuntimeError("this bundle has no priors")
        n = len(next(iter(noise.values())))
        if self.cpu_sampler is not None and n <= self.cfg.cpu_sample_max:
            return self.cpu_sampler.sample(noise, temperature, top_k, should_stop)
        if not self.buckets:
            return self.sampler.sample(noise, temperature, top_k, should_stop)
        rows = bucket_for(n)
        # Padded samples get zero noise, temperature 1 and no top-k: any valid values would do.
        codes = self.sampler.sample({k: pad_rows(v, rows) for k, v in noise.items()},
                                    pad_rows(np.broadcast_to(np.asarray(temperature, np.float32), (n,)), rows, 1.0),
                                    pad_rows(np.broadcast_to(np.asarray(top_k, np.int64), (n,)), rows, 0),
                                    should_stop)
        return {k: v[:n] for k, v in codes.items()}

    def code_bits(self, codes: GridBatch) -> dict[str, np.ndarray]:
        if self.sampler is None:
            raise RuntimeError("this bundle has no priors")
        return prior_bits(self.bundle, self.sessions, codes)

    # -- warming -----------------------------------------------------------------------------
    def _encode_zeros(self, size: tuple[int, int], batch: int) -> None:
        self.sessions[ENCODER].run(None, {"images": np.zeros((batch, *size, 3), dtype=np.uint8)})

    def _decode_zeros(self, grids: tuple[tuple[int, ...], ...], batch: int) -> None:
        self.sessions[DECODER].run(None, {name: np.zeros((batch, *shape), dtype=np.int64)
                                          for name, shape in zip(self._dec_in, grids)})

    def _warm_size(self, op: str, size: tuple, run_zeros, at_start: bool = False) -> None:
        """Run every bucket once at an input size not seen before (``run_zeros(size, batch)``).

        At start-up that is the bundle's own size; later it is a ``fit=none`` size, which is
        counted: the request that brings it waits for the warm-up, the ones after it do not.
        """
        key = (op, tuple(size))
        if key in self._warm_sizes:
            return
        with self._warm_lock:  # one thread warms; another asking for the same size waits for it
            if key in self._warm_sizes:
                return
            start = time.perf_counter()
            for batch in buckets_up_to(self.cfg.warmup_batch):
                run_zeros(tuple(size), batch)
            self._warm_sizes.add(key)
            if not at_start:
                took = time.perf_counter() - start
                self.size_warmups[op] += 1
                self.size_warmup_seconds[op] += took
                log.info("warmed %s for a new input size %s in %.3f s", op, size, took)

    def warmup(self) -> None:
        size = self.bundle.image_size
        if self._alone:  # the every-core sessions (the narrow ones are warmed below)
            outs = self._alone[ENCODER].run(None, {"images": np.zeros((1, size, size, 3), np.uint8)})
            self._alone[DECODER].run(None, {n: g for n, g in zip(self._enc_out, outs) if n in self._dec_in})
        if self.buckets:
            self._warm_size("encode", (size, size), self._encode_zeros, at_start=True)
            grids = tuple(self.bundle.levels[name].grid(size, size) for name in self._dec_in)
            self._warm_size("decode", grids, self._decode_zeros, at_start=True)
        for batch in sorted({1, self.cfg.warmup_batch}):
            codes = self.encode(np.zeros((batch, size, size, 3), dtype=np.uint8))
            self.decode(codes)
        if self.sampler is not None and self.buckets:
            # Every sampling bucket walks its step graphs once (on CUDA a new n costs a kernel choice per graph).
            for batch in buckets_up_to(self.cfg.sample_warmup_batch):
                self.sample(noise_for(self.bundle, 0, batch), np.ones(batch, np.float32), np.zeros(batch, np.int64))
        if self.sampler is not None:
            # One full prior pass per graph; the sampling loop itself needs no warming beyond that.
            for level in self.levels:
                sess = self.sessions[prior_graph(level)]
                names = [i.name for i in sess.get_inputs()]
                sess.run(None, {n: codes[n][:1] for n in names})
            self.sample(noise_for(self.bundle, 0, 1), np.ones(1, np.float32), np.zeros(1, np.int64))
