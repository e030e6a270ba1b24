"""The in-process engine: the operations (encode, decode, sample, score) as batchers over a backend.

Items are single images, single items' code grids or single samples; the batch functions here stack
them into tensors, call the backend once, and split the result back into items. Reconstruct is
encode then decode, through the same two batchers.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.bundle.sampling import noise_for
from service.bundle.wire import GridBatch, Grids
from service.engine.batcher import Batcher, BatcherConfig
from service.engine.config import EngineConfig
from service.engine.errors import NotServing
from service.engine.metrics import Metrics
from service.engine.protocol import SampleItem
from service.runtime.backend import Backend
from service.runtime.sampler import never

SAMPLING_UNAVAILABLE = "this bundle has no priors, so it cannot sample"


class Engine:
    """``InferenceEngine`` in this process."""

    def __init__(self, backend: Backend, config: EngineConfig, metrics: Metrics | None = None, model: str = ""):
        """``model`` labels its metrics (the version's ``name@id``)."""
        self.backend = backend
        self.levels = backend.bundle.level_names
        self.max_delay_ms = config.batch_delay_ms(backend.provider)
        self.streams = config.streams_for(backend.provider)
        self.max_batch = config.batch_size(backend.provider)
        delay = self.max_delay_ms / 1000.0
        cfg = BatcherConfig(max_batch=self.max_batch, max_delay_s=delay, queue_limit=config.queue_limit,
                            retry_after_s=config.retry_after_s, streams=self.streams)
        self.encoder = Batcher("encode", self._encode_batch, _shape_key, cfg, metrics, model)
        self.decoder = Batcher("decode", self._decode_batch, _codes_key, cfg, metrics, model)
        self.sampler: Batcher | None = None
        self.scorer: Batcher | None = None  # code lengths under the priors (?bits=true)
        if backend.can_sample:
            self.scorer = Batcher("bits", self._bits_batch, _codes_key, cfg, metrics, model)
            # One sampling loop at a time, whatever the streams: requests that arrive while it runs
            # share the next loop, which costs far less CPU than a loop each (one thread: 8 samples
            # take 2.8x as long as 1, bench/results/sampling_1thread.json).
            # The naive sampler's batches stay small so that one cannot hold the loop for minutes; a
            # batch whose requests have all gone (cancelled, timed out) stops at its next row.
            sample_batch = config.sample_max_batch
            if backend.sampler_method == "naive":
                sample_batch = min(sample_batch, config.naive_sample_max_batch)
            sample_cfg = BatcherConfig(max_batch=sample_batch, max_delay_s=delay,
                                       queue_limit=max(config.queue_limit, config.sample_max_batch),
                                       retry_after_s=config.retry_after_s, streams=1, stoppable=True)
            self.sampler = Batcher("sample", self._sample_batch, _same_key, sample_cfg, metrics, model)

    @property
    def can_sample(self) -> bool:
        return self.sampler is not None

    @property
    def batchers(self) -> list[Batcher]:
        return [b for b in (self.encoder, self.decoder, self.sampler, self.scorer) if b is not None]

    def start(self) -> None:
        for b in self.batchers:
            b.start()

    async def stop(self) -> None:
        for b in self.batchers:
            await b.stop()

    def problem(self, watchdog_s: float) -> str | None:
        """The first batcher that cannot serve (its task ended, or a batch is past the watchdog)."""
        return next((p for p in (b.problem(watchdog_s) for b in self.batchers) if p), None)

    # -- InferenceEngine --------------------------------------------------------------------------
    async def encode(self, images: list[np.ndarray], deadline: float | None) -> list[Grids]:
        return await self.encoder.run(images, deadline)

    async def decode(self, codes: list[Grids], deadline: float | None) -> list[np.ndarray]:
        return await self.decoder.run(codes, deadline)

    async def sample(self, items: list[SampleItem], deadline: float | None) -> list[tuple[np.ndarray, Grids]]:
        if self.sampler is None:
            raise NotServing(SAMPLING_UNAVAILABLE, code="sampling_unavailable")
        return await self.sampler.run(items, deadline)

    async def code_bits(self, codes: list[Grids], deadline: float | None) -> list[dict[str, float]] | None:
        """Each item's code length in bits per level under the learned priors; None without priors."""
        if self.scorer is None:
            return None
        return await self.scorer.run(codes, deadline)

    # -- batch functions (run in each batcher's thread) ----------------------------------------
    def _encode_batch(self, images: list[np.ndarray]) -> list[Grids]:
        out = self.backend.encode(np.stack(images))
        return [{name: out[name][i] for name in self.levels} for i in range(len(images))]

    def _stack(self, codes: list[Grids]) -> GridBatch:
        return {name: np.stack([c[name] for c in codes]) for name in self.levels}

    def _decode_batch(self, codes: list[Grids]) -> list[np.ndarray]:
        return list(self.backend.decode(self._stack(codes)))

    def _bits_batch(self, codes: list[Grids]) -> list[dict[str, float]]:
        bits = self.backend.code_bits(self._stack(codes))
        return [{name: float(bits[name][i]) for name in self.levels} for i in range(len(codes))]

    def _sample_batch(self, items: list[SampleItem], should_stop: Callable[[], bool] = never
                      ) -> list[tuple[np.ndarray, Grids]]:
        # Each request's noise comes from its own seed, so a sample does not depend on its batch-mates.
        streams: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for item in items:
            key = (item.seed, item.n)
            if key not in streams:
                streams[key] = noise_for(self.backend.bundle, item.seed, item.n)
        noise = {name: np.stack([streams[(it.seed, it.n)][name][it.index] for it in items]) for name in self.levels}
        temperature = np.array([it.temperature for it in items], dtype=np.float32)
        top_k = np.array([it.top_k for it in items], dtype=np.int64)
        codes = self.backend.sample(noise, temperature, top_k, should_stop)
        images = self.backend.decode(codes)
        return [(images[i], {name: codes[name][i] for name in self.levels}) for i in range(len(items))]


def _shape_key(image: np.ndarray) -> tuple[int, ...]:
    return image.shape


def _codes_key(codes: Grids) -> tuple[tuple[int, ...], ...]:
    return tuple(g.shape for g in codes.values())


def _same_key(item: SampleItem) -> int:
    return 0  # every sample has the bundle's image size
