"""A small strict multipart/form-data parser for bodies already in memory (the case-ingest hot path).

The body's size is bounded before it gets here (the app's body limit), so parsing the whole thing
with ``bytes.split`` is both safe and several times cheaper than a streaming parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleet.errors import InvalidInput, ProtocolError

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^\s;]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(rb';\s*([A-Za-z*]+)="([^"]*)"')


class TooManyParts(InvalidInput):
    """More parts than the caller allows (a 400; a route may answer it as it sees fit)."""

    def __init__(self, max_parts: int) -> None:
        super().__init__(f"multipart body has more than {max_parts} parts")
        self.max_parts = max_parts


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def parse_form(body: bytes, content_type: str, *, max_parts: int = 8) -> dict[str, Part]:
    """Parts by name; :class:`InvalidInput` (400) on anything that is not well-formed multipart/form-data,
    :class:`ProtocolError` (422) on a body of another type."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ProtocolError(f"expected a multipart/form-data body; received Content-Type {content_type[:80]!r}")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise InvalidInput("multipart body without a boundary in its Content-Type")
    delim = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidInput("multipart body is truncated: no closing boundary")
    parts: dict[str, Part] = {}
    for chunk in chunks[1:-1]:
        if len(parts) >= max_parts:
            raise TooManyParts(max_parts)
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise InvalidInput("multipart part is not framed by CRLF")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise InvalidInput("multipart part has no header/body separator")
        name = filename = ctype = None
        for line in head.split(b"\r\n"):
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-disposition":
                params = dict(_PARAM.findall(value))
                name = params.get(b"name", b"").decode("utf-8", "replace") or None
                fn = params.get(b"filename")
                filename = fn.decode("utf-8", "replace") if fn is not None else None
            elif key == b"content-type":
                ctype = value.strip().decode("latin-1")
        if name is None:
            raise InvalidInput("multipart part without a Content-Disposition name")
        if name in parts:
            raise InvalidInput(f"multipart part {name!r} appears twice")
        parts[name] = Part(name=name, filename=filename, content_type=ctype, data=data)
    return parts
