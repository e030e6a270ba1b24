"""The parts of a multipart/form-data body, parsed in memory by python-multipart as the body streams in.

Starlette's ``request.form()`` spools every file part through a ``SpooledTemporaryFile`` and builds
``UploadFile`` objects; for a small image that bookkeeping cost more than parsing it. Bodies are
capped by the body limit, so the parts simply collect into memory, and only they are kept: the body
is parsed chunk by chunk, never held whole.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.api.errors import BadRequest, PayloadTooLarge


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class MultipartReader:
    """Feed it the body's chunks, then ``close()`` for the parts in order.

    Raises BadRequest for a malformed body and PayloadTooLarge beyond ``max_parts`` parts (counted
    as they begin, so a flood of tiny parts stops early).
    """

    def __init__(self, content_type: str, max_parts: int):
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadRequest("malformed multipart body: no boundary in Content-Type", code="invalid_multipart")
        self.parts: list[Part] = []
        self.max_parts = max_parts
        self._fed = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_part_data": lambda data, start, end: self.parts[-1].data.extend(data[start:end]),
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
        })

    def _part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise PayloadTooLarge(f"more than {self.max_parts} parts in one request", code="too_many_items")
        self.parts.append(Part())

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(self._header_value))
            part = self.parts[-1]
            part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in disposition:
                part.filename = disposition[b"filename"].decode("utf-8", "replace")
        self._header_name.clear()
        self._header_value.clear()

    def feed(self, chunk: bytes) -> None:
        self._fed += len(chunk)
        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}", code="invalid_multipart") from None

    def close(self) -> list[Part]:
        try:
            self._parser.finalize()
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}", code="invalid_multipart") from None
        if self._fed and self._parser.state != MultipartState.END:  # no body at all: no parts, the caller's call
            raise BadRequest("malformed multipart body: it ends before the closing boundary", code="invalid_multipart")
        return self.parts


async def read_multipart(chunks: AsyncIterator[bytes], content_type: str, max_parts: int) -> list[Part]:
    reader = MultipartReader(content_type, max_parts)
    async for chunk in chunks:
        reader.feed(chunk)
    return reader.close()
