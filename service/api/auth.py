"""Optional Bearer API keys. Health, metrics and docs stay open; the ``/v1`` API needs a key when
any is configured. Keys are compared in constant time, all of them, so timing reveals nothing.

A pure ASGI middleware rather than a FastAPI dependency: it answers before routing and before any
body is read, and it costs the hot path nothing when no keys are set (FastAPI's dependency
resolution was a measurable share of a small encode's CPU; see bench/request_overhead.py).
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_body
from service.api.middleware import send_json

PROTECTED_PREFIX = "/v1/"
SECURITY_SCHEME = {"bearer": {"type": "http", "scheme": "bearer",
                              "description": "an API key, when the server has VQTOK_API_KEYS set"}}


def key_matches(token: bytes, keys: list[bytes]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token, key)
    return ok


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class ApiKeyAuth:
    """401 (with ``WWW-Authenticate: Bearer``) for ``/v1`` requests without a valid key."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            token = bearer_token(scope)
            if token is None or not key_matches(token, self.keys):
                return await send_json(send, 401, error_body(
                    "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"),
                    headers={"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


def document_security(schema: dict) -> None:
    """Mark every ``/v1`` operation in an OpenAPI schema as needing the bearer key."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEME)
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(PROTECTED_PREFIX):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
