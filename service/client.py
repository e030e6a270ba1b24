"""Python clients for the vqtok service: ``Client`` (sync) and ``AsyncClient`` (asyncio), on httpx.

They return numpy code grids and PIL images, and raise a typed ``VqtokError`` subclass for every
error answer::

    from service.client import Client

    with Client("http://127.0.0.1:8000") as c:
        codes = c.encode([Image.open("cat.jpg")])      # [Codes(top=int64 [8, 8], bottom=int64 [16, 16])]
        images = c.decode(codes)                        # [PIL.Image]
        samples = c.sample(4, temperature=0.9, seed=1)  # Samples(images=[...], seed=1, codes=None)

Code grids travel in the compact uint16 base64 form both ways. No torch here.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
from PIL import Image

from service.bundle.intake import REFUSALS
from service.bundle.wire import grid_to_wire, parse_grid

ImageInput = Image.Image | np.ndarray | bytes | str | Path


# --- errors ------------------------------------------------------------------------------------
class VqtokError(Exception):
    """An error answer from the service (or a transport failure, status 0)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    @property
    def image_refused(self) -> bool:
        """The service refused one of the images itself (``service.bundle.intake``): fix or skip that file."""
        return self.code in REFUSALS


class BadRequestError(VqtokError):  # 400: unreadable image, malformed JSON or multipart
    pass


class AuthenticationError(VqtokError):  # 401
    pass


class PayloadTooLargeError(VqtokError):  # 413: body, pixels or item count over a limit
    pass


class BodyTimeoutError(VqtokError):  # 408: the request body did not arrive in time (a stalled upload)
    pass


class NotFoundError(VqtokError):  # 404: no such path, or ?model= names no loaded bundle
    pass


class VersionMismatchError(VqtokError):  # 409: codes made by another bundle version than the one asked
    pass


class UnsupportedMediaTypeError(VqtokError):  # 415: a content type or an image format the service refuses
    pass


class InvalidRequestError(VqtokError):  # 422: a field's value; the message names the field
    pass


class OverloadedError(VqtokError):  # 503: queue full or not ready yet; see retry_after
    pass


class DeadlineExceededError(VqtokError):  # 504
    pass


class ServerError(VqtokError):  # other 5xx
    pass


_ERRORS: dict[int, type[VqtokError]] = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError,
                                        408: BodyTimeoutError, 409: VersionMismatchError,
                                        413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: InvalidRequestError,
                                        503: OverloadedError, 504: DeadlineExceededError}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:  # noqa: BLE001 - not our error shape (a proxy, say)
        code, message = "http_error", resp.text[:200]
    retry = resp.headers.get("retry-after")
    cls = _ERRORS.get(resp.status_code, ServerError if resp.status_code >= 500 else VqtokError)
    raise cls(resp.status_code, code, message, float(retry) if retry and retry.isdigit() else None)


# --- results -----------------------------------------------------------------------------------
class Codes(dict):
    """One image's code grids, keyed by level name in the bundle's order (int64 numpy arrays).

    Levels read as attributes too: ``codes.top``, ``codes.bottom`` for the default bundle.
    ``version``: the version id of the bundle that made them; ``decode`` sends it back, so codes never
    decode on another bundle (409). Store it with the grids.
    ``bits``: the code length (uniform and under the priors) when ``encode(..., bits=True)`` asked.
    """

    bits: dict[str, Any] | None = None
    version: str | None = None

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no level {name!r}; this bundle's levels: {list(self)}") from None

    def __repr__(self) -> str:
        return "Codes(" + ", ".join(f"{k}=int64 {list(np.shape(v))}" for k, v in self.items()) + ")"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {name: grid_to_wire(np.asarray(grid), "b64") for name, grid in self.items()}
        if self.version is not None:
            wire["version"] = self.version
        return wire


@dataclass
class Reconstruction:
    image: Image.Image
    psnr: float | None  # dB against the fitted input; None if identical
    bits: dict[str, Any] | None = None  # code length, uniform and under the priors (asked with bits=True)
    input: Image.Image | None = None  # the fitted input the model saw (asked with include_input=True)


@dataclass
class Samples:
    images: list[Image.Image]
    seed: int
    codes: list[Codes] | None = None


_NOT_GRIDS = ("height", "width", "bits", "version")


