"""Putting a bundle into service: its backend (in-process ONNX Runtime, or the engine process's in the
workers layout), its engine, warmed up, then listed in ``Models``."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.bundle import Bundle, BundleError
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.metrics import Metrics
from service.engine.models import LoadedModel, Models, bundle_dirs
from service.engine.protocol import InferenceEngine
from service.runtime.backend import Backend

log = logging.getLogger("vqtok.service")

EngineFactory = Callable[[Backend, Metrics, str], InferenceEngine]  # (backend, metrics, "name@id")


def named_bundles(first: Bundle, first_name: str, extra: list[str], folder: Path | None, verify: bool = True
                  ) -> list[tuple[str | None, Bundle]]:
    """The bundles a server starts with, each verified now unless ``verify`` is off (a process whose
    parent verified them): a broken one never gets as far as a socket. ``first``, then ``[NAME=]DIR``
    each of ``extra``, then one per subfolder of ``folder``. One bundle named twice is refused here too,
    rather than at its load after start-up."""
    bundles = [(first_name or None, first),
               *((n, Bundle.load(d, verify=verify)) for n, d in bundle_dirs(extra, folder))]
    seen: dict[str, Path] = {}
    for _, b in bundles:
        if b.sha256 in seen:
            raise BundleError(f"bundles {seen[b.sha256]} and {b.root} are the same bundle (one manifest sha256)")
        seen[b.sha256] = b.root
    return bundles


class Loader:
    def __init__(self, models: Models, metrics: Metrics, config: EngineConfig,
                 open_backend: Callable[[Bundle], Backend], describe: Callable[[LoadedModel], dict[str, Any]],
                 engine_factory: EngineFactory | None = None, first_backend: Backend | None = None):
        """``engine_factory`` replaces the in-process ``Engine``; ``first_backend`` (tests) serves the first bundle."""
        self.models, self.metrics, self.config = models, metrics, config
        self.open_backend, self.describe = open_backend, describe
        self.engine_factory, self.first_backend = engine_factory, first_backend

    @property
    def in_process(self) -> bool:
        return self.engine_factory is None

    def _backend(self, bundle: Bundle) -> Backend:
        backend, self.first_backend = self.first_backend, None
        return backend if backend is not None else self.open_backend(bundle)

    def _engine(self, backend: Backend, ref: str) -> InferenceEngine:
        self.metrics.watch_backend(backend, ref)
        if self.engine_factory is not None:
            return self.engine_factory(backend, self.metrics, ref)
        return Engine(backend, self.config, self.metrics, ref)

    async def load(self, name: str | None, bundle: Bundle) -> LoadedModel:
        return await self.models.load(name, bundle, self._backend, self._engine, self.describe)

    async def load_all(self, bundles: list[tuple[str | None, Bundle]], ready: asyncio.Event) -> None:
        """The bundles named at start-up, in order; ``ready`` is set once every one is warm."""
        try:
            for name, bundle in bundles:
                model = await self.load(name, bundle)
                log.info("serving %s from %s on %s (max batch %d, max delay %g ms, %d streams)", model.ref,
                         bundle.root, model.backend.provider, model.engine.max_batch, model.engine.max_delay_ms,
                         model.engine.streams)
        except Exception:  # stay up but never turn ready; the log says why
            log.exception("loading the start-up bundles failed; /readyz stays 503")
            return
        ready.set()
        log.info("warm-up done: ready")
