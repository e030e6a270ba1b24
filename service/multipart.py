"""The file parts of a multipart/form-data body, parsed in memory by python-multipart.

Starlette's ``request.form()`` spools every file part through a ``SpooledTemporaryFile`` and builds
``UploadFile`` objects; for a small image that bookkeeping cost more than parsing it. Bodies are
already capped by the body limit, so the parts simply collect into ``bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.errors import BadRequest, PayloadTooLarge


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """All parts of ``body`` in order. Raises BadRequest for a malformed body and PayloadTooLarge
    beyond ``max_parts`` parts."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("malformed multipart body: no boundary in Content-Type", code="invalid_multipart")
    parts: list[Part] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise PayloadTooLarge(f"more than {max_parts} parts in one request", code="too_many_items")
        parts.append(Part())

    def on_header_end() -> None:
        if header_name.lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(header_value))
            part = parts[-1]
            part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in disposition:
                part.filename = disposition[b"filename"].decode("utf-8", "replace")
        header_name.clear()
        header_value.clear()

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header_name.extend(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(f"malformed multipart body: {e}", code="invalid_multipart") from None
    if parser.state != MultipartState.END and body:  # an empty body is no parts, judged by the caller
        raise BadRequest("malformed multipart body: it ends before the closing boundary", code="invalid_multipart")
    return parts
