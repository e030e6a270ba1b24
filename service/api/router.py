"""HTTP: routes, request parsing and validation. No inference here: the engine does that.

Bodies are read by hand rather than by FastAPI parameters so that every content type gets the
same 415 and one endpoint can take both multipart and JSON. (The API key is checked before
routing, by ``service.auth.ApiKeyAuth``.) ``openapi_extra`` documents the bodies with their typed schemas.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Any, get_args

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.api.call import CODE_BYTES, PNG_B64_BYTES_PER_PIXEL, Call
from service.api.errors import PayloadTooLarge, Unprocessable, error_body
from service.api.schemas import (
    DecodeRequest,
    DecodeResponse,
    EncodeJsonRequest,
    EncodeResponse,
    ErrorResponse,
    Health,
    LoadRequest,
    ModelInfo,
    ModelList,
    ReconstructResponse,
    SampleRequest,
    SampleResponse,
)
from service.api.state import ServiceState
from service.bundle import Level
from service.bundle.images import psnr, to_png
from service.bundle.intake import Fit
from service.bundle.wire import GridFormat, Grids, InvalidCodes, check_item, grid_to_wire
from service.engine.protocol import InferenceEngine, SampleItem
from service.runtime.codelength import uniform_bits

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 409, 413, 415, 422, 500, 503, 504)}


def _json_body(model: type[BaseModel]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


class QueryChoice:
    """A query parameter with a fixed set of string values (a ``Literal``), read straight from the
    query string, not through FastAPI's dependency resolution, which showed up in every small
    encode's CPU profile. ``openapi`` documents it the way FastAPI would."""

    def __init__(self, name: str, choices: Any, default: str, description: str):
        self.name, self.allowed, self.default = name, get_args(choices), default
        self.openapi = {"name": name, "in": "query", "required": False, "description": description,
                        "schema": {"type": "string", "enum": list(self.allowed), "default": default}}

    def __call__(self, request: Request) -> Any:
        value = request.query_params.get(self.name, self.default)
        if value not in self.allowed:
            raise Unprocessable(f"{self.name}: must be one of {', '.join(map(repr, self.allowed))}, got {value!r}")
        return value


FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}


class QueryFlag:
    """A boolean query parameter (``true``/``false``, ``1``/``0``), read the same direct way."""

    def __init__(self, name: str, description: str):
        self.name = name
        self.openapi = {"name": name, "in": "query", "required": False, "description": description,
                        "schema": {"type": "boolean", "default": False}}

    def __call__(self, request: Request) -> bool:
        value = request.query_params.get(self.name)
        if value is None:
            return False
        if value.lower() not in FLAG_VALUES:
            raise Unprocessable(f"{self.name}: must be true or false, got {value!r}")
        return FLAG_VALUES[value.lower()]


FIT = QueryChoice("fit", Fit, "center_crop", "center_crop: resize the shorter side to the model's size and "
                  "crop the centre; none: native size (sides multiples of the coarsest stride)")
MODEL = {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "which loaded bundle: a name, or name@version to pin one version (GET /v1/models); "
                        "default: the first bundle"}
GRID_FORMAT = QueryChoice("format", GridFormat, "list", "list: nested JSON lists; b64: compact uint16 grids")
BITS = QueryFlag("bits", "also answer each item's code length in bits: uniform (log2 K per code) and under the "
                 "learned priors (−Σ log2 p(code | earlier codes), the PixelCNNs' teacher-forced pass), per level "
                 "and in total; prior is null for a bundle without priors")
INCLUDE_INPUT = QueryFlag("include_input", "also answer the input as the model saw it (after the fit), as a "
                          "base64 PNG: the image the PSNR is measured against")

IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/EncodeJsonRequest"}},
}}}
EXTRA_SCHEMAS = [EncodeJsonRequest, DecodeRequest, SampleRequest, LoadRequest]  # added to components by the app

health = APIRouter(tags=["health"])
v1 = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)


def get_state(request: Request) -> ServiceState:
    return request.app.state.vqtok


def fast_json(body: dict[str, Any], status: int = 200) -> Response:
    # The bodies are plain lists/str/int already: no response-model validation, and orjson is ~8x
    # faster than json on the nested code lists.
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def decoded_pixels(bundle, codes: list[Grids]) -> int:
    name, level = next(iter(bundle.levels.items()))
    return sum(c[name].size * level.stride ** 2 for c in codes)


