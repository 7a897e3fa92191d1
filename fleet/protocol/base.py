"""The machinery every wire message shares: strict JSON round trips, the schema version, and the field checks.

A message is a plain dataclass (no pydantic: this runs on devices). ``from_json``/``from_dict`` refuse
unknown fields, a schema version this peer does not speak, and any value out of its range, with a
:class:`~fleet.errors.ProtocolError` naming the field, the value received and what was expected.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from fleet.errors import ProtocolError

SCHEMA_VERSION = 2  # 2: predictions, labels and human actions carry a task (``classify``, ...) and its payload
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_INT = 2**53  # every count on the wire: exact as a JSON number anywhere
DB_INT = 2**31 - 1  # a value stored in a database INTEGER
MAX_TAGS, MAX_TAG_NAME, MAX_TAG_VALUE = 32, 64, 256  # condition and metadata tags
MAX_NAME = 64  # a trigger's or a score's name

T = TypeVar("T", bound="Message")


class Message:
    """Mixin: JSON round trip through ``to_dict``/``from_dict`` with strict key checking.

    Top-level messages carry ``schema``; parts nested in another message (``VERSIONED = False``) do not.
    """

    VERSIONED: ClassVar[bool] = True
    # fields holding a nested message, or a list of them (at most n), by the message type or its name in the
    # module (looked up when parsing, so the module's ``Case`` is the one every part of the contract uses)
    PARTS: ClassVar[dict[str, type[Message] | str]] = {}
    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {}
    # fields holding an object of name -> nested message (at most n names)
    MAPS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The message as plain JSON values: nested messages as dicts, lists and dicts copied (what
        ``dataclasses.asdict`` gives, without deep-copying every leaf)."""
        return {name: _plain(getattr(self, name)) for name in _field_names(type(self))}

    def to_json(self) -> str:
        try:  # the same JSON as to_dict's, without its deep copy (the agent encodes a case per flagged frame)
            return json.dumps(self, default=_fields_of, allow_nan=False, separators=(",", ":"))
        except ValueError as exc:
            raise ProtocolError(f"{type(self).__name__} holds a NaN or infinite number: {exc}") from exc

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ProtocolError(f"{cls.__name__}: not valid JSON ({str(exc)[:200]})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if isinstance(data, cls):
            data.validate()
            return data
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.__name__} must be a JSON object; received {type(data).__name__}")
        known = _field_names(cls)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        if cls.VERSIONED:
            schema = data.get("schema", SCHEMA_VERSION)
            if schema != SCHEMA_VERSION:
                raise ProtocolError(f"{cls.__name__}: schema {schema!r} is not spoken here (this peer speaks schema "
                                    f"{SCHEMA_VERSION}); upgrade the older side")
        try:
            obj = cls._build(data)
        except TypeError as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}") from exc
        obj.validate()
        return obj

    @classmethod
    def _build(cls: type[T], data: dict[str, Any]) -> T:
        """The message from its JSON fields, nested messages parsed by their own types (a nested field typed
        ``X | None`` may be null)."""
        data = dict(data)
        optional = _optional_names(cls)
        for name, kind in cls.PARTS.items():
            if name in data and not (data[name] is None and name in optional):
                data[name] = cls._kind(kind).from_dict(data[name])
        for name, (kind, most) in cls.LISTS.items():
            if name in data:
                data[name] = parse_list(cls._kind(kind), data[name], name, max_len=most)
        for name, (kind, most) in cls.MAPS.items():
            if name in data:
                data[name] = parse_map(cls._kind(kind), data[name], name, max_len=most)
        data.update(cls._parse_extra(data))
        return cls(**data)

    @classmethod
    def _kind(cls, kind: type[Message] | str) -> type[Message]:
        found = getattr(sys.modules[cls.__module__], kind) if isinstance(kind, str) else kind
        return found

    @classmethod
    def _parse_extra(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Fields a subclass parses itself (see fleet.protocol.tasks.TaskMessage)."""
        return {}

    def validate(self) -> None:
        """Raise ProtocolError if a field is out of its range. Subclasses extend this."""


def parse_list(cls: type[T], value: Any, what: str, *, max_len: int) -> list[T]:
    """A JSON list of ``cls`` messages (at most ``max_len``)."""
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(f"{what} must be a list of at most {max_len} objects; received {_short(value)}")
    return [cls.from_dict(v) for v in value]


def parse_map(cls: type[T], value: Any, what: str, *, max_len: int) -> dict[str, T]:
    """A JSON object of name -> ``cls`` message (at most ``max_len`` names of at most 128 characters)."""
    if not isinstance(value, dict) or len(value) > max_len:
        raise ProtocolError(f"{what} must be an object of at most {max_len} names -> objects; received "
                            f"{_short(value)}")
    return {check_str(k, f"{what} name", max_len=128): cls.from_dict(v) for k, v in value.items()}


# ---------------------------------------------------------------------------------------------
# field checks (each returns the value it checked)
# ---------------------------------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    """Validate an identifier (device id, version, campaign id): safe in paths and URLs."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ProtocolError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' starting with a "
            f"letter or digit; received {value!r:.80}"
        )
    return value


def check_sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ProtocolError(f"{what} must be 64 lowercase hex characters (sha256); received {value!r:.80}")
    return value


