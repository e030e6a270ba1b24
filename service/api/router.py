"""HTTP: routes, request parsing and validation. No inference here: the engine does that.

Bodies are read by hand rather than by FastAPI parameters so that every content type gets the
same 415 and one endpoint can take both multipart and JSON. (The API key is checked before
routing, by ``service.auth.ApiKeyAuth``.) ``openapi_extra`` documents the bodies with their typed schemas.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Awaitable
from typing import Any, TypeVar, get_args

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from service.api.decoding import Fit, Probe, decode_image, probe_image
from service.api.engine import Codes, Engine, SampleItem
from service.api.errors import (
    ClientGone,
    DeadlineExceeded,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
    error_body,
    unprocessable_from,
)
from service.api.multipart import read_multipart
from service.api.schemas import (
    DecodeRequest,
    DecodeResponse,
    EncodeJsonRequest,
    EncodeResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    ReconstructResponse,
    SampleRequest,
    SampleResponse,
)
from service.api.state import ServiceState
from service.bundle import Level
from service.bundle.images import psnr, to_png
from service.bundle.wire import GridFormat, check_range, grid_to_wire
from service.runtime.codelength import uniform_bits

M = TypeVar("M", bound=BaseModel)

# Decoding or PNG-encoding more pixels, or parsing more JSON, than this inline would stall the
# event loop; beyond it, the work pool. Decided by header pixels, never by compressed bytes: a
# 16 kB PNG can hold 4096x4096 solid pixels.
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 64 * 64 * 16
# Upper bounds of an answer's size, checked before any work (VQTOK_MAX_RESPONSE_BYTES): a base64
# PNG of incompressible pixels takes 4 bytes a pixel; a code in a JSON list up to 5 ("4095,").
PNG_B64_BYTES_PER_PIXEL = 4
CODE_BYTES = 5

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 408, 413, 415, 422, 500, 503, 504)}


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
EXTRA_SCHEMAS = [EncodeJsonRequest, DecodeRequest, SampleRequest]  # added to components by the app

health = APIRouter(tags=["health"])
v1 = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)


def get_state(request: Request) -> ServiceState:
    return request.app.state.vqtok


def fast_json(body: dict[str, Any], status: int = 200) -> Response:
    # The bodies are plain lists/str/int already: no response-model validation, and orjson is ~8x
    # faster than json on the nested code lists.
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _unstoppable(stop, fn, *args):
    return fn(*args)


async def offload(st: ServiceState, heavy: bool, fn, *args):
    """Run ``fn`` in the work pool when it is heavy, inline when a thread hop would cost more."""
    return await st.pool.run(_unstoppable, fn, *args) if heavy else fn(*args)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, but cancel it (its jobs leave the queue) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client left (or we are being cancelled): drop the queued jobs
    if not task.done() or task.cancelled():
        raise ClientGone("the client closed the connection")
    return task.result()


async def within(request: Request, work: Awaitable[Any], deadline: float) -> Any:
    """``unless_client_gone``, and 504 past the request's deadline."""
    try:
        async with asyncio.timeout_at(deadline):
            return await unless_client_gone(request, work)
    except TimeoutError:
        raise DeadlineExceeded("the request did not finish within its deadline") from None


def check_answer(st: ServiceState, nbytes: float, what: str) -> None:
    limit = st.settings.max_response_bytes
    if nbytes > limit:
        raise PayloadTooLarge(f"{what}: the answer could take {int(nbytes)} bytes, over the limit of {limit} "
                              "(VQTOK_MAX_RESPONSE_BYTES); send fewer or smaller items", code="response_too_large")


