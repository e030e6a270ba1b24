"""The engine's own errors. They say what went wrong, never how to answer it: the HTTP layer maps
them to statuses in one place (``service.api.errors``), and the workers layout sends them across
the engine socket by class name (``service.engine.remote``)."""
from __future__ import annotations


class EngineError(Exception):
    """Base: a stable machine-readable ``code`` and a message for people."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.retry_after_s = retry_after_s  # when waiting that long may help


class Overloaded(EngineError):
    """The queue is full right now: retry later."""

    code = "overloaded"


class NotServing(EngineError):
    """Not serving this now: warming up, shutting down, the engine process gone, or no priors to sample."""

    code = "not_ready"


class DeadlineExceeded(EngineError):
    code = "deadline_exceeded"


class InvalidRequest(EngineError):
    """The request itself can never be served as it is."""

    code = "invalid_request"


class TooLarge(InvalidRequest):
    """More items than the queue can ever hold."""

    code = "too_many_items"


class BackendFailed(EngineError):
    """The backend raised while running the request's batch (its batch-mates fail with it, no one else)."""

    code = "inference_failed"


class Cancelled(EngineError):
    """The request's caller gave up (the workers layout reports it so every request gets one answer)."""

    code = "client_closed_request"


KINDS: dict[str, type[EngineError]] = {cls.__name__: cls for cls in (
    EngineError, Overloaded, NotServing, DeadlineExceeded, InvalidRequest, TooLarge, BackendFailed, Cancelled)}


def to_wire(e: EngineError) -> dict:
    return {"kind": type(e).__name__, "code": e.code, "message": e.message, "retry_after_s": e.retry_after_s}


def from_wire(d: dict) -> EngineError:
    return KINDS.get(d.get("kind", ""), EngineError)(d["message"], code=d["code"], retry_after_s=d.get("retry_after_s"))