def _codes_from_wire(item: dict[str, Any]) -> Codes:
    """The level grids of an encode item or a sample's codes (every key but the image's size and
    bits); ``.bits`` holds the code length when it was asked for."""
    codes = Codes({k: parse_grid(v) for k, v in item.items() if k not in _NOT_GRIDS})
    codes.bits = item.get("bits")
    codes.version = item.get("version")
    return codes


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)  # lossless, and fast for the client
        return buf.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def _png(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def _flags(**flags: bool) -> dict[str, str]:
    """Boolean query parameters that are on ("true"); off ones are left out."""
    return {name: "true" for name, on in flags.items() if on}


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


# --- request builders and parsers, shared by both clients ----------------------------------------
class _Api:
    def __init__(self, api_key: str | None, model: str | None = None):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_ref = model  # a loaded bundle's name, or name@version (GET /v1/models); None: the default

    def _with_model(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.model_ref is None or request["url"] == "/v1/models":
            return request
        return {**request, "params": {**request.get("params", {}), "model": self.model_ref}}

    @staticmethod
    def _image_request(path: str, images: ImageInput | Sequence[ImageInput], fit: str,
                       params: dict[str, str] | None = None) -> dict[str, Any]:
        files = [("images", (f"image{i}", _image_bytes(im), "application/octet-stream"))
                 for i, im in enumerate(_as_list(images))]
        return {"method": "POST", "url": path, "files": files, "params": {"fit": fit, **(params or {})}}

    def encode_request(self, images, fit: str, bits: bool = False) -> dict[str, Any]:
        return self._image_request("/v1/encode", images, fit, {"format": "b64", **_flags(bits=bits)})

    @staticmethod
    def encode_result(resp: httpx.Response) -> list[Codes]:
        return [_codes_from_wire(item) for item in resp.json()["items"]]

    @staticmethod
    def decode_request(codes: Codes | Sequence[Codes]) -> dict[str, Any]:
        items = [codes] if isinstance(codes, Codes) else list(codes)
        return {"method": "POST", "url": "/v1/decode", "json": {"items": [c.to_wire() for c in items]}}

    @staticmethod
    def decode_result(resp: httpx.Response) -> list[Image.Image]:
        return [_png(s) for s in resp.json()["images"]]

    def reconstruct_request(self, images, fit: str, bits: bool = False, include_input: bool = False) -> dict[str, Any]:
        return self._image_request("/v1/reconstruct", images, fit, _flags(bits=bits, include_input=include_input))

    @staticmethod
    def reconstruct_result(resp: httpx.Response) -> list[Reconstruction]:
        return [Reconstruction(_png(it["image"]), it["psnr"], it.get("bits"),
                               _png(it["input"]) if it.get("input") else None) for it in resp.json()["items"]]

    @staticmethod
    def sample_request(n: int, temperature: float, top_k: int | None, seed: int | None,
                       return_codes: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"n": n, "temperature": temperature, "return_codes": return_codes, "format": "b64"}
        if top_k is not None:
            body["top_k"] = top_k
        if seed is not None:
            body["seed"] = seed
        return {"method": "POST", "url": "/v1/sample", "json": body}

    @staticmethod
    def sample_result(resp: httpx.Response) -> Samples:
        body = resp.json()
        codes = [_codes_from_wire(c) for c in body["codes"]] if body.get("codes") is not None else None
        return Samples([_png(s) for s in body["images"]], int(body["seed"]), codes)


class Client(_Api):
    """Synchronous client. ``model`` picks a loaded bundle for every call (default: the server's first);
    ``transport`` lets tests route requests to an in-process app."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 120.0, transport: httpx.BaseTransport | None = None, model: str | None = None):
        super().__init__(api_key, model)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=self.headers, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: dict[str, Any]) -> httpx.Response:
        try:
            resp = self._http.request(**self._with_model(request))
        except httpx.TimeoutException as e:
            raise DeadlineExceededError(0, "client_timeout", str(e) or "timed out") from e
        except httpx.TransportError as e:
            raise VqtokError(0, "transport_error", str(e) or type(e).__name__) from e
        _raise_for(resp)
        return resp

    def encode(self, images: ImageInput | Sequence[ImageInput], fit: str = "center_crop",
               bits: bool = False) -> list[Codes]:
        return self.encode_result(self._send(self.encode_request(images, fit, bits)))

    def decode(self, codes: Codes | Sequence[Codes]) -> list[Image.Image]:
        return self.decode_result(self._send(self.decode_request(codes)))

    def reconstruct(self, images: ImageInput | Sequence[ImageInput], fit: str = "center_crop", bits: bool = False,
                    include_input: bool = False) -> list[Reconstruction]:
        return self.reconstruct_result(self._send(self.reconstruct_request(images, fit, bits, include_input)))

    def sample(self, n: int = 1, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
               return_codes: bool = False) -> Samples:
        return self.sample_result(self._send(self.sample_request(n, temperature, top_k, seed, return_codes)))

    def model(self) -> dict[str, Any]:
        return self._send({"method": "GET", "url": "/v1/model"}).json()

    def models(self) -> dict[str, Any]:
        """Every loaded bundle (``GET /v1/models``): {"default": name, "models": [{name, version, ...}]}."""
        return self._send({"method": "GET", "url": "/v1/models"}).json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncClient(_Api):
    """Asyncio client with the same methods as ``Client``, as coroutines."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 120.0, transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None, model: str | None = None):
        super().__init__(api_key, model)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=self.headers, transport=transport,
                                       limits=limits or httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: dict[str, Any]) -> httpx.Response:
        try:
            resp = await self._http.request(**self._with_model(request))
        except httpx.TimeoutException as e:
            raise DeadlineExceededError(0, "client_timeout", str(e) or "timed out") from e
        except httpx.TransportError as e:
            raise VqtokError(0, "transport_error", str(e) or type(e).__name__) from e
        _raise_for(resp)
        return resp

    async def encode(self, images: ImageInput | Sequence[ImageInput], fit: str = "center_crop",
                     bits: bool = False) -> list[Codes]:
        return self.encode_result(await self._send(self.encode_request(images, fit, bits)))

    async def decode(self, codes: Codes | Sequence[Codes]) -> list[Image.Image]:
        return self.decode_result(await self._send(self.decode_request(codes)))

    async def reconstruct(self, images: ImageInput | Sequence[ImageInput], fit: str = "center_crop",
                          bits: bool = False, include_input: bool = False) -> list[Reconstruction]:
        return self.reconstruct_result(await self._send(self.reconstruct_request(images, fit, bits, include_input)))

    async def sample(self, n: int = 1, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                     return_codes: bool = False) -> Samples:
        return self.sample_result(await self._send(self.sample_request(n, temperature, top_k, seed, return_codes)))

    async def model(self) -> dict[str, Any]:
        return (await self._send({"method": "GET", "url": "/v1/model"})).json()

    async def models(self) -> dict[str, Any]:
        return (await self._send({"method": "GET", "url": "/v1/models"})).json()

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
