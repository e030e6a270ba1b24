"""Service settings: every knob is a ``VQTOK_*`` environment variable (pydantic-settings).

``vqtok serve --model/--host/--port`` override the matching variables; nothing else is a flag,
so a deployment is described by its environment alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.bundle import DEFAULT_BUNDLE
from service.runtime.session import CUDA


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQTOK_", extra="ignore")

    model_dir: Path = DEFAULT_BUNDLE
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Batching. A batch closes at max_batch items or max_delay_ms after its oldest request arrived.
    # Unset, they follow the provider. On CPU, where ORT's cost per image hardly depends on the
    # batch size, a batch is simply what queued while the streams were busy (delay 0: no added
    # latency at low load), capped at 8 because a bigger batch on one thread only makes its requests
    # wait longer (bench/serve_load.py: same throughput, p99 -27 % at 32 clients). On CUDA, where
    # batching pays: 2 ms and 32.
    max_batch: int | None = Field(None, ge=1)
    max_delay_ms: float | None = Field(None, ge=0)
    sample_max_batch: int = Field(64, ge=1)  # sampling batches the n of concurrent requests
    queue_limit: int = Field(512, ge=1)  # items (images, grids, samples) waiting per operation
    request_timeout_s: float = Field(60.0, gt=0)
    retry_after_s: int = Field(1, ge=0)

    # Comma-separated (or a JSON list); empty means no authentication.
    api_keys: Annotated[list[str], NoDecode] = []

    # Limits. Pixels over max_image_pixels are refused before decoding (decompression bombs);
    # fit=none and decode work at native size, so they get the tighter max_native_pixels.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_native_pixels: int = Field(1024 * 1024, ge=1)
    max_items: int = Field(64, ge=1)

    # ONNX Runtime. Each operation runs up to `streams` batches at once, each on `intra_op_threads`
    # threads. 0 is auto: on CPU one stream per core with one thread each, which beats one stream on
    # every core (bench/serve_load.py measures both); on CUDA one stream. Spinning burns idle cores.
    streams: int = Field(0, ge=0)
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(1, ge=1)
    ort_spinning: bool = False
    sampler: Literal["cached", "naive"] = "cached"
    # CUDA only: allow TF32 convolutions (faster, but the codes then differ from the CPU's in ~1 % of places).
    tf32: bool = False
    # Processes: 1 is one process doing HTTP and inference; N > 1 is N front-end workers (HTTP,
    # validation, image decoding, answers) and one engine process that owns the sessions and batches
    # across all of them (service/api/workers.py). 0 is auto: see workers_for.
    workers: int = Field(0, ge=0)
    # CUDA only: sampling batches of at most this many samples run on one CPU thread. A GPU step is a
    # launch-bound call: n=1 took 217 ms on an H200 (issue 11), while one thread of this 2-core CPU
    # does n=1 in 52 ms and n=8 in 148 ms (bench/results/sampling_1thread.json). 0: always the GPU.
    cpu_sample_max: int = Field(8, ge=0)

    png_compress_level: int = Field(1, ge=0, le=9)  # fast: the PNGs are small and latency counts
    log_level: str = "info"
    access_log: bool = False  # per-request log lines cost throughput; /metrics counts requests
    graceful_timeout_s: float = Field(30.0, gt=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _threads(self) -> Settings:
        if self.intra_op_threads == 0:
            cores = os.cpu_count() or 1
            self.intra_op_threads = max(1, cores // (self.streams or cores))
        return self

    def workers_for(self, provider: str) -> int:
        """Front-end processes for an execution provider (1: the one-process layout).

        On CUDA one process's event loop is the bottleneck, so every core but two (the engine
        process's loop and its ORT thread) runs a front end. On CPU the model needs the cores and
        the one-process layout measured faster (bench/serve_load.py, README "Service").
        """
        if self.workers:
            return self.workers
        return max(2, (os.cpu_count() or 1) - 2) if provider == CUDA else 1

    def streams_for(self, provider: str) -> int:
        """Batches each operation runs at once on an execution provider."""
        if self.streams:
            return self.streams
        return 1 if provider == CUDA else os.cpu_count() or 1

    def batch_size(self, provider: str) -> int:
        """The max batch in effect for an execution provider."""
        if self.max_batch is not None:
            return self.max_batch
        return 32 if provider == CUDA else 8

    def batch_delay_ms(self, provider: str) -> float:
        """The max delay in effect for an execution provider."""
        if self.max_delay_ms is not None:
            return self.max_delay_ms
        return 2.0 if provider == CUDA else 0.0
