"""The workers layout: N front-end uvicorn processes and one engine process (``service.engine``).

One process cannot feed a GPU: its event loop (multipart parsing, PNG decoding, JSON answers)
saturates one core long before the GPU is busy, and separate servers on one GPU do not add up
(each has its own CUDA context and batches only its own requests). So with ``VQTOK_WORKERS`` > 1:

- ``serve_workers`` (the parent) starts the engine process (``service.engine.process``), waits
  until its sessions are open (a broken bundle or device still ends ``vqtok serve`` with status 2),
  then runs uvicorn with N workers on the one listening socket, and stops the engine after them;
- each worker (``worker_app``) is the usual FastAPI app, with a ``service.engine.remote.RemoteEngine``
  in place of the in-process ``Engine``: it writes a request's tensors into its shared-memory slab and sends the
  engine a small header; the engine batches across every worker and writes the results back.

``/metrics`` on any worker shows that worker's request metrics and the engine's batching metrics
(fetched from the engine at scrape time).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service.api.config import Settings
from service.bundle import Bundle
from service.engine.process import EngineProcess, EngineSetup, EngineStartFailed
from service.engine.remote import RemoteBackend, RemoteEngine

log = logging.getLogger("vqtok.service")

ENGINE_SOCKET = "VQTOK_ENGINE_SOCKET"  # set by serve_workers for its workers, not by users
ENGINE_INFO = "VQTOK_ENGINE_INFO"


# -- processes ------------------------------------------------------------------------------------
def worker_app() -> FastAPI:
    """The app of one front-end worker (uvicorn's factory; the parent set the environment)."""
    from service.api.app import create_app, startup_bundles

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = os.environ[ENGINE_SOCKET]
    # The parent verified every file.
    bundles = startup_bundles(settings, Bundle.load(settings.model_dir, verify=False), verify=False)
    info = json.loads(os.environ[ENGINE_INFO])  # by bundle: the engine process holds every one
    return create_app(settings, bundles=bundles,
                      backend_factory=lambda b: RemoteBackend(b, info[b.sha256]),
                      engine_factory=lambda b, m, ref: RemoteEngine(b, settings.engine_config(), m, path,
                                                                    settings.request_timeout_s))


def serve_workers(settings: Settings, workers: int, uvicorn_options: dict[str, Any],
                  bundles: list[tuple[str | None, Bundle]]) -> int:
    """Run the engine process and ``workers`` front ends for ``bundles``; ``vqtok serve``'s exit status."""
    import uvicorn

    from service.api.app import runtime_config

    tmp = Path(tempfile.mkdtemp(prefix="vqtok-engine-"))
    path = str(tmp / "engine.sock")
    dirs = [str(b.root) for _, b in bundles]
    engine = EngineProcess(EngineSetup(dirs, runtime_config(settings), settings.engine_config(), settings.log_level),
                           path)
    try:
        try:
            payload = engine.wait_loaded()
        except EngineStartFailed as e:
            print(f"vqtok serve: refusing to start: {e}", file=sys.stderr)
            return 2
        first = next(iter(payload.values()))
        log.info("engine process %d on %s%s with %d bundles; starting %d front-end workers", engine.process.pid,
                 first["provider"], f" ({first['gpu_name']})" if first.get("gpu_name") else "", len(payload), workers)
        # The workers are spawned: they read everything, CLI overrides included, from the environment.
        os.environ.update({ENGINE_SOCKET: path, ENGINE_INFO: json.dumps(payload),
                           "VQTOK_MODEL_DIR": str(settings.model_dir), "VQTOK_MODEL_NAME": settings.model_name,
                           "VQTOK_EXTRA_MODELS": ",".join(settings.extra_models),
                           "VQTOK_MODELS_DIR": str(settings.models_dir or ""), "VQTOK_HOST": settings.host,
                           "VQTOK_PORT": str(settings.port)})
        stopping = threading.Event()

        def watch() -> None:  # an engine that dies takes the front ends down with it
            engine.process.join()
            if not stopping.is_set():
                log.error("the engine process exited with %s; stopping", engine.process.exitcode)
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="engine-watch", daemon=True).start()
        uvicorn.run("service.api.workers:worker_app", factory=True, host=settings.host, port=settings.port,
                    workers=workers, **uvicorn_options)
        stopping.set()
        return 0 if engine.process.is_alive() else 3
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
