"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer bodies and break disconnect
detection): the request body guard, and per-request metrics. The API-key check is in ``auth``."""
from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import Overloaded, PayloadTooLarge, RequestTimeout, error_body
from service.engine.metrics import Metrics


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``scope["path"]`` without the mount point / ``root_path`` (as
    Starlette's router strips it), so checks see the same path the router does."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class BytesInFlight:
    """Request body bytes held by all requests at once, against a cap (slow or huge bodies from
    many clients cannot pile up in memory). A request holds what it declared or has received
    until it is answered."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.held = limit, retry_after_s, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise Overloaded("too many request bytes in flight on this server; retry later",
                             headers={"Retry-After": str(self.retry_after_s)})
        self.held += n


class BodyGuard:
    """Bounds every request body in size (413: at once from Content-Length, or while streaming),
    in time (408 once ``timeout_s`` has passed since the request arrived and the body is still
    incomplete: a slow or stalled client) and, across requests, in bytes held at once (503)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, in_flight: BytesInFlight):
        self.app, self.max_bytes, self.timeout_s, self.in_flight = app, max_bytes, timeout_s, in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = max(0, int(value))
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    return await send_json(send, 413, error_body(
                        "payload_too_large", f"request body exceeds {self.max_bytes} bytes"))
                break
        held = 0
        try:
            if declared:
                self.in_flight.take(declared)
                held = declared
        except Overloaded as e:
            return await send_json(send, e.status, error_body(e.code, e.message), e.headers)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        seen, complete = 0, False

        async def guarded() -> Message:
            nonlocal seen, held, complete
            if complete:  # the body is in: later receives only wait for a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    # Raised inside the route while it reads the body; the ApiError handler answers.
                    raise PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
                if seen > held:
                    self.in_flight.take(seen - held)
                    held = seen
            return message

        try:
            await self.app(scope, guarded, send)
        finally:
            self.in_flight.held -= held


class RequestMetrics:
    """Counts requests by endpoint (the route's path) and status, and times them.

    The endpoint label is the request path when it is one of ``endpoints`` (the API's routes, all
    static paths), so requests answered before routing (401, 413) still count under their
    endpoint; anything else is "unmatched", which keeps the label set bounded.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self._children: dict[tuple[str, int], tuple] = {}  # label lookups cost more than the increments

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        children = self._children.get((endpoint, status))
        if children is None:
            children = (self.metrics.requests.labels(endpoint, str(status)), self.metrics.latency.labels(endpoint))
            self._children[(endpoint, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 499  # nginx's "client closed request": stays if no response was ever started

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status = 500
            raise
        finally:
            path = route_path(scope)
            self._observe(path if path in self.endpoints else "unmatched", status, time.perf_counter() - start)


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})


TICKETS = "vqtok.tickets"  # the scope key holding what a request holds: pixel tickets, model leases


class ReleaseTickets:
    """Releases what a request holds (``scope[TICKETS]``: pixel tickets, its model's lease) once it has
    been answered, or has failed, or was cancelled."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            for ticket in scope.get(TICKETS, ()):
                ticket.release()
