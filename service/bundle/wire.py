"""Code grids on the wire: nested JSON lists, or ``{"shape", "dtype": "uint16", "data"}`` (base64,
little-endian), the compact form for clients that care about bytes. The server, the client and the
jobs all read and write grids through this module.

Parsing raises ``ValueError`` with a message for people; the caller adds the field's name.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np

GridFormat = Literal["list", "b64"]
# Code grids in memory. One item's: level name -> int64 [h, w]; a batch's: level name -> int64 [B, h, w].
# (The client's ``Codes`` is the public, per-item result type built on ``Grids``.)
Grids = dict[str, np.ndarray]
GridBatch = dict[str, np.ndarray]
WIRE_DTYPE = "uint16"
_LE_U16 = np.dtype("<u2")


def parse_grid(value: Any) -> np.ndarray:
    """A JSON value -> int64 [h, w]. Range checks need K and happen later (``check_range``)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return _parse_b64(value)
    if not isinstance(value, list):
        # ValueError, not TypeError: pydantic turns only ValueError into a 422 naming the field.
        raise ValueError("must be a list of rows of integer codes, or {shape, dtype, data}")  # noqa: TRY004
    try:
        a = np.array(value)
    except (ValueError, OverflowError):
        # numpy refuses inhomogeneous nesting: rows of different lengths or mixed depths.
        raise ValueError("is ragged: every row must have the same length") from None
    if a.ndim != 2:
        raise ValueError(f"must be a 2-D grid (a list of rows), got {a.ndim} dimension(s)")
    if a.size == 0:
        raise ValueError("must not be empty")
    if a.dtype.kind not in "iu":
        raise ValueError("codes must be integers")
    return a.astype(np.int64, copy=False)


def _parse_b64(value: dict) -> np.ndarray:
    unknown = set(value) - {"shape", "dtype", "data"}
    if unknown or "shape" not in value or "data" not in value:
        raise ValueError("the compact form is {\"shape\": [h, w], \"dtype\": \"uint16\", \"data\": base64}")
    if value.get("dtype", WIRE_DTYPE) != WIRE_DTYPE:
        raise ValueError(f"dtype must be {WIRE_DTYPE!r}, got {value.get('dtype')!r}")
    shape = value["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError("shape must be two positive integers [h, w]")
    if not isinstance(value["data"], str):
        raise ValueError("data must be a base64 string")  # noqa: TRY004
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data is not valid base64") from None
    need = shape[0] * shape[1] * _LE_U16.itemsize
    if len(raw) != need:
        raise ValueError(f"data holds {len(raw)} bytes, shape {shape} needs {need}")
    return np.frombuffer(raw, dtype=_LE_U16).reshape(shape).astype(np.int64)


def check_range(grid: np.ndarray, num_codes: int) -> str | None:
    """None if every code is in [0, K), else a message."""
    lo, hi = int(grid.min()), int(grid.max())
    if lo < 0:
        return f"codes must be in [0, {num_codes}), found {lo}"
    if hi >= num_codes:
        return f"codes must be in [0, {num_codes}), found {hi}"
    return None


class InvalidCodes(ValueError):
    """One item's grids do not fit the bundle; the message names the field (``items[0].top``)."""

    def __init__(self, message: str, code: str = "invalid_codes"):
        super().__init__(message)
        self.message, self.code = message, code


def check_item(item: dict[str, np.ndarray], levels: dict[str, Any], max_pixels: int, where: str) -> Grids:
    """One item's grids checked against a bundle's ``levels`` (name -> ``Level``): one per level, codes
    in [0, K), shapes that imply one image size, at most ``max_pixels`` decoded. ``where`` names the item
    in messages (``items[0]``). Raises ``InvalidCodes``."""
    unknown = sorted(set(item) - set(levels))
    if unknown:
        raise InvalidCodes(f"{where}.{unknown[0]}: not a level of this bundle (its levels: {', '.join(levels)})",
                           "invalid_request")
    grids: Grids = {}
    size: tuple[int, int] | None = None
    first: tuple[str, tuple[int, ...]] | None = None
    for name, level in levels.items():
        if name not in item:
            raise InvalidCodes(f"{where}.{name}: field required (one grid per level: {', '.join(levels)})",
                               "invalid_request")
        grid = item[name]
        problem = check_range(grid, level.codebook_size)
        if problem:
            raise InvalidCodes(f"{where}.{name}: {problem}")
        implied = (grid.shape[0] * level.stride, grid.shape[1] * level.stride)
        if size is None:
            size, first = implied, (name, grid.shape)
        elif implied != size:
            want = [size[0] // level.stride, size[1] // level.stride]
            raise InvalidCodes(f"{where}.{name}: shape {list(grid.shape)} does not match {where}.{first[0]} "
                               f"{list(first[1])} (expected {want})")
        grids[name] = grid
    if size[0] * size[1] > max_pixels:
        raise InvalidCodes(f"{where}: decodes to {size[1]}x{size[0]}, over the limit of {max_pixels} pixels")
    return grids


def grid_to_wire(grid: np.ndarray, fmt: GridFormat = "b64") -> Any:
    """int [h, w] -> nested lists (``tolist`` is the fastest way to JSON) or the compact form."""
    if fmt == "b64":
        grid = np.asarray(grid)
        if grid.ndim != 2:
            raise ValueError(f"a code grid must be 2-D, got shape {grid.shape}")
        if grid.size and (grid.min() < 0 or grid.max() > 0xFFFF):
            raise ValueError("codes must be in [0, 65535] for the uint16 wire form")
        data = np.ascontiguousarray(grid, dtype=_LE_U16).tobytes()
        return {"shape": list(grid.shape), "dtype": WIRE_DTYPE, "data": base64.b64encode(data).decode("ascii")}
    return grid.tolist()


def to_uint16(grid: np.ndarray) -> np.ndarray:
    """The storage form of a grid (shards, npz): uint16, refusing codes that do not fit."""
    grid = np.asarray(grid)
    if grid.size and (grid.min() < 0 or grid.max() > 0xFFFF):
        raise ValueError("codes must be in [0, 65535] to be stored as uint16")
    return grid.astype(np.uint16)