def codes_per_pixel(bundle) -> float:
    return sum(1 / lv.stride ** 2 for lv in bundle.levels.values())


def validate_codes(req: DecodeRequest, call: Call) -> list[Grids]:
    if len(req.items) > call.settings.max_items:
        raise PayloadTooLarge(f"{len(req.items)} items; at most {call.settings.max_items} per request",
                              code="too_many_items")
    try:
        return [check_item(item, call.bundle.levels, call.settings.max_native_pixels, f"items[{i}]")
                for i, item in enumerate(req.items)]
    except InvalidCodes as e:
        raise Unprocessable(e.message, code=e.code) from None


def _finite(db: np.ndarray) -> float | None:
    """JSON has no infinity: identical images (infinite PSNR) answer null."""
    return float(db) if np.isfinite(db) else None


def bits_json(levels: dict[str, Level], codes: Grids, prior: dict[str, float] | None) -> dict[str, Any]:
    per_level = {name: {"uniform": uniform_bits(*codes[name].shape, level.codebook_size),
                        "prior": None if prior is None else prior[name]} for name, level in levels.items()}
    return {"uniform": sum(v["uniform"] for v in per_level.values()),
            "prior": None if prior is None else sum(prior.values()), "levels": per_level}


async def prior_bits_if(asked: bool, engine: InferenceEngine, codes: list[Grids], deadline: float) -> list[Any]:
    """Per item, {level: bits} under the priors (their own batcher), or None when not asked or no priors."""
    prior = await engine.code_bits(codes, deadline) if asked else None
    return prior if prior is not None else [None] * len(codes)


async def encode_scored(call: Call, images: list[np.ndarray], bits: bool) -> tuple[list[Grids], list[Any]]:
    codes = await call.engine.encode(images, call.deadline)
    return codes, await prior_bits_if(bits, call.engine, codes, call.deadline)


async def encode_decode(call: Call, images: list[np.ndarray], bits: bool
                        ) -> tuple[list[Grids], list[np.ndarray], list[Any]]:
    engine, deadline = call.engine, call.deadline
    codes = await engine.encode(images, deadline)
    if not bits:
        return codes, await engine.decode(codes, deadline), [None] * len(codes)
    # Decoding and scoring are separate batchers: run them at once.
    recon, prior = await asyncio.gather(engine.decode(codes, deadline), prior_bits_if(True, engine, codes, deadline))
    return codes, recon, prior


def add_bits(items: list[dict[str, Any]], levels: dict[str, Level], codes: list[Grids], prior: list[Any]) -> None:
    for item, c, p in zip(items, codes, prior):
        item["bits"] = bits_json(levels, c, p)


def sample_items(req: SampleRequest, bundle) -> list[SampleItem]:
    """The request's samples, its values checked here, before they join a batch: one bad value must
    never fail its batch-mates."""
    k_max = max(lv.codebook_size for lv in bundle.levels.values())
    if req.top_k is not None and req.top_k > k_max:
        raise Unprocessable(f"top_k: must be in 1..{k_max} (the codebook size), got {req.top_k}")
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return [SampleItem(seed, req.n, i, req.temperature, req.top_k or 0) for i in range(req.n)]


# --- endpoints ---------------------------------------------------------------------------------
@v1.post("/encode", response_model=EncodeResponse,
         openapi_extra={**IMAGES_BODY, "parameters": [FIT.openapi, GRID_FORMAT.openapi, BITS.openapi, MODEL]},
         summary="Images to code grids")
async def encode(request: Request):
    fit, fmt, bits = FIT(request), GRID_FORMAT(request), BITS(request)
    call = Call(request)
    images = await call.images(fit, CODE_BYTES * codes_per_pixel(call.bundle))
    codes, prior = await call.run(encode_scored(call, images, bits))
    version = call.model.version
    items = [{"height": im.shape[0], "width": im.shape[1], "version": version,
              **{k: grid_to_wire(g, fmt) for k, g in c.items()}} for im, c in zip(images, codes)]
    if bits:
        add_bits(items, call.bundle.levels, codes, prior)
    return fast_json(call.answer(items=items))


