"""The hub's typed route plumbing: dependency aliases, and fleet.protocol messages as request and response bodies.

Routes take the hub and the caller through ``Annotated`` aliases (``HubDep``, ``DeviceCaller``, ...). A JSON
request body is parsed by the message type itself (``Message.from_dict``: strict keys, the schema version,
ranges; a :class:`~fleet.errors.ProtocolError` is a 422 through the app's one error mapping), after
:class:`fleet.hub.bodies.BodyGuard` has checked its size, encoding and depth. :func:`request_body` puts the
message's JSON schema into the OpenAPI document (:func:`multipart_body` the parts of an upload); routes declare
their ``response_model`` the same way, and answer with :func:`message_response`, so the document describes
every request and every response (tests/hub/test_openapi.py checks it, and that the answers match it).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Response

from fleet.errors import ProtocolError
from fleet.hub.auth import Principal, require
from fleet.hub.context import Hub, get_hub
from fleet.protocol import Message

M = TypeVar("M", bound=Message)

HubDep = Annotated[Hub, Depends(get_hub)]
AdminCaller = Annotated[Principal, Depends(require("admin"))]
DeviceCaller = Annotated[Principal, Depends(require("device"))]
LabelerCaller = Annotated[Principal, Depends(require("labeler"))]
TrainerCaller = Annotated[Principal, Depends(require("trainer"))]
ReaderCaller = Annotated[Principal, Depends(require("labeler", "trainer"))]
AnyCaller = Annotated[Principal, Depends(require("device", "labeler", "trainer"))]  # model files, novelty banks


def message_body(kind: type[M], *, optional: bool = False) -> Any:
    """A dependency that reads the request's JSON body as ``kind`` (an empty body is ``kind()`` when
    ``optional``); typed ``Any`` as FastAPI's ``Depends`` is, so ``body: Kind = message_body(Kind)`` checks."""
    async def parse(request: Request) -> M | None:
        raw = await request.body()
        if not raw.strip():
            if optional:
                return kind.from_dict({})
            raise ProtocolError(f"{kind.__name__}: the request has no body; expected a JSON object")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProtocolError(f"{kind.__name__}: not valid JSON ({str(exc)[:200]})") from None
        return kind.from_dict(data)

    parse.__name__ = f"parse_{kind.__name__}"
    return Depends(parse)


def request_body(kind: type[Message], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``kind``: its JSON schema, definitions inlined."""
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": schema_of(kind)}}}}


def binary_body(description: str, *, media: str = "application/octet-stream") -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is raw bytes of ``media`` (the route reads and checks them)."""
    return {"requestBody": {"required": True, "content": {media: {"schema": {
        "type": "string", "format": "binary", "description": description}}}}}


def multipart_body(parts: dict[str, str], *, files: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """``openapi_extra`` for a ``multipart/form-data`` route: ``parts`` by name -> what each holds (the ones
    named in ``files`` are binary file parts)."""
    props = {name: {"type": "string", "description": text, **({"format": "binary"} if name in files else {})}
             for name, text in parts.items()}
    schema = {"type": "object", "required": list(parts), "properties": props, "description": description}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def schema_of(kind: type[Any]) -> dict[str, Any]:
    """``kind``'s JSON schema (pydantic's reading of the dataclass) with every ``$ref`` resolved in place."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(kind).json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)  # type: ignore[no-any-return]


def message_response(message: Message, *, status_code: int = 200) -> Response:
    """A message as the JSON response, serialised by the message itself (the hot paths skip the response
    model's validation; the route still declares it for the document)."""
    return Response(message.to_json(), status_code=status_code, media_type="application/json")
