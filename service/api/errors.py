"""Every error leaves the service as ``{"error": {"code", "message"}}``, never as a stack trace.

This is the one place where errors become HTTP statuses: the HTTP layer's own ``ApiError``s carry
theirs, and the domain errors of the core (``service.engine.errors``, ``service.bundle.intake``'s
``ImageRefused``) are mapped here, by ``http_error``.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.bundle.intake import ImageRefused
from service.engine import errors as engine
from service.engine import models

log = logging.getLogger("vqtok.service")


class ApiError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a message for people."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.status = status or self.status
        self.headers = headers


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class RequestTimeout(ApiError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class Overloaded(ApiError):
    status, code = 503, "overloaded"


class NotReady(ApiError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ApiError):
    status, code = 504, "deadline_exceeded"


class InferenceFailed(ApiError):
    status, code = 500, "inference_failed"


class ClientGone(ApiError):
    status, code = 499, "client_closed_request"


# Engine errors -> statuses (the most specific class first: TooLarge is an InvalidRequest).
ENGINE_STATUS: tuple[tuple[type[engine.EngineError], int], ...] = (
    (models.ModelNotFound, 404), (models.VersionMismatch, 409), (engine.Overloaded, 503), (engine.NotServing, 503),
    (engine.DeadlineExceeded, 504), (engine.TooLarge, 413), (engine.InvalidRequest, 422), (engine.Cancelled, 499),
    (engine.BackendFailed, 500), (engine.EngineError, 500))


def http_error(exc: Exception) -> ApiError:
    """A domain error as the ``ApiError`` the client gets; an ``ApiError`` as it is."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageRefused):  # its status is part of the contract (intake.REFUSALS)
        return ApiError(exc.message, code=exc.code, status=exc.status)
    if isinstance(exc, engine.EngineError):
        status = next(s for cls, s in ENGINE_STATUS if isinstance(exc, cls))
        headers = {"Retry-After": str(int(exc.retry_after_s))} if exc.retry_after_s is not None else None
        return ApiError(exc.message, code=exc.code, status=status, headers=headers)
    raise TypeError(f"not a domain error: {exc!r}")


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def field_path(loc: tuple) -> str:
    """('items', 0, 'top') -> 'items[0].top' (the field a client has to fix)."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """Turn pydantic errors into (code, message); malformed JSON is a 400, the rest 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "invalid_json", "request body is not valid JSON"
    parts = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{field_path(tuple(e.get('loc', ())))}: {msg}")
    if len(errors) > 3:
        parts.append(f"... and {len(errors) - 3} more")
    return "invalid_request", "; ".join(parts)


def unprocessable_from(exc: ValidationError) -> ApiError:
    code, message = validation_message(exc.errors(include_url=False, include_context=False))
    if code == "invalid_json":
        return BadRequest(message, code=code)
    return Unprocessable(message, code=code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    @app.exception_handler(ImageRefused)
    @app.exception_handler(engine.EngineError)
    async def _api_error(request: Request, exc: Exception) -> JSONResponse:
        e = http_error(exc)
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = validation_message(list(exc.errors()))
        return error_response(400 if code == "invalid_json" else 422, code, message)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left while its body was being read: nobody reads this answer, and it is not our fault.
        return error_response(ClientGone.status, ClientGone.code, "the client closed the connection")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged here with its traceback; the client only learns that it was our fault.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
