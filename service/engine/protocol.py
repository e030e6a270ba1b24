"""The one interface the HTTP layer calls: the in-process ``Engine`` and the workers layout's
``RemoteEngine`` both implement it (checked by ``tests/test_layout.py``), so the router never
probes for attributes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from service.bundle.wire import Grids


@dataclass(frozen=True)
class SampleItem:
    """One image of a sample request: its request's noise stream is (seed, n), and it is row ``index``."""

    seed: int
    n: int
    index: int
    temperature: float
    top_k: int  # 0: no top-k


@runtime_checkable
class InferenceEngine(Protocol):
    """Encode, decode, sample and score, batched. ``deadline`` is an event-loop time; every call raises
    ``service.engine.errors`` only."""

    max_batch: int
    max_delay_ms: float
    streams: int

    @property
    def can_sample(self) -> bool: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def problem(self, watchdog_s: float) -> str | None:
        """Why it cannot serve although it was started (a stuck or dead batcher, a lost engine process)."""

    async def encode(self, images: list[np.ndarray], deadline: float | None) -> list[Grids]: ...

    async def decode(self, codes: list[Grids], deadline: float | None) -> list[np.ndarray]: ...

    async def sample(self, items: list[SampleItem], deadline: float | None) -> list[tuple[np.ndarray, Grids]]: ...

    async def code_bits(self, codes: list[Grids], deadline: float | None) -> list[dict[str, float]] | None:
        """Each item's code length in bits per level under the priors; None without priors."""
