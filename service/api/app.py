"""The FastAPI application: wiring of settings, bundle, backend, engine, routes and middleware.

``create_app`` verifies the bundle (sha256 of every file) before anything else, so a broken bundle
never gets as far as a listening socket. Sessions load in the lifespan; the warm-up runs after
start-up, and ``/readyz`` and the ``/v1`` API answer 503 until it has finished.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service.api.admission import PixelBudget, ReleaseTickets, WorkPool
from service.api.auth import ApiKeyAuth, document_security
from service.api.config import Settings
from service.api.demo import PAGE, demo, install_demo
from service.api.errors import install_handlers
from service.api.middleware import BodyGuard, BytesInFlight, RequestMetrics
from service.api.router import EXTRA_SCHEMAS, health, v1
from service.api.schemas import decode_example
from service.api.state import ServiceState
from service.bundle import Bundle
from service.bundle.intake import IntakeLimits
from service.engine.engine import Engine
from service.engine.metrics import Metrics
from service.engine.protocol import InferenceEngine
from service.runtime.backend import Backend, OrtBackend
from service.runtime.session import CUDA, RuntimeConfig

log = logging.getLogger("vqtok.service")

EngineFactory = Callable[[Backend, Metrics], InferenceEngine]

DESCRIPTION = """Image tokenizer: images to VQ-VAE-2 code grids and back, and samples from the priors.
Requests are batched dynamically per operation; errors are always `{"error": {"code", "message"}}`."""


def runtime_config(settings: Settings) -> RuntimeConfig:
    # The provider is not known yet: warm up the largest batch any provider would run (cheap on CPU).
    return RuntimeConfig(device=settings.device, intra_op_threads=settings.intra_op_threads,
                         inter_op_threads=settings.inter_op_threads, spinning=settings.ort_spinning,
                         sampler=settings.sampler, warmup_batch=settings.batch_size(CUDA),
                         sample_warmup_batch=settings.sample_max_batch, tf32=settings.tf32,
                         alone_threads=os.cpu_count() or 1, cpu_sample_max=settings.cpu_sample_max)


def load_backend(bundle: Bundle, settings: Settings) -> OrtBackend:
    return OrtBackend(bundle, runtime_config(settings))


def model_info(state: ServiceState) -> dict[str, Any]:
    s, bundle, backend = state.settings, state.bundle, state.backend
    m = bundle.manifest
    provider = backend.provider
    return {
        "name": bundle.name,
        "sha256": bundle.sha256,  # the model's identity: folder jobs record it in their shards
        "format_version": m["format_version"],
        "image_size": bundle.image_size,
        "levels": m["levels"],
        "graphs": sorted(m["files"]),
        "provider": provider,
        "device": "cuda" if provider == CUDA else "cpu",
        "gpu": getattr(backend, "gpu_name", None),
        "sampler": backend.sampler_method,
        "streams": state.engine.streams,
        "intra_op_threads": s.intra_op_threads,
        "limits": {"max_batch": state.engine.max_batch, "max_delay_ms": state.engine.max_delay_ms, "sample_max_batch": s.sample_max_batch,
                   "queue_limit": s.queue_limit, "request_timeout_s": s.request_timeout_s, "max_items": s.max_items,
                   "max_body_bytes": s.max_body_bytes, "max_image_pixels": s.max_image_pixels,
                   "max_native_pixels": s.max_native_pixels, "size_multiple": bundle.size_multiple},
        "parity": m.get("parity", {}),
        "metrics": m.get("metrics", {}),
        "onnx": m.get("onnx", {}),
    }


async def _warm_up(state: ServiceState) -> None:
    try:
        await asyncio.to_thread(state.backend.warmup)
    except Exception:  # stay up but never turn ready; the log says why
        log.exception("warm-up failed; /readyz stays 503")
        return
    state.ready.set()
    log.info("warm-up done: ready")


async def _watchdog(state: ServiceState) -> None:
    """Checks the batchers every few seconds, so a stuck batch is logged even when nobody polls /readyz."""
    period = min(5.0, state.settings.batch_watchdog_s / 4)
    while True:
        await asyncio.sleep(period)
        state.problem()  # logs when the answer changes


def create_app(settings: Settings | None = None, *, bundle: Bundle | None = None,
               backend: Backend | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment).

    ``bundle`` and ``backend`` may be passed in (``serve`` loads them first to fail fast; tests wrap
    the backend); otherwise the bundle is loaded and verified here and the backend in the lifespan.
    ``engine_factory`` replaces the in-process ``Engine`` (the workers layout's front ends pass one
    that forwards to the engine process).
    """
    settings = settings or Settings()
    bundle = bundle or Bundle.load(settings.model_dir)
    metrics = Metrics()
    limits = IntakeLimits(bundle.image_size, bundle.size_multiple, settings.max_image_pixels,
                          settings.max_native_pixels)
    pool = WorkPool(settings.decode_workers)
    budget = PixelBudget(settings.max_pixels_in_flight, settings.retry_after_s, metrics.pixels_in_flight)
    state = ServiceState(settings, bundle, metrics, limits, pool, budget, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.backend is None:
            state.backend = await asyncio.to_thread(load_backend, bundle, settings)
        metrics.watch_backend(state.backend)
        factory = engine_factory or (lambda b, m: Engine(b, settings.engine_config(), m))
        state.engine = factory(state.backend, metrics)
        state.engine.start()
        state.model_info = model_info(state)
        log.info("serving bundle %r from %s on %s (max batch %d, max delay %g ms, %d streams of %d ORT threads)",
                 bundle.name, bundle.root, state.backend.provider, state.engine.max_batch, state.engine.max_delay_ms,
                 state.engine.streams, settings.intra_op_threads)
        warm = asyncio.create_task(_warm_up(state))
        watch = asyncio.create_task(_watchdog(state))
        try:
            yield
        finally:
            warm.cancel()
            watch.cancel()
            await state.engine.stop()
            pool.shutdown()

    app = FastAPI(title="vqtok", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.vqtok = state
    install_handlers(app)
    app.include_router(health)
    app.include_router(v1)
    install_demo(app)  # the page at /demo (open; the API it calls is not)
    # Open without a key: probes, docs, the demo page (its API calls are not); /metrics unless METRICS_AUTH.
    open_paths = {route.path for route in (*health.routes, *demo.routes)}
    open_paths |= {app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
    if settings.metrics_auth:
        open_paths.discard("/metrics")
    # Added last = outermost: metrics see every status, and the key is checked before the body limit.
    app.add_middleware(ReleaseTickets)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes,
                       timeout_s=min(settings.body_timeout_s, settings.request_timeout_s),
                       in_flight=BytesInFlight(settings.max_bytes_in_flight, settings.retry_after_s))
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths, open_prefixes=(PAGE + "/static/",))
    app.add_middleware(RequestMetrics, metrics=metrics,
                       endpoints=frozenset(route.path for route in (*health.routes, *v1.routes)))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in EXTRA_SCHEMAS],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            schema["components"]["schemas"]["DecodeRequest"]["examples"] = [decode_example(bundle.levels,
                                                                                          bundle.image_size)]
            document_security(schema, open_paths)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
