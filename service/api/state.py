"""What one running service holds: settings, the loaded bundles (``service.engine.models``), metrics,
admission, readiness."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from service.api.config import Settings
from service.api.errors import NotReady
from service.bundle import Bundle
from service.bundle.intake import IntakeLimits
from service.engine.admission import PixelBudget, WorkPool
from service.engine.metrics import Metrics
from service.engine.models import LoadedModel, Models

log = logging.getLogger("vqtok.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    pool: WorkPool
    budget: PixelBudget
    models: Models = field(default_factory=Models)
    # Set once every bundle named at start-up is loaded and warm: /readyz and the API answer 503 before.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_problem: str | None = None

    def limits_for(self, bundle: Bundle) -> IntakeLimits:
        s = self.settings
        return IntakeLimits(bundle.image_size, bundle.size_multiple, s.max_image_pixels, s.max_native_pixels)

    def require_ready(self) -> None:
        if not self.ready.is_set():
            raise NotReady("the model is still warming up", headers={"Retry-After": str(self.settings.retry_after_s)})

    @property
    def default(self) -> LoadedModel:
        """The first bundle's newest version: where requests that name no model go (and /v1/model)."""
        return self.models.resolve(None)

    def problem(self) -> str | None:
        """Why the service cannot serve right now although it was ready (a stuck or dead batcher)."""
        watchdog = self.settings.batch_watchdog_s
        problem = next((f"{m.ref}: {p}" for m in self.models if (p := m.engine.problem(watchdog))), None)
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
