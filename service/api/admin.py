"""Swaps without downtime: ``POST /admin/models`` loads a bundle into the running server (verified,
warmed up, then listed) and ``DELETE /admin/models/{name@id}`` unloads one version (off the list at
once, stopped after its running requests finish). Behind their own key, ``VQTOK_ADMIN_KEY``: every
/admin path answers 401 without it, and API keys never open it. One-process layout only: in the workers layout each front end
would have to learn of the change, so there a swap is a restart (501 says so)."""
from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.call import read_json
from service.api.errors import ApiError
from service.api.schemas import LoadRequest, ModelList, ModelSummary
from service.api.state import ServiceState
from service.bundle import Bundle, BundleError
from service.engine.host import release_memory
from service.engine.models import BadBundle

admin = APIRouter(prefix="/admin", tags=["admin"])
PREFIX = "/admin"


def _state(request: Request) -> ServiceState:
    return request.app.state.vqtok


def _loader(request: Request):
    loader = request.app.state.loader
    if not loader.in_process:
        raise ApiError("loading and unloading at run time needs the one-process layout (VQTOK_WORKERS=1); in the "
                       "workers layout, restart with the new --model", code="not_implemented", status=501)
    return loader


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@admin.post("/models", status_code=201, response_model=ModelSummary, summary="Load a bundle (verified, warmed, listed)",
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/LoadRequest"}}}}})
async def load_model(request: Request):
    loader = _loader(request)
    req = await read_json(request, _state(request), LoadRequest)
    try:
        bundle = await asyncio.to_thread(Bundle.load, req.path)  # every file's sha256 checked
    except (BundleError, OSError) as e:
        raise BadBundle(f"refusing the bundle: {e}") from None
    model = await loader.load(req.name, bundle)
    return _json(model.summary(), 201)


@admin.delete("/models/{ref}", response_model=ModelList, summary="Unload one version (name@id)")
async def unload_model(request: Request, ref: str):
    _loader(request)
    st = _state(request)
    model = await st.models.unload(ref, st.settings.request_timeout_s + 5)
    st.metrics.forget(model.ref)
    st.metrics.unwatch_backend(model.ref)
    del model
    await asyncio.to_thread(release_memory)
    return _json({"default": st.models.default_name, "models": [m.summary() for m in st.models]})
