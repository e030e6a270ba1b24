"""How the engine batches, as one typed config. ``vqtok serve`` builds it from its settings
(``service.api.config.Settings.engine_config``); fields left None follow the execution provider."""
from __future__ import annotations

import os
from dataclasses import dataclass

from service.runtime.session import CUDA


@dataclass(frozen=True)
class EngineConfig:
    # A batch closes at max_batch items or max_delay_ms after its oldest request arrived. On CPU, where
    # ORT's cost per image hardly depends on the batch size, a batch is what queued while the streams
    # were busy (delay 0), capped at 8: a bigger batch on one thread only makes its requests wait
    # longer (bench/serve_load.py: same throughput, p99 -27 % at 32 clients). On CUDA, where batching
    # pays: 2 ms and 32.
    max_batch: int | None = None
    max_delay_ms: float | None = None
    streams: int = 0  # batches per operation at once; 0: one per core on CPU, one on CUDA
    queue_limit: int = 512  # items waiting per operation
    retry_after_s: int = 1
    sample_max_batch: int = 64
    naive_sample_max_batch: int = 4  # the naive sampler's batches stay small (about 1 sample/s on CPU)

    def batch_size(self, provider: str) -> int:
        if self.max_batch is not None:
            return self.max_batch
        return 32 if provider == CUDA else 8

    def batch_delay_ms(self, provider: str) -> float:
        if self.max_delay_ms is not None:
            return self.max_delay_ms
        return 2.0 if provider == CUDA else 0.0

    def streams_for(self, provider: str) -> int:
        if self.streams:
            return self.streams
        return 1 if provider == CUDA else os.cpu_count() or 1
