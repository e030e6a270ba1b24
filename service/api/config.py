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
from service.bundle.intake import MAX_IMAGE_PIXELS
from service.engine.config import EngineConfig
from service.runtime.session import CUDA


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VQTOK_", extra="ignore")

    model_dir: Path = DEFAULT_BUNDLE  # the first bundle: requests that name no model go to it
    model_name: str = ""  # its name ("": its manifest's)
    # More bundles served at once: "[NAME=]DIR" each (comma-separated), then one per subfolder of
    # models_dir (named after it). `vqtok serve --model DIR --model DIR2 --models FOLDER` sets these.
    extra_models: Annotated[list[str], NoDecode] = []
    models_dir: Path | None = None
    # POST/DELETE /admin/models (load and unload bundles at run time) need this key; empty: no admin API.
    admin_key: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Batching (service.engine.config.EngineConfig says what each means and how None follows the provider).
    max_batch: int | None = Field(None, ge=1)
    max_delay_ms: float | None = Field(None, ge=0)
    sample_max_batch: int = Field(64, ge=1)  # sampling batches the n of concurrent requests
    queue_limit: int = Field(512, ge=1)  # items (images, grids, samples) waiting per operation
    request_timeout_s: float = Field(60.0, gt=0)
    retry_after_s: int = Field(1, ge=0)

    # Comma-separated (or a JSON list); empty means no authentication. With keys, every path needs
    # one except the health probes and the docs; metrics_auth puts /metrics behind the key as well.
    api_keys: Annotated[list[str], NoDecode] = []
    metrics_auth: bool = False

    # Limits. Pixels over max_image_pixels are refused before decoding (decompression bombs);
    # fit=none and decode work at native size, so they get the tighter max_native_pixels.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)  # the folder jobs read the same setting
    max_native_pixels: int = Field(1024 * 1024, ge=1)
    max_items: int = Field(64, ge=1)
    # Admission in pixels: a request holds its pixels (header pixels while decoding, then its arrays
    # and answers) from the header check to its answer; past this many at once it gets 503, and a
    # request that alone exceeds it 413. 64 Mpx is about 190 MB of RGB arrays.
    max_pixels_in_flight: int = Field(64 * 1024 * 1024, ge=1)
    # The largest answer a request may build (413 before any work when it could be bigger). Images
    # count 4 bytes a pixel (a base64 PNG of incompressible pixels), code grids 5 bytes a code.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # JSON bodies of code grids (decode, sample): parsing lists costs ~9 bytes of memory a byte.
    max_json_bytes: int = Field(8 * 1024 * 1024, ge=1)
    # Image decoding and large JSON parsing run in this many threads (0: one per core but one, which
    # is left to the event loop and the batches), never on the event loop.
    decode_threads: int = Field(0, ge=0)

    # Slow and many clients. A body still incomplete this long after its headers is 408; request
    # bodies held at once are capped; uvicorn answers 503 beyond max_connections connections.
    body_timeout_s: float = Field(30.0, gt=0)
    max_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1)
    max_connections: int = Field(512, ge=1)
    # A batch running longer than this turns /readyz 503 (and is logged): the backend is stuck.
    batch_watchdog_s: float = Field(120.0, gt=0)

    # ONNX Runtime. Each operation runs up to `streams` batches at once, each on `intra_op_threads`
    # threads. 0 is auto: on CPU one stream per core with one thread each, which beats one stream on
    # every core (bench/serve_load.py measures both); on CUDA one stream. Spinning burns idle cores.
    streams: int = Field(0, ge=0)
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(1, ge=1)
    ort_spinning: bool = False
    sampler: Literal["cached", "naive"] = "cached"
    # The naive sampler runs a full prior pass per code (about 1 sample/s on CPU): its batches are
    # kept this small so that one batch cannot hold the sampling loop for minutes.
    naive_sample_max_batch: int = Field(4, ge=1)
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

    # glibc malloc, set by `vqtok serve` at start-up (0: glibc's default). With its default per-thread
    # arenas and a mmap threshold that grows after every large free, a long-running server keeps the
    # high-water mark of its biggest requests (pixel bombs, large JSON): +44 % RSS over a 60 s soak
    # (bench/results/soak_glibc_defaults.json). Two arenas and a fixed 1 MiB threshold hand large
    # blocks back to the OS: +3 % in the same soak (bench/results/soak.json).
    malloc_arena_max: int = Field(2, ge=0)
    malloc_mmap_threshold: int = Field(1024 * 1024, ge=0)

    png_compress_level: int = Field(1, ge=0, le=9)  # fast: the PNGs are small and latency counts
    log_level: str = "info"
    access_log: bool = False  # per-request log lines cost throughput; /metrics counts requests
    # Unset: the request timeout plus 5 s, so that requests in flight at SIGTERM can finish.
    graceful_timeout_s: float | None = Field(None, gt=0)

    @field_validator("extra_models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return []
            if value.startswith("["):
                import json

                return json.loads(value)
            return [k.strip() for k in value.split(",")]
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        # An empty key would match a bare "Authorization: Bearer": refuse to start instead.
        if any(not k.strip() for k in keys):
            raise ValueError("an API key is empty or only whitespace")
        return keys

    @model_validator(mode="after")
    def _threads(self) -> Settings:
        if self.intra_op_threads == 0:
            cores = os.cpu_count() or 1
            self.intra_op_threads = max(1, cores // (self.streams or cores))
        return self

    @property
    def graceful_s(self) -> float:
        return self.graceful_timeout_s if self.graceful_timeout_s is not None else self.request_timeout_s + 5.0

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or max(1, (os.cpu_count() or 1) - 1)

    def workers_for(self, provider: str) -> int:
        """Front-end processes for an execution provider (1: the one-process layout).

        On CUDA one process's event loop is the bottleneck, so every core but two (the engine
        process's loop and its ORT thread) runs a front end. On CPU the model needs the cores, and
        one process measured faster with 1-image requests (bench/serve_load.py --layouts, README
        "Process layouts and the plain-FastAPI baseline").
        """
        if self.workers:
            return self.workers
        return max(2, (os.cpu_count() or 1) - 2) if provider == CUDA else 1

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_batch=self.max_batch, max_delay_ms=self.max_delay_ms, streams=self.streams,
                            queue_limit=self.queue_limit, retry_after_s=self.retry_after_s,
                            sample_max_batch=self.sample_max_batch,
                            naive_sample_max_batch=self.naive_sample_max_batch)

    def batch_size(self, provider: str) -> int:
        """The max batch in effect for an execution provider (``EngineConfig`` holds the rule)."""
        return self.engine_config().batch_size(provider)
