"""Optional Bearer API keys. Health, metrics and docs stay open; the ``/v1`` API needs a key when
any is configured. Keys are compared in constant time, all of them, so timing reveals nothing."""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized

# auto_error=False: we raise our own error shape; the scheme still shows up in /docs.
bearer = HTTPBearer(auto_error=False, description="an API key, when the server has VQTOK_API_KEYS set")


def key_matches(token: str, keys: list[bytes]) -> bool:
    given = token.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


async def require_api_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not key_matches(credentials.credentials, keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
