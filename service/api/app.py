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

from service.api.admin import PREFIX as ADMIN_PREFIX
from service.api.admin import admin
from service.api.auth import ApiKeyAuth, document_security
from service.api.config import Settings
from service.api.demo import PAGE, demo, install_demo
from service.api.errors import install_handlers
from service.api.middleware import BodyGuard, BytesInFlight, ReleaseTickets, RequestMetrics
from service.api.router import EXTRA_SCHEMAS, health, v1
from service.api.schemas import decode_example
from service.api.state import ServiceState
from service.bundle import Bundle
from service.engine.admission import PixelBudget, WorkPool
from service.engine.loader import EngineFactory, Loader, named_bundles
from service.engine.metrics import Metrics
from service.engine.models import LoadedModel
from service.runtime.backend import Backend, OrtBackend
from service.runtime.session import CUDA, RuntimeConfig

log = logging.getLogger("vqtok.service")


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


def model_info(settings: Settings, model: LoadedModel) -> dict[str, Any]:
    """GET /v1/model's body for one loaded version: the model's description and this server's limits."""
    s, engine = settings, model.engine
    return {**model.describe(), "intra_op_threads": s.intra_op_threads,
            "limits": {"max_batch": engine.max_batch, "max_delay_ms": engine.max_delay_ms,
                       "sample_max_batch": s.sample_max_batch, "queue_limit": s.queue_limit,
                       "request_timeout_s": s.request_timeout_s, "max_items": s.max_items,
                       "max_body_bytes": s.max_body_bytes, "max_image_pixels": s.max_image_pixels,
                       "max_native_pixels": s.max_native_pixels, "size_multiple": model.bundle.size_multiple}}


Bundles = list[tuple[str | None, Bundle]]  # (the name to serve it under, or None for its manifest's; bundle)


def startup_bundles(settings: Settings, first: Bundle, verify: bool = True) -> Bundles:
    """VQTOK_MODEL_DIR (``first``), VQTOK_EXTRA_MODELS, then VQTOK_MODELS_DIR's subfolders, verified now."""
    return named_bundles(first, settings.model_name, settings.extra_models, settings.models_dir, verify)


async def _watchdog(state: ServiceState) -> None:
    """Checks the batchers every few seconds, so a stuck batch is logged even when nobody polls /readyz."""
    period = min(5.0, state.settings.batch_watchdog_s / 4)
    while True:
        await asyncio.sleep(period)
        state.problem()  # logs when the answer changes


def create_app(settings: Settings | None = None, *, bundle: Bundle | None = None,
               backend: Backend | None = None, engine_factory: EngineFactory | None = None,
               backend_factory: Callable[[Bundle], Backend] | None = None, bundles: Bundles | None = None
               ) -> FastAPI:
    """The app for ``settings`` (default: from the environment).

    ``bundles`` (``startup_bundles``, verified), or just the first ``bundle``, and ``backend`` may be passed
    in (``serve`` loads them first to fail fast; tests wrap the backend); otherwise the bundles are loaded
    and verified here and the backends in the lifespan.
    ``engine_factory`` and ``backend_factory`` replace the in-process ``Engine`` and ``OrtBackend`` (the
    workers layout's front ends pass ones that forward to the engine process). Every bundle of
    VQTOK_EXTRA_MODELS and VQTOK_MODELS_DIR is loaded after the first.
    """
    settings = settings or Settings()
    bundles = bundles or startup_bundles(settings, bundle or Bundle.load(settings.model_dir))
    metrics = Metrics()
    pool = WorkPool(settings.decode_workers)
    budget = PixelBudget(settings.max_pixels_in_flight, settings.retry_after_s, metrics.pixels_in_flight)
    state = ServiceState(settings, metrics, pool, budget)
    loader = Loader(state.models, metrics, settings.engine_config(),
                    backend_factory or (lambda b: load_backend(b, settings)), lambda m: model_info(settings, m),
                    engine_factory, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loader = loader
        warm = asyncio.create_task(loader.load_all(bundles, state.ready))
        watch = asyncio.create_task(_watchdog(state))
        try:
            yield
        finally:
            warm.cancel()
            watch.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            for model in state.models:
                await model.engine.stop()
            pool.shutdown()

    app = FastAPI(title="vqtok", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.vqtok = state
    install_handlers(app)
    app.include_router(health)
    app.include_router(v1)
    if settings.admin_key:
        app.include_router(admin)
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
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths, open_prefixes=(PAGE + "/static/",),
                       admin_keys=[settings.admin_key] if settings.admin_key else [], admin_prefix=ADMIN_PREFIX)
    app.add_middleware(RequestMetrics, metrics=metrics,
                       endpoints=frozenset(route.path for route in (*health.routes, *v1.routes)))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in EXTRA_SCHEMAS],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            first = bundles[0][1]
            schema["components"]["schemas"]["DecodeRequest"]["examples"] = [decode_example(first.levels,
                                                                                          first.image_size)]
            document_security(schema, open_paths)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
