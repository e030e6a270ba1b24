"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer bodies and break disconnect
detection): a request body limit, and per-request metrics. The API-key check is in ``auth``."""
from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import PayloadTooLarge, error_body
from service.api.metrics import Metrics


class BodyLimit:
    """413 for bodies over ``max_bytes``: at once from Content-Length, or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await send_json(send, 413, error_body(
                        "payload_too_large", f"request body exceeds {self.max_bytes} bytes"))
                break
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the route while it reads the body; the ApiError handler answers.
                    raise PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


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
            endpoint = scope["path"] if scope["path"] in self.endpoints else "unmatched"
            self._observe(endpoint, status, time.perf_counter() - start)


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})
