"""What one running service holds: settings, bundle, backend, engine, metrics, readiness."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from service.api.admission import PixelBudget, WorkPool
from service.api.config import Settings
from service.api.errors import NotReady
from service.bundle import Bundle
from service.bundle.intake import IntakeLimits
from service.engine.metrics import Metrics
from service.engine.protocol import InferenceEngine
from service.runtime.backend import Backend

log = logging.getLogger("vqtok.service")


@dataclass
class ServiceState:
    settings: Settings
    bundle: Bundle
    metrics: Metrics
    limits: IntakeLimits
    pool: WorkPool
    budget: PixelBudget
    backend: Backend | None = None
    engine: InferenceEngine | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    model_info: dict[str, Any] = field(default_factory=dict)
    last_problem: str | None = None

    def require_ready(self) -> InferenceEngine:
        if not self.ready.is_set() or self.engine is None:
            raise NotReady("the model is still warming up", headers={"Retry-After": str(self.settings.retry_after_s)})
        return self.engine

    def problem(self) -> str | None:
        """Why the service cannot serve right now although it was ready (a stuck or dead batcher)."""
        problem = self.engine.problem(self.settings.batch_watchdog_s) if self.engine is not None else None
        if problem != self.last_problem:
            if problem is not None:
                log.error("not ready: %s", problem)
            else:
                log.warning("ready again: %s is over", self.last_problem)
            self.last_problem = problem
        return problem

    def deadline(self) -> float:
        """The loop time by which a request arriving now must be answered."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s