# --- request bodies ----------------------------------------------------------------------------
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _validate_json(stop, model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise unprocessable_from(e) from None


async def read_json(request: Request, model: type[M], st: ServiceState, limit: int | None = None) -> M:
    """The body validated as ``model``: inline when small, in the work pool when large (a 32 MB list of
    codes takes seconds to parse). ``limit`` caps the body tighter than the body limit (413)."""
    if not _is_json(_media_type(request)):
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {_media_type(request) or 'none'!r}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if limit is not None and len(body) > limit:
            raise PayloadTooLarge(f"JSON body over {limit} bytes (VQTOK_MAX_JSON_BYTES); send code grids in the "
                                  "compact b64 form, or fewer items per request")
    if len(body) <= INLINE_BYTES:
        return _validate_json(None, model, bytes(body))
    return await st.pool.run(_validate_json, model, bytes(body))


async def read_image_blobs(request: Request, st: ServiceState) -> list[bytes | bytearray]:
    media_type, max_items = _media_type(request), st.settings.max_items
    blobs: list[bytes | bytearray] = []
    if media_type == "multipart/form-data":
        parts = await read_multipart(request.stream(), request.headers["content-type"], max_items + 16)
        for i, part in enumerate(p for p in parts if p.name == "images"):
            if part.filename is None:
                raise Unprocessable(f"images[{i}]: must be a file part (filename=...), not a text field")
            blobs.append(part.data)
    elif _is_json(media_type):
        req = await read_json(request, EncodeJsonRequest, st)
        for i, text in enumerate(req.images):
            if text.startswith("data:") and "," in text:  # tolerate data URLs
                text = text.split(",", 1)[1]
            try:
                blobs.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise Unprocessable(f"images[{i}]: not valid base64", code="invalid_base64") from None
    else:
        raise UnsupportedMediaType("send images as multipart/form-data parts named 'images', or as "
                                   f"application/json {{\"images\": [base64, ...]}}; got {media_type or 'none'!r}")
    if not blobs:
        raise Unprocessable("images: at least one image is required")
    if len(blobs) > max_items:
        raise PayloadTooLarge(f"{len(blobs)} images; at most {max_items} per request", code="too_many_items")
    return blobs


def decode_all(stop, probes: list[Probe], fit: Fit, st: ServiceState) -> list[np.ndarray]:
    out = []
    for p in probes:
        if stop is not None and stop.is_set():  # the request was cancelled: no more decoding for it
            raise ClientGone("the request was cancelled while its images were decoded")
        out.append(decode_image(p, fit, st.limits))
    return out


async def read_images(request: Request, st: ServiceState, fit: Fit, deadline: float,
                      answer_bytes_per_pixel: float, hold: int = 1) -> list[np.ndarray]:
    """The request's images, decoded as admitted work: every header is checked first, the answer's
    size bound too, then the request holds its pixels (``hold`` copies of the arrays: reconstruct
    keeps its inputs and outputs) and decodes inline only when the header pixels are few."""
    blobs = await read_image_blobs(request, st)
    probes = [probe_image(b, fit, st.limits, f"images[{i}]") for i, b in enumerate(blobs)]
    header = sum(p.pixels for p in probes)
    arrays = sum(st.limits.output_pixels(p.pixels, fit) for p in probes)
    check_answer(st, arrays * answer_bytes_per_pixel, f"{len(probes)} images")
    ticket = st.budget.admit(request.scope, max(header, arrays * hold), f"{len(probes)} images")
    if header <= INLINE_PIXELS:
        images = decode_all(None, probes, fit, st)
    else:
        images = await within(request, st.pool.run(decode_all, probes, fit, st), deadline)
    ticket.resize(arrays * hold, f"{len(probes)} images")
    return images


def decoded_pixels(st: ServiceState, codes: list[Codes]) -> int:
    name, level = next(iter(st.bundle.levels.items()))
    return sum(c[name].size * level.stride ** 2 for c in codes)


def codes_per_pixel(st: ServiceState) -> float:
    return sum(1 / lv.stride ** 2 for lv in st.bundle.levels.values())


def validate_codes(req: DecodeRequest, st: ServiceState) -> list[Codes]:
    if len(req.items) > st.settings.max_items:
        raise PayloadTooLarge(f"{len(req.items)} items; at most {st.settings.max_items} per request",
                              code="too_many_items")
    levels = st.bundle.levels
    out = []
    for i, item in enumerate(req.items):
        unknown = sorted(set(item) - set(levels))
        if unknown:
            raise Unprocessable(f"items[{i}].{unknown[0]}: not a level of this bundle (its levels: "
                                f"{', '.join(levels)})", code="invalid_request")
        codes: Codes = {}
        size: tuple[int, int] | None = None
        first = None
        for name, level in levels.items():
            field = f"items[{i}].{name}"
            if name not in item:
                raise Unprocessable(f"{field}: field required (one grid per level: {', '.join(levels)})",
                                    code="invalid_request")
            grid = item[name]
            problem = check_range(grid, level.codebook_size)
            if problem:
                raise Unprocessable(f"{field}: {problem}", code="invalid_codes")
            implied = (grid.shape[0] * level.stride, grid.shape[1] * level.stride)
            if size is None:
                size, first = implied, (name, grid.shape)
            elif implied != size:
                want = [size[0] // level.stride, size[1] // level.stride]
                raise Unprocessable(f"{field}: shape {list(grid.shape)} does not match items[{i}].{first[0]} "
                                    f"{list(first[1])} (expected {want})", code="invalid_codes")
            codes[name] = grid
        if size[0] * size[1] > st.settings.max_native_pixels:
            raise Unprocessable(f"items[{i}]: decodes to {size[1]}x{size[0]}, over the limit of "
                                f"{st.settings.max_native_pixels} pixels", code="invalid_codes")
        out.append(codes)
    return out


def _finite(db: np.ndarray) -> float | None:
    """JSON has no infinity: identical images (infinite PSNR) answer null."""
    return float(db) if np.isfinite(db) else None


def bits_json(levels: dict[str, Level], codes: Codes, prior: dict[str, float] | None) -> dict[str, Any]:
    per_level = {name: {"uniform": uniform_bits(*codes[name].shape, level.codebook_size),
                        "prior": None if prior is None else prior[name]} for name, level in levels.items()}
    return {"uniform": sum(v["uniform"] for v in per_level.values()),
            "prior": None if prior is None else sum(prior.values()), "levels": per_level}


async def prior_bits_if(asked: bool, engine: Engine, codes: list[Codes], deadline: float) -> list[Any]:
    """Per item, {level: bits} under the priors (their own batcher), or None when not asked or no priors."""
    prior = await engine.code_bits(codes, deadline) if asked else None
    return prior if prior is not None else [None] * len(codes)


async def encode_scored(engine: Engine, images: list[np.ndarray], deadline: float,
                        bits: bool) -> tuple[list[Codes], list[Any]]:
    codes = await engine.encode(images, deadline)
    return codes, await prior_bits_if(bits, engine, codes, deadline)


def add_bits(items: list[dict[str, Any]], levels: dict[str, Level], codes: list[Codes], prior: list[Any]) -> None:
    for item, c, p in zip(items, codes, prior):
        item["bits"] = bits_json(levels, c, p)


def encode_pngs(images: list[np.ndarray], level: int) -> list[str]:
    return [base64.b64encode(to_png(im, level)).decode("ascii") for im in images]


async def pngs_b64(images: list[np.ndarray], st: ServiceState) -> list[str]:
    heavy = sum(im.shape[0] * im.shape[1] for im in images) > INLINE_PIXELS
    return await offload(st, heavy, encode_pngs, images, st.settings.png_compress_level)


# --- endpoints ---------------------------------------------------------------------------------
@v1.post("/encode", response_model=EncodeResponse,
         openapi_extra={**IMAGES_BODY, "parameters": [FIT.openapi, GRID_FORMAT.openapi, BITS.openapi]},
         summary="Images to code grids")
async def encode(request: Request):
    fit, fmt, bits = FIT(request), GRID_FORMAT(request), BITS(request)
    st = get_state(request)
    engine = st.require_ready()
    deadline = st.deadline()
    images = await read_images(request, st, fit, deadline, CODE_BYTES * codes_per_pixel(st))
    codes, prior = await unless_client_gone(request, encode_scored(engine, images, deadline, bits))
    items = [{"height": im.shape[0], "width": im.shape[1], **{k: grid_to_wire(g, fmt) for k, g in c.items()}}
             for im, c in zip(images, codes)]
    if bits:
        add_bits(items, st.bundle.levels, codes, prior)
    return fast_json({"model": st.bundle.name, "items": items})


@v1.post("/decode", response_model=DecodeResponse, openapi_extra={"requestBody": _json_body(DecodeRequest)},
         responses={200: {"content": {"image/png": {}},
                          "description": "JSON, or the PNG itself for one item with Accept: image/png"}},
         summary="Code grids to images")
async def decode(request: Request):
    st = get_state(request)
    engine = st.require_ready()
    deadline = st.deadline()
    req = await read_json(request, DecodeRequest, st, st.settings.max_json_bytes)
    codes = validate_codes(req, st)
    pixels = decoded_pixels(st, codes)
    check_answer(st, pixels * PNG_B64_BYTES_PER_PIXEL, f"{len(codes)} items")
    st.budget.admit(request.scope, pixels, f"{len(codes)} decoded images")
    images = await unless_client_gone(request, engine.decode(codes, deadline))
    if len(images) == 1 and "image/png" in request.headers.get("accept", ""):
        return Response(to_png(images[0], st.settings.png_compress_level), media_type="image/png")
    return fast_json({"model": st.bundle.name, "images": await pngs_b64(images, st)})


@v1.post("/reconstruct", response_model=ReconstructResponse,
         openapi_extra={**IMAGES_BODY, "parameters": [FIT.openapi, BITS.openapi, INCLUDE_INPUT.openapi]},
         summary="Images through encode and decode, with PSNR")
async def reconstruct(request: Request):
    fit, bits, include_input = FIT(request), BITS(request), INCLUDE_INPUT(request)
    st = get_state(request)
    engine = st.require_ready()
    deadline = st.deadline()
    images = await read_images(request, st, fit, deadline, PNG_B64_BYTES_PER_PIXEL * (2 if include_input else 1),
                               hold=2)

    async def both() -> tuple[list[Codes], list[np.ndarray], list[Any]]:
        codes = await engine.encode(images, deadline)
        if not bits:
            return codes, await engine.decode(codes, deadline), [None] * len(codes)
        # Decoding and scoring are separate batchers: run them at once.
        recon, prior = await asyncio.gather(engine.decode(codes, deadline),
                                            prior_bits_if(True, engine, codes, deadline))
        return codes, recon, prior

    codes, recon, prior = await unless_client_gone(request, both())
    pngs = await pngs_b64(recon, st)
    items = [{"height": a.shape[0], "width": a.shape[1], "image": png, "psnr": _finite(psnr(a, b))}
             for a, b, png in zip(images, recon, pngs)]
    if bits:
        add_bits(items, st.bundle.levels, codes, prior)
    if include_input:
        for item, png in zip(items, await pngs_b64(images, st)):
            item["input"] = png
    return fast_json({"model": st.bundle.name, "items": items})


@v1.post("/sample", response_model=SampleResponse, openapi_extra={"requestBody": _json_body(SampleRequest)},
         summary="Sample images from the priors")
async def sample(request: Request):
    st = get_state(request)
    engine = st.require_ready()
    deadline = st.deadline()
    req = await read_json(request, SampleRequest, st, st.settings.max_json_bytes)
    # Checked here, before the request joins a batch: one bad value must never fail its batch-mates.
    k_max = max(lv.codebook_size for lv in st.bundle.levels.values())
    if req.top_k is not None and req.top_k > k_max:
        raise Unprocessable(f"top_k: must be in 1..{k_max} (the codebook size), got {req.top_k}")
    pixels = req.n * st.bundle.image_size ** 2
    check_answer(st, pixels * PNG_B64_BYTES_PER_PIXEL, f"{req.n} samples")
    st.budget.admit(request.scope, pixels, f"{req.n} samples")
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    items = [SampleItem(seed, req.n, i, req.temperature, req.top_k or 0) for i in range(req.n)]
    results = await unless_client_gone(request, engine.sample(items, deadline))
    body: dict[str, Any] = {"model": st.bundle.name, "seed": seed,
                            "images": await pngs_b64([im for im, _ in results], st), "codes": None}
    if req.return_codes:
        body["codes"] = [{k: grid_to_wire(g, req.format) for k, g in codes.items()} for _, codes in results]
    return fast_json(body)


@v1.get("/model", response_model=ModelInfo, summary="The bundle's manifest summary and the active provider")
async def model(request: Request):
    return fast_json(get_state(request).model_info)


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