def check_finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} must be a number; received {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value):
        raise ProtocolError(f"{what} must be finite; received {value!r}")
    return float(value)


def check_fraction(value: Any, what: str) -> float:
    v = check_finite(value, what)
    if not 0.0 <= v <= 1.0:
        raise ProtocolError(f"{what} must be in [0, 1]; received {v}")
    return v


def check_int(value: Any, what: str, *, lo: int | None = None, hi: int | None = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer; received {value!r:.80}")
    if lo is not None and value < lo:
        raise ProtocolError(f"{what} must be >= {lo}; received {value}")
    if hi is not None and value > hi:
        raise ProtocolError(f"{what} must be <= {hi}; received {value!r:.40}")
    return value


def check_str(value: Any, what: str, *, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{what} must be a string of at most {max_len} characters; received {value!r:.80}")
    return value


def check_probs(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not value or len(value) > 100_000:
        raise ProtocolError(f"{what} must be a non-empty list of probabilities; received {value!r:.80}")
    out = [check_finite(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if any(p < 0 or p > 1 for p in out) or abs(sum(out) - 1.0) > 1e-3:
        raise ProtocolError(f"{what} must be probabilities in [0, 1] summing to 1; received sum {sum(out):.4f}")
    return out


def check_tags(value: Any, what: str = "tags") -> dict[str, str]:
    """Condition and metadata tags: at most 32 pairs of short strings."""
    if not isinstance(value, dict) or len(value) > MAX_TAGS:
        raise ProtocolError(f"{what} must be an object of at most {MAX_TAGS} string pairs; received {value!r:.80}")
    for tag, text in value.items():
        check_str(tag, f"{what} name", max_len=MAX_TAG_NAME)
        check_str(text, f"{what}[{tag!r}]", max_len=MAX_TAG_VALUE)
    return value


def fit_tags(tags: dict[Any, Any]) -> dict[str, str]:
    """Any tags made to fit :func:`check_tags`: the first 32 pairs, names and values cut to their limits."""
    return {str(k)[:MAX_TAG_NAME]: str(v)[:MAX_TAG_VALUE] for k, v in list(tags.items())[:MAX_TAGS]}


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false; received {value!r:.40}")
    return value


def check_one_of(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ProtocolError(f"{what} must be one of {list(choices)}; received {value!r:.80}")
    return str(value)


def check_names_list(value: Any, what: str, *, max_len: int, name_check: bool = False) -> list[str]:
    """A list of at most ``max_len`` strings (identifiers when ``name_check``; else up to 128 characters)."""
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(f"{what} must be a list of at most {max_len} strings; received {value!r:.80}")
    for i, v in enumerate(value):
        if name_check:
            check_name(v, f"{what}[{i}]")
        else:
            check_str(v, f"{what}[{i}]", max_len=128)
    return value


def check_number_map(value: Any, what: str) -> dict[str, float]:
    """An object of at most 1000 names -> finite numbers."""
    if not isinstance(value, dict) or len(value) > 1000:
        raise ProtocolError(f"{what} must be an object of at most 1000 names -> numbers; received {value!r:.80}")
    for k, v in value.items():
        check_str(k, f"{what} name", max_len=128)
        check_finite(v, f"{what}[{k!r}]")
    return value


def opt(value: Any, check: Any, what: str, **kw: Any) -> Any:
    """``check(value, what)`` unless ``value`` is None."""
    return None if value is None else check(value, what, **kw)


# ---------------------------------------------------------------------------------------------
# encodings
# ---------------------------------------------------------------------------------------------


def encode_embedding(vector: npt.NDArray[np.floating[Any]]) -> str:
    """A 1-D float vector as base64 of little-endian float16 (compact on the wire)."""
    arr = np.asarray(vector, dtype="<f2").reshape(-1)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_embedding(text: str) -> npt.NDArray[np.float32]:
    """Inverse of :func:`encode_embedding`; returns float32 of shape (d,)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"embedding must be base64 of float16 values; received {text[:40]!r}") from exc
    if len(raw) % 2:
        raise ProtocolError(f"embedding must hold a whole number of float16 values; got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces): what signatures are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


_NAMES: dict[type, frozenset[str]] = {}
_OPTIONAL: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    """A message class's field names (computed once per class: parsing and dumping run per case)."""
    out = _NAMES.get(cls)
    if out is None:
        out = _NAMES[cls] = frozenset(f.name for f in fields(cls))
    return out


def _optional_names(cls: type) -> frozenset[str]:
    """The fields of a message class that may be null: default None, or typed ``X | None``."""
    out = _OPTIONAL.get(cls)
    if out is None:
        out = _OPTIONAL[cls] = frozenset(f.name for f in fields(cls)
                                         if f.default is None or str(f.type).replace(" ", "").endswith("|None"))
    return out


def _plain(value: Any) -> Any:
    """``value`` as plain JSON values: messages as dicts, lists and dicts copied, the rest as it is."""
    if isinstance(value, Message):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _fields_of(obj: Any) -> dict[str, Any]:
    """``json.dumps`` hook: a dataclass message as a dict of its fields (nested messages come back here)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in fields(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:77] + '...' if len(text) > 80 else text}"
