"""Optional Bearer API keys. When any key is configured, every path needs one except an explicit
open list (health probes and the docs; ``/metrics`` too unless ``VQTOK_METRICS_AUTH``). Deny by
default: a path the list does not name exactly, under whatever mount point or ``root_path``, is
authenticated, so no prefix, trailing slash or unknown path gets around the check. Keys are
compared in constant time, all of them, so timing reveals nothing.

A pure ASGI middleware rather than a FastAPI dependency: it answers before routing and before any
body is read, and it costs the hot path nothing when no keys are set (FastAPI's dependency
resolution was a measurable share of a small encode's CPU; see bench/request_overhead.py).
"""
from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_body
from service.api.middleware import route_path, send_json

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
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


class ApiKeyAuth:
    """401 (with ``WWW-Authenticate: Bearer``) for requests without a valid key, except on
    ``open_paths`` (exact) and under ``open_prefixes`` (static files)."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: Iterable[str], open_prefixes: tuple[str, ...] = (),
                 admin_keys: list[str] = (), admin_prefix: str = "/admin"):
        if any(not k.strip() for k in [*keys, *admin_keys]):  # never let "" match a bare "Bearer"
            raise ValueError("API keys must not be empty or whitespace")
        self.app, self.keys = app, [k.encode() for k in keys]
        self.open_paths, self.open_prefixes = frozenset(open_paths), open_prefixes
        # The admin API has its own key and never takes an API key (nor is it open without keys).
        self.admin_keys, self.admin_prefix = [k.encode() for k in admin_keys], admin_prefix

    def _is_admin(self, path: str) -> bool:
        return path == self.admin_prefix or path.startswith(self.admin_prefix + "/")

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or (bool(self.open_prefixes) and path.startswith(self.open_prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._is_admin(route_path(scope)):
            token = bearer_token(scope)
            if not self.admin_keys or token is None or not key_matches(token, self.admin_keys):
                return await send_json(send, 401, error_body(
                    "unauthorized", "the admin API needs the admin key (Authorization: Bearer <VQTOK_ADMIN_KEY>)"),
                    headers={"www-authenticate": "Bearer"})
            return await self.app(scope, receive, send)
        if self.keys and scope["type"] == "http" and not self.is_open(route_path(scope)):
            token = bearer_token(scope)
            if token is None or not key_matches(token, self.keys):
                return await send_json(send, 401, error_body(
                    "unauthorized", "a valid API key is required (Authorization: Bearer <key>)"),
                    headers={"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


def document_security(schema: dict, open_paths: Iterable[str]) -> None:
    """Mark every OpenAPI operation outside ``open_paths`` as needing the bearer key."""
    open_paths = frozenset(open_paths)
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEME)
    for path, operations in schema.get("paths", {}).items():
        if path not in open_paths:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
