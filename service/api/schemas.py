"""Typed request and response bodies: what OpenAPI (``/docs``) shows and what requests validate to.

Responses are built as plain dicts and serialised directly (validating large code grids a second
time would cost more than the inference), so the response models here document the shape.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

from service.bundle import Level
from service.bundle.wire import GridFormat, parse_grid

_B64_GRID_SCHEMA = {
    "type": "object",
    "title": "B64Grid",
    "properties": {
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "dtype": {"type": "string", "const": "uint16"},
        "data": {"type": "string", "contentEncoding": "base64",
                 "description": "little-endian uint16 codes, row-major"},
    },
    "required": ["shape", "data"],
}
GRID_SCHEMA = {
    "title": "Grid",
    "description": "codes as a list of rows of integers in [0, K), or the compact base64 form",
    "anyOf": [
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
        _B64_GRID_SCHEMA,
    ],
}

# Parsed into an int64 numpy array by ``parse_grid``; documented as the two wire forms.
Grid = Annotated[Any, PlainValidator(parse_grid), WithJsonSchema(GRID_SCHEMA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ----------------------------------------------------------------------------------
class EncodeJsonRequest(_Strict):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")


# One grid per level of the bundle, keyed by level name (GET /v1/model lists the levels; the default
# bundle's are "top" and "bottom"). Which keys must be there is checked against the bundle.
LEVELS_DOC = "one code grid per level of the bundle, keyed by level name (see GET /v1/model), e.g. top and bottom"
DecodeItem = Annotated[dict[str, Grid], Field(description=LEVELS_DOC, min_length=1)]


VERSION_DOC = ("the version id of the bundle that made the codes (encode and sample answers carry it); codes "
               "tagged with another version get 409, untagged codes go to the model named or the default")


class DecodeRequest(_Strict):
    items: list[DecodeItem] = Field(min_length=1)
    version: str | None = Field(None, min_length=1, max_length=64, description=VERSION_DOC)

    @model_validator(mode="before")
    @classmethod
    def _item_versions(cls, data: Any) -> Any:
        """Items may carry the tag themselves (as encode answers give them): one version per request."""
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            return data
        tags = {item["version"] for item in data["items"] if isinstance(item, dict) and "version" in item}
        if not tags:
            return data
        if data.get("version") is not None:
            tags.add(data["version"])
        if len(tags) > 1 or not all(isinstance(t, str) for t in tags):
            raise ValueError("the items carry different version tags; send each version's codes in its own request")
        items = [{k: v for k, v in item.items() if k != "version"} if isinstance(item, dict) else item
                 for item in data["items"]]
        return {**data, "items": items, "version": tags.pop()}


def decode_example(levels: dict[str, Level], image_size: int) -> dict[str, Any]:
    """A valid decode body for a bundle (one image of its size; codes 0..3 exist in any codebook):
    what /docs offers to try, and an example the API fuzz test (Schemathesis) sends as it is."""
    grids = {}
    for name, level in levels.items():
        h, w = level.grid(image_size, image_size)
        grids[name] = [[(i + j) % 4 for j in range(w)] for i in range(h)]
    return {"items": [grids]}


# Temperatures are float32 in the sampler: keep them normal there (no 0, no overflow, no subnormal).
F32_TINY, F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


class SampleRequest(_Strict):
    n: int = Field(1, ge=1, le=64, description="number of images")
    temperature: float = Field(1.0, ge=F32_TINY, le=F32_MAX, allow_inf_nan=False,
                               description="within the float32 normal range")
    top_k: int | None = Field(None, ge=1, le=2**16, description="sample among the k most likely codes only; "
                              "at most the codebook size K (GET /v1/model)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same images; random if absent")
    return_codes: bool = False
    format: GridFormat = Field("list", description="code grid form when return_codes is true")


# --- responses ---------------------------------------------------------------------------------
class B64Grid(BaseModel):
    shape: list[int]
    dtype: Literal["uint16"] = "uint16"
    data: str


WireGrid = list[list[int]] | B64Grid


class LevelBits(BaseModel):
    uniform: float = Field(description="h × w × log2 K")
    prior: float | None = Field(description="−Σ log2 p(code | earlier codes[, coarser level]) under the "
                                "level's prior; null if the bundle has no priors")


class CodeLength(BaseModel):
    """An item's code length in bits (asked for with ``?bits=true``)."""

    uniform: float = Field(description="every code costs log2 K bits")
    prior: float | None = Field(description="under the learned priors (an entropy coder's length); null without "
                                "priors")
    levels: dict[str, LevelBits] = Field(description="the same per level, keyed by level name")


