"""``vqtok serve``: verify every bundle named and open the first one's sessions before uvicorn starts
(a missing or corrupt file ends the command with a one-line error naming it, exit status 2), then serve:
one process, or the workers layout (``service.api.workers``) where one process cannot feed the device."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from service.api.app import create_app, load_backend, startup_bundles
from service.api.config import Settings
from service.bundle import DEFAULT_BUNDLE, Bundle, BundleError
from service.engine.host import bound_malloc, exit_now
from service.runtime.session import CPU, CUDA, DeviceUnavailable, RuntimeConfig, wants_cuda

log = logging.getLogger("vqtok.service")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(model_dir: str | Path | None = None, host: str | None = None, port: int | None = None,
          models: list[str] | None = None, models_dir: str | Path | None = None) -> int:
    """``models``: ``[NAME=]DIR`` each, the first the default (``--model``, repeated); ``models_dir``: one
    bundle per subfolder (``--models``)."""
    overrides = {k: v for k, v in {"model_dir": model_dir, "host": host, "port": port, "models_dir": models_dir}.items()
                 if v is not None}
    if models:
        name, sep, path = models[0].partition("=")
        named = sep and "/" not in name
        overrides.update({"model_dir": path, "model_name": name} if named else {"model_dir": models[0]})
        if len(models) > 1:  # otherwise VQTOK_EXTRA_MODELS stands
            overrides["extra_models"] = models[1:]
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"VQTOK_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        print(f"vqtok serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    bound_malloc(settings.malloc_arena_max, settings.malloc_mmap_threshold)
    try:
        # Every bundle verified once, here: a bad one refuses the start.
        bundles = startup_bundles(settings, Bundle.load(settings.model_dir))
        workers = settings.workers_for(CUDA if wants_cuda(RuntimeConfig(device=settings.device)) else CPU)
        if workers > 1:  # the engine process loads the backend (and reports a broken bundle or device)
            from service.api.workers import serve_workers

            return serve_workers(settings, workers, uvicorn_options(settings), bundles)
        backend = load_backend(bundles[0][1], settings)
    except (BundleError, DeviceUnavailable, OSError) as e:
        hint = ""
        if Path(settings.model_dir) == DEFAULT_BUNDLE and not DEFAULT_BUNDLE.exists():
            # The default bundle lives in the repository, not in a wheel.
            hint = ("\n  the default bundle ships in the repository's artifacts/default: install with "
                    "pip install -e, or pass --model DIR (or set VQTOK_MODEL_DIR)")
        print(f"vqtok serve: refusing to start: {e}{hint}", file=sys.stderr)
        return 2
    log.info("ONNX Runtime provider: %s", backend.provider)
    app = create_app(settings, bundles=bundles, backend=backend)
    # The first version's sessions belong to the loader now: this frame lives as long as the server, and
    # holding them here kept ~160 MB of ONNX Runtime memory after that version was unloaded.
    del backend
    # The graceful timeout covers the request timeout, so requests in flight at SIGTERM can finish;
    # beyond max_connections uvicorn answers 503 at once.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, **uvicorn_options(settings))
    server = SignalledServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal that stopped it: SIGINT may come back here
        return exit_now(130)
    if server.stopped_by == signal.SIGINT:
        # ...or not: the re-raised SIGINT reaches asyncio.run's own handler, which only cancels its main
        # task, and a task that finishes first ends normally (seen on a busy machine: status 0).
        return exit_now(130)
    return exit_now(0 if server.started else 3)


class SignalledServer(uvicorn.Server):
    """uvicorn's server, remembering the first signal that stopped it (the exit status says which)."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's settings, the same for the one process and for each front-end worker."""
    return {"log_level": settings.log_level, "access_log": settings.access_log,
            "timeout_graceful_shutdown": settings.graceful_s, "limit_concurrency": settings.max_connections,
            "log_config": None}