@v1.post("/decode", response_model=DecodeResponse,
         openapi_extra={"requestBody": _json_body(DecodeRequest), "parameters": [MODEL]},
         responses={200: {"content": {"image/png": {}},
                          "description": "JSON, or the PNG itself for one item with Accept: image/png"}},
         summary="Code grids to images")
async def decode(request: Request):
    call = Call(request, by_codes=True)
    req = await call.json(DecodeRequest, call.settings.max_json_bytes)
    call.pick(req.version)  # codes made by another version than the one named: 409
    codes = validate_codes(req, call)
    pixels = decoded_pixels(call.bundle, codes)
    call.admit(pixels, pixels * PNG_B64_BYTES_PER_PIXEL, f"{len(codes)} decoded images")
    images = await call.run(call.engine.decode(codes, call.deadline))
    if len(images) == 1 and "image/png" in request.headers.get("accept", ""):
        return Response(to_png(images[0], call.settings.png_compress_level), media_type="image/png")
    return fast_json(call.answer(images=await call.pngs(images)))


@v1.post("/reconstruct", response_model=ReconstructResponse,
         openapi_extra={**IMAGES_BODY, "parameters": [FIT.openapi, BITS.openapi, INCLUDE_INPUT.openapi, MODEL]},
         summary="Images through encode and decode, with PSNR")
async def reconstruct(request: Request):
    fit, bits, include_input = FIT(request), BITS(request), INCLUDE_INPUT(request)
    call = Call(request)
    images = await call.images(fit, PNG_B64_BYTES_PER_PIXEL * (2 if include_input else 1), hold=2)
    codes, recon, prior = await call.run(encode_decode(call, images, bits))
    pngs = await call.pngs(recon)
    items = [{"height": a.shape[0], "width": a.shape[1], "image": png, "psnr": _finite(psnr(a, b))}
             for a, b, png in zip(images, recon, pngs)]
    if bits:
        add_bits(items, call.bundle.levels, codes, prior)
    if include_input:
        for item, png in zip(items, await call.pngs(images)):
            item["input"] = png
    return fast_json(call.answer(items=items))


@v1.post("/sample", response_model=SampleResponse,
         openapi_extra={"requestBody": _json_body(SampleRequest), "parameters": [MODEL]},
         summary="Sample images from the priors")
async def sample(request: Request):
    call = Call(request)
    req = await call.json(SampleRequest, call.settings.max_json_bytes)
    items = sample_items(req, call.bundle)
    pixels = req.n * call.bundle.image_size ** 2
    call.admit(pixels, pixels * PNG_B64_BYTES_PER_PIXEL, f"{req.n} samples")
    results = await call.run(call.engine.sample(items, call.deadline))
    body = call.answer(seed=items[0].seed, images=await call.pngs([im for im, _ in results]), codes=None)
    if req.return_codes:
        body["codes"] = [{"version": call.model.version, **{k: grid_to_wire(g, req.format) for k, g in codes.items()}}
                         for _, codes in results]
    return fast_json(body)


@v1.get("/model", response_model=ModelInfo, summary="A bundle's manifest summary and the active provider",
        openapi_extra={"parameters": [MODEL]})
async def model(request: Request):
    st = get_state(request)
    st.require_ready()
    return fast_json(st.models.resolve(request.query_params.get("model") or None).info)


@v1.get("/models", response_model=ModelList, summary="Every loaded bundle: name, version, levels, readiness")
async def models(request: Request):
    st = get_state(request)
    return fast_json({"default": st.models.default_name, "models": [m.summary() for m in st.models]})


@health.get("/healthz", response_model=Health, summary="The process is up")
async def healthz():
    return fast_json({"status": "ok"})


@health.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}},
            summary="The model is loaded and warmed up")
async def readyz(request: Request):
    st = get_state(request)
    if not st.ready.is_set():
        return JSONResponse(error_body("not_ready", "the model is still warming up"), status_code=503)
    problem = st.problem()
    if problem is not None:  # a stuck or dead batcher: take this instance out of rotation
        return JSONResponse(error_body("unhealthy", problem), status_code=503)
    return fast_json({"status": "ready"})


@health.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request):
    return Response(generate_latest(get_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