class EncodedItem(BaseModel):
    """``height``, ``width``, ``version``, and one grid per level of the bundle, keyed by level name."""

    model_config = ConfigDict(extra="allow")
    height: int
    width: int
    version: str = Field(description=VERSION_DOC)
    bits: CodeLength | None = Field(None, description="with ?bits=true")


class EncodeResponse(BaseModel):
    model: str
    version: str = Field(description="the version that answered")
    items: list[EncodedItem]


class DecodeResponse(BaseModel):
    model: str
    version: str = Field(description="the version that answered")
    images: list[str] = Field(description="base64 PNGs")


class ReconstructedItem(BaseModel):
    height: int
    width: int
    image: str = Field(description="base64 PNG")
    psnr: float | None = Field(description="dB against the (fitted) input; null if identical")
    bits: CodeLength | None = Field(None, description="with ?bits=true")
    input: str | None = Field(None, description="with ?include_input=true: the fitted input as a base64 PNG")


class ReconstructResponse(BaseModel):
    model: str
    version: str = Field(description="the version that answered")
    items: list[ReconstructedItem]


class SampledCodes(BaseModel):
    """``version``, and one grid per level of the bundle, keyed by level name."""

    model_config = ConfigDict(extra="allow")
    version: str = Field(description=VERSION_DOC)


class SampleResponse(BaseModel):
    model: str
    version: str = Field(description=VERSION_DOC)
    seed: int
    images: list[str] = Field(description="base64 PNGs")
    codes: list[SampledCodes] | None = Field(None, description="with return_codes")


class LevelInfo(BaseModel):
    name: str
    stride: int
    codebook_size: int
    embedding_dim: int


class LimitsInfo(BaseModel):
    max_batch: int
    max_delay_ms: float
    sample_max_batch: int
    queue_limit: int
    request_timeout_s: float
    max_items: int
    max_body_bytes: int
    max_image_pixels: int
    max_native_pixels: int
    size_multiple: int


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="a short prefix of sha256, unique among the loaded bundles")
    sha256: str = Field(description="sha256 of the bundle's manifest.json, which holds every file's digest: "
                                    "the model's identity")
    format_version: int
    image_size: int
    levels: list[LevelInfo]
    graphs: list[str]
    provider: str
    device: str
    gpu: str | None = Field(None, description="the GPU's name on CUDA (from NVML), else null")
    sampler: str | None
    streams: int = Field(description="batches each operation runs at once")
    intra_op_threads: int = Field(description="ONNX Runtime threads per batch")
    limits: LimitsInfo
    parity: dict[str, Any]
    metrics: dict[str, Any]
    onnx: dict[str, Any]


class ModelSummary(BaseModel):
    name: str
    version: str
    ref: str = Field(description="name@version: what ?model= takes to pin this version")
    sha256: str
    levels: list[str]
    image_size: int
    can_sample: bool
    ready: bool


class ModelList(BaseModel):
    default: str | None = Field(description="the name requests without ?model= go to")
    models: list[ModelSummary]


class LoadRequest(_Strict):
    path: str = Field(min_length=1, description="the bundle's folder, on the server")
    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                             description="the name to serve it under (default: its manifest's)")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
