"""``Call``: one request's walk through the service, so that each endpoint says only what it does.

A ``Call`` owns what every endpoint used to repeat: readiness (503 while warming up), the deadline,
reading and validating the body (JSON off the event loop when large; images through the one intake,
``service.bundle.intake``, decoded inline or in the work pool by header pixels), admission (the
answer's size bound and the pixels the request holds, checked together before any work) and
cancellation (work stops when the client disconnects, 504 past the deadline).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.api.errors import (
    ClientGone,
    DeadlineExceeded,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
    unprocessable_from,
)
from service.api.middleware import TICKETS
from service.api.multipart import read_multipart
from service.api.schemas import EncodeJsonRequest
from service.api.state import ServiceState
from service.bundle import Bundle
from service.bundle.images import to_png
from service.bundle.intake import Fit, Header, ImageRefused, inspect
from service.engine.models import LoadedModel
from service.engine.protocol import InferenceEngine

T = TypeVar("T")
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


class Call:
    """``model``: the loaded version the request runs on, picked from ``?model=name[@id]`` (default: the
    first bundle) and, for codes, the version they carry; held (``Lease``) until the request is answered,
    so an unload waits for it."""

    def __init__(self, request: Request, *, by_codes: bool = False):
        self.request = request
        self.state: ServiceState = request.app.state.vqtok
        self.state.require_ready()
        self.deadline = self.state.deadline()
        self.spec = request.query_params.get("model") or None
        self.model: LoadedModel | None = None
        if not by_codes:  # otherwise the endpoint picks once it has read the codes' version tag
            self.pick(None)

    def pick(self, version: str | None) -> LoadedModel:
        model = self.state.models.resolve(self.spec, version)
        self.held.append(model.lease())
        self.model = model
        return model

    @property
    def held(self) -> list:
        """What this request holds until it is answered (pixel tickets, its model's lease)."""
        return self.request.scope.setdefault(TICKETS, [])

    @property
    def settings(self):
        return self.state.settings

    @property
    def bundle(self) -> Bundle:
        return self.model.bundle

    @property
    def engine(self) -> InferenceEngine:
        return self.model.engine

    def answer(self, **body) -> dict:
        """An answer's body, naming the version that made it: codes in it carry ``version``."""
        return {"model": self.model.name, "version": self.model.version, **body}

    # -- admission ------------------------------------------------------------------------------
    def admit(self, pixels: int, answer_bytes: float, what: str, hold: int | None = None):
        """Check the answer's size bound, then hold ``hold`` (default ``pixels``) pixels until answered."""
        limit = self.settings.max_response_bytes
        if answer_bytes > limit:
            raise PayloadTooLarge(f"{what}: the answer could take {int(answer_bytes)} bytes, over the limit of "
                                  f"{limit} (VQTOK_MAX_RESPONSE_BYTES); send fewer or smaller items",
                                  code="response_too_large")
        return self.state.budget.admit(self.held, pixels if hold is None else hold, what)

    # -- cancellation ---------------------------------------------------------------------------
    async def run(self, work: Awaitable[T]) -> T:
        """Await ``work``, but cancel it (its jobs leave the queue) if the client disconnects first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()  # the client left (or we are being cancelled): drop the queued jobs
        if not task.done() or task.cancelled():
            raise ClientGone("the client closed the connection")
        return task.result()

    async def run_by_deadline(self, work: Awaitable[T]) -> T:
        """``run``, and 504 past the request's deadline (work that is not an engine call: decoding)."""
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self.run(work)
        except TimeoutError:
            raise DeadlineExceeded("the request did not finish within its deadline") from None

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    # -- bodies ---------------------------------------------------------------------------------
    def media_type(self) -> str:
        return media_type(self.request)

    async def json(self, model: type[M], limit: int | None = None) -> M:
        return await read_json(self.request, self.state, model, limit)

    async def images(self, fit: Fit, answer_bytes_per_pixel: float, hold: int = 1) -> list[np.ndarray]:
        """The request's images, decoded as admitted work: every header is checked first, the answer's
        size bound too, then the request holds its pixels (``hold`` copies of the arrays: reconstruct
        keeps its inputs and outputs) and decodes inline only when the header pixels are few."""
        limits = self.state.limits_for(self.bundle)
        blobs = await self._image_blobs()
        headers = []
        for i, blob in enumerate(blobs):
            try:
                headers.append(inspect(blob, fit, limits))
            except ImageRefused as e:
                raise e.naming(f"images[{i}]") from None
        header_pixels = sum(h.pixels for h in headers)
        arrays = sum(limits.output_pixels(h.pixels, fit) for h in headers)
        what = f"{len(headers)} images"
        ticket = self.admit(arrays, arrays * answer_bytes_per_pixel, what, hold=max(header_pixels, arrays * hold))
        if header_pixels <= INLINE_PIXELS:
            images = _decode_all(None, headers)
        else:
            images = await self.run_by_deadline(self.state.pool.run(_decode_all, headers))
        ticket.resize(arrays * hold, what)
        return images

    async def _image_blobs(self) -> list[bytes | bytearray]:
        media_type, max_items = self.media_type(), self.settings.max_items
        blobs: list[bytes | bytearray] = []
        if media_type == "multipart/form-data":
            parts = await read_multipart(self.request.stream(), self.request.headers["content-type"], max_items + 16)
            for i, part in enumerate(p for p in parts if p.name == "images"):
                if part.filename is None:
                    raise Unprocessable(f"images[{i}]: must be a file part (filename=...), not a text field")
                blobs.append(part.data)
        elif _is_json(media_type):
            req = await self.json(EncodeJsonRequest)
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

    # -- answers --------------------------------------------------------------------------------
    async def pngs(self, images: list[np.ndarray]) -> list[str]:
        """Base64 PNGs, in the work pool when they are large (inline when a thread hop would cost more)."""
        level = self.settings.png_compress_level
        if sum(im.shape[0] * im.shape[1] for im in images) > INLINE_PIXELS:
            return await self.state.pool.run(_unstoppable, encode_pngs, images, level)
        return encode_pngs(images, level)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_json(request: Request, state: ServiceState, model: type[M], limit: int | None = None) -> M:
    """The body validated as ``model``: inline when small, in the work pool when large (a 32 MB list of
    codes takes seconds to parse). ``limit`` caps the body tighter than the body limit (413)."""
    kind = media_type(request)
    if not _is_json(kind):
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {kind or 'none'!r}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if limit is not None and len(body) > limit:
            raise PayloadTooLarge(f"JSON body over {limit} bytes (VQTOK_MAX_JSON_BYTES); send code grids in "
                                  "the compact b64 form, or fewer items per request")
    if len(body) <= INLINE_BYTES:
        return _validate_json(None, model, bytes(body))
    return await state.pool.run(_validate_json, model, bytes(body))


def encode_pngs(images: list[np.ndarray], level: int) -> list[str]:
    return [base64.b64encode(to_png(im, level)).decode("ascii") for im in images]


def _unstoppable(stop, fn, *args):
    return fn(*args)


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _validate_json(stop, model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise unprocessable_from(e) from None


def _decode_all(stop, headers: list[Header]) -> list[np.ndarray]:
    out = []
    for i, h in enumerate(headers):
        if stop is not None and stop.is_set():  # the request was cancelled: no more decoding for it
            raise ClientGone("the request was cancelled while its images were decoded")
        try:
            out.append(h.decode())
        except ImageRefused as e:
            raise e.naming(f"images[{i}]") from None
    return out

