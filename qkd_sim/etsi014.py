"""ETSI GS QKD 014 V1.1.1 key delivery: messages and the KME's logic, without I/O.

Messages are frozen, keyword-only dataclasses with the standard's field names
(``source_KME_ID``, ``key_IDs``, ...), built by strict parsers: a body that is
not exactly the data format of the standard (unknown or duplicate fields, wrong
types, floats where integers belong, NaN, bad base64, IDs that are not UUIDs)
raises :class:`EtsiError` and nothing else (status 400, with an ETSI
``Error`` body). Sizes are in bits, as in the standard.

:class:`KMECore` implements the three methods for one KME,

* Get status  ``GET  /api/v1/keys/{slave_SAE_ID}/status``
* Get key     ``POST|GET /api/v1/keys/{slave_SAE_ID}/enc_keys``  (caller = master SAE)
* Get key with key IDs ``POST|GET /api/v1/keys/{master_SAE_ID}/dec_keys`` (caller = slave SAE)

given the calling SAE's ID (from its TLS client certificate) and ``now``.
Answers follow the standard: 200 with the response data, 400 with an Error
for a request the KME will not serve as asked, 401 (no body: an unknown
caller learns nothing) when the caller is not an SAE of this KME or asks for
keys made for another SAE pair, 503 with an Error when the key pool cannot
serve the whole request now. Requests are all or nothing.

Not supported, refused with 400 as the standard allows: key multicast
(``additional_slave_SAE_IDs``; ``max_SAE_ID_count`` is 0) and any
``extension_mandatory`` parameter. :class:`KMECore` serves SAE pairs whose
KMEs share a QKD link (or the same KME); pairs whose KMEs are joined only
through trusted intermediate KMEs are served by :class:`qkd_sim.relay.RelayKME`,
which wraps a KMECore, and refused here with 400 (:class:`NoDirectLink`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from qkd_sim.pool import DEFAULT_CAPACITY_BITS, MAX_KEY_BITS, KeyIDNotYours, LinkConfig, LinkPool
from qstore import b64
from qstore.b64 import writable_bytes
from qstore.errors import LocalError, RemoteError

MAX_REQUEST_BYTES = 1 << 20
"""Largest request body a KME parses (a Key IDs list of thousands of IDs fits)."""
MAX_ID_LENGTH = 64
JSON_PIECE = 1 << 20
"""Bytes per piece in which a KME writes a Key container (:meth:`KeyContainer.json_pieces`).

Each piece passes through aiohttp's writer and asyncio's TLS layer with a fixed
cost per write; at 1 MiB a KME spends about a fifth less CPU per key byte than
at 256 KiB (``bench/kme.py``, ``transport_bound``), and still holds only one
piece of a 22 MB answer at a time. The first and the last pieces are shorter
(:meth:`KeyContainer.json_pieces`)."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DECIMAL = re.compile(r"[0-9]{1,10}")

JSONObject = dict[str, Any]


class EtsiError(RemoteError):
    """A request refused with 400 and an ETSI ``Error`` body (``message``, ``details``)."""

    status = 400

    def __init__(self, message: str, details: Iterable[JSONObject] = ()):
        self.message = message
        self.details = tuple(details)
        super().__init__(message)


class NoDirectLink(EtsiError):
    """The two SAEs' KMEs share no QKD link, and no relay route joins them."""


class Unauthorized(RemoteError):
    """401 with no body: the caller is not an SAE of this KME, or the keys are not its."""

    status = 401

    def __init__(self) -> None:
        super().__init__("unauthorized")


def is_id(value: object) -> bool:
    """An SAE or KME ID we accept: 1-64 of ``[A-Za-z0-9._-]``, starting alphanumeric.

    The standard leaves IDs free-form; we bound them so that they fit a
    certificate CN and a URL path segment unescaped.
    """
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _shown(value: object) -> str:
    return value if is_id(value) else "<malformed>"  # type: ignore[return-value]


# -- strict JSON --------------------------------------------------------------


def _pairs(pairs: list[tuple[str, Any]]) -> JSONObject:
    out: JSONObject = {}
    for k, v in pairs:
        if k in out:
            raise EtsiError("duplicate field in JSON object", [{"field": k[:MAX_ID_LENGTH]}])
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise EtsiError("number out of range")
    return value


def _no_constant(name: str) -> None:
    raise EtsiError(f"{name} is not JSON")


def loads(body: bytes | bytearray | memoryview | str, *, limit: int = MAX_REQUEST_BYTES) -> object:
    """Parse a JSON body strictly: UTF-8, no duplicate fields, no NaN/Infinity, at most ``limit``."""
    if isinstance(body, bytes | bytearray | memoryview):
        if len(body) > limit:
            raise EtsiError(f"body longer than {limit} bytes")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise EtsiError("body is not UTF-8") from None
    elif isinstance(body, str):
        if len(body) > limit:
            raise EtsiError(f"body longer than {limit} bytes")
        text = body
    else:
        raise EtsiError("body must be JSON text")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_float=_finite, parse_constant=_no_constant)
    except EtsiError:
        raise
    except (ValueError, RecursionError):
        raise EtsiError("body is not valid JSON") from None


def dumps(obj: object) -> bytes:
    """Compact JSON, never NaN."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _object(data: object, what: str, required: Iterable[str], optional: Iterable[str] = ()) -> JSONObject:
    if not isinstance(data, dict):
        raise EtsiError(f"{what} must be a JSON object")
    required, allowed = set(required), set(required) | set(optional)
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise EtsiError(f"unknown field(s) in {what}", [{"unknown_fields": _names(unknown)}])
    missing = sorted(required - set(data))
    if missing:
        raise EtsiError(f"missing field(s) in {what}", [{"missing_fields": missing}])
    return data


def _names(names: Iterable[str]) -> list[str]:
    """At most 16 names, each cut to 64 characters, to echo in ``details``."""
    return [n[:MAX_ID_LENGTH] for n in list(names)[:16]]


def _parsed(data: object) -> object:
    return loads(data) if isinstance(data, bytes | bytearray | memoryview | str) else data


def _build(cls: type, **fields: Any) -> Any:
    """Construct a message from remote input: a validation failure is the remote's (400)."""
    try:
        return cls(**fields)
    except LocalError as exc:
        raise EtsiError(str(exc)) from None


# -- field checks (LocalError: wrong values given to a constructor) -------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: object, lo: int = 0, hi: int = 2**63 - 1) -> None:
    if not _is_int(v) or not lo <= v <= hi:  # type: ignore[operator]
        raise LocalError(f"{name} must be an integer in [{lo}, {hi}]")


def _id(name: str, v: object) -> None:
    if not is_id(v):
        raise LocalError(f"{name} must be 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._-]")


def _ext(name: str, v: object, *, optional: bool = True) -> None:
    if v is None and optional:
        return
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise LocalError(f"{name} must be a JSON object")


def _ext_list(name: str, v: object) -> tuple[JSONObject, ...]:
    if not isinstance(v, list | tuple):
        raise LocalError(f"{name} must be an array of objects")
    for item in v:
        _ext(name, item, optional=False)
    return tuple(v)


def canonical_key_id(v: object) -> str:
    """The lowercase 8-4-4-4-12 form of a key_ID (LocalError if it is not a UUID)."""
    if not isinstance(v, str) or not _UUID.fullmatch(v):
        raise LocalError("key_ID must be a UUID (8-4-4-4-12 hexadecimal)")
    return v.lower()


# -- messages ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Status:
    """Status data format (GS QKD 014 §6.1): what a master SAE may ask for a slave SAE."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: JSONObject | None = None

    _IDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
    _INTS = ("key_size", "stored_key_count", "max_key_count", "max_key_per_request",
             "max_key_size", "min_key_size", "max_SAE_ID_count")

    def __post_init__(self) -> None:
        for name in self._IDS:
            _id(name, getattr(self, name))
        for name in self._INTS:
            _int(name, getattr(self, name))
        _ext("status_extension", self.status_extension)

    def to_json(self) -> JSONObject:
        out = {name: getattr(self, name) for name in self._IDS + self._INTS}
        if self.status_extension is not None:
            out["status_extension"] = self.status_extension
        return out

    @classmethod
    def from_json(cls, data: object) -> Status:
        obj = _object(_parsed(data), "Status", cls._IDS + cls._INTS, ("status_extension",))
        return _build(cls, **obj)


@dataclass(frozen=True, kw_only=True)
class KeyRequest:
    """Key request data format (§6.2), the parameters of Get key. ``size`` None: the KME's key_size."""

    number: int = 1
    size: int | None = None
    additional_slave_SAE_IDs: tuple[str, ...] = ()
    extension_mandatory: tuple[JSONObject, ...] = ()
    extension_optional: tuple[JSONObject, ...] = ()

    def __post_init__(self) -> None:
        _int("number", self.number, 1, 2**31 - 1)
        if self.size is not None:
            _int("size", self.size, 1, 2**31 - 1)
        if not isinstance(self.additional_slave_SAE_IDs, list | tuple):
            raise LocalError("additional_slave_SAE_IDs must be an array of SAE IDs")
        for sae in self.additional_slave_SAE_IDs:
            _id("additional_slave_SAE_IDs[]", sae)
        object.__setattr__(self, "additional_slave_SAE_IDs", tuple(self.additional_slave_SAE_IDs))
        for name in ("extension_mandatory", "extension_optional"):
            object.__setattr__(self, name, _ext_list(name, getattr(self, name)))

    def to_json(self) -> JSONObject:
        out: JSONObject = {"number": self.number}
        if self.size is not None:
            out["size"] = self.size
        if self.additional_slave_SAE_IDs:
            out["additional_slave_SAE_IDs"] = list(self.additional_slave_SAE_IDs)
        if self.extension_mandatory:
            out["extension_mandatory"] = list(self.extension_mandatory)
        if self.extension_optional:
            out["extension_optional"] = list(self.extension_optional)
        return out

    @classmethod
    def from_json(cls, data: object) -> KeyRequest:
        """The POST body of Get key."""
        obj = _object(_parsed(data), "Key request", (), ("number", "size", "additional_slave_SAE_IDs",
                                                         "extension_mandatory", "extension_optional"))
        return _build(cls, **obj)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> KeyRequest:
        """The GET form of Get key: optional ``number`` and ``size``, decimal, each at most once."""
        params = _query(query, ("number", "size"))
        return _build(cls, **{k: int(v) for k, v in params.items()})

    def to_query(self) -> dict[str, str]:
        if self.additional_slave_SAE_IDs or self.extension_mandatory or self.extension_optional:
            raise LocalError("only number and size can be sent with GET; use POST")
        out = {"number": str(self.number)}
        if self.size is not None:
            out["size"] = str(self.size)
        return out


def _query(query: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    keys = list(query.keys())
    unknown = sorted({k for k in keys if k not in allowed})
    if unknown:
        raise EtsiError("unknown query parameter(s)", [{"unknown_parameters": _names(unknown)}])
    if len(set(keys)) != len(keys):
        raise EtsiError("a query parameter is given twice")
    out = {}
    for k in keys:
        v = query[k]
        if k == "key_ID":
            out[k] = v
        elif not isinstance(v, str) or not _DECIMAL.fullmatch(v):
            raise EtsiError(f"query parameter {k} must be a decimal integer", [{k: "not a decimal integer"}])
        else:
            out[k] = v
    return out


@dataclass(frozen=True, kw_only=True)
class KeyIDEntry:
    """One element of ``key_IDs``: the key_ID (stored lowercase) and its optional extension."""

    key_ID: str
    key_ID_extension: JSONObject | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_ID", canonical_key_id(self.key_ID))
        _ext("key_ID_extension", self.key_ID_extension)

    def to_json(self) -> JSONObject:
        out: JSONObject = {"key_ID": self.key_ID}
        if self.key_ID_extension is not None:
            out["key_ID_extension"] = self.key_ID_extension
        return out


@dataclass(frozen=True, kw_only=True)
class KeyIDs:
    """Key IDs data format (§6.4), the parameters of Get key with key IDs."""

    key_IDs: tuple[KeyIDEntry, ...]
    key_IDs_extension: JSONObject | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_IDs, list | tuple) or not self.key_IDs:
            raise LocalError("key_IDs must be a non-empty array")
        if not all(isinstance(e, KeyIDEntry) for e in self.key_IDs):
            raise LocalError("key_IDs holds KeyIDEntry objects")
        object.__setattr__(self, "key_IDs", tuple(self.key_IDs))
        _ext("key_IDs_extension", self.key_IDs_extension)

    @classmethod
    def of(cls, key_ids: Iterable[str]) -> KeyIDs:
        """A request for these key_IDs, without extensions."""
        return cls(key_IDs=tuple(KeyIDEntry(key_ID=k) for k in key_ids))

    @property
    def ids(self) -> list[str]:
        return [e.key_ID for e in self.key_IDs]

    def to_json(self) -> JSONObject:
        out: JSONObject = {"key_IDs": [e.to_json() for e in self.key_IDs]}
        if self.key_IDs_extension is not None:
            out["key_IDs_extension"] = self.key_IDs_extension
        return out

    @classmethod
    def from_json(cls, data: object) -> KeyIDs:
        obj = _object(_parsed(data), "Key IDs", ("key_IDs",), ("key_IDs_extension",))
        entries = obj["key_IDs"]
        if not isinstance(entries, list):
            raise EtsiError("key_IDs must be an array")
        built = tuple(
            _build(KeyIDEntry, **_object(e, "key_IDs element", ("key_ID",), ("key_ID_extension",)))
            for e in entries
        )
        return _build(cls, key_IDs=built, key_IDs_extension=obj.get("key_IDs_extension"))

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> KeyIDs:
        """The GET form of Get key with key IDs: exactly one ``key_ID``."""
        params = _query(query, ("key_ID",))
        if "key_ID" not in params:
            raise EtsiError("missing query parameter key_ID")
        return _build(cls, key_IDs=(_build(KeyIDEntry, key_ID=params["key_ID"]),))


@dataclass(frozen=True, kw_only=True)
class Key:
    """One element of ``keys`` in a Key container; ``key`` is raw bytes (base64 on the wire)."""

    key_ID: str
    key: bytes = field(repr=False)
    key_ID_extension: JSONObject | None = None
    key_extension: JSONObject | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_ID", canonical_key_id(self.key_ID))
        if not isinstance(self.key, bytes) or not self.key:
            raise LocalError("key must be non-empty bytes")
        _ext("key_ID_extension", self.key_ID_extension)
        _ext("key_extension", self.key_extension)

    def to_json(self) -> JSONObject:
        out: JSONObject = {"key_ID": self.key_ID}
        if self.key_ID_extension is not None:
            out["key_ID_extension"] = self.key_ID_extension
        out["key"] = b64.encode(self.key).decode("ascii")
        if self.key_extension is not None:
            out["key_extension"] = self.key_extension
        return out

    @classmethod
    def from_json(cls, data: object) -> Key:
        obj = _object(data, "keys element", ("key_ID", "key"), ("key_ID_extension", "key_extension"))
        encoded = obj["key"]
        if not isinstance(encoded, str):
            raise EtsiError("key must be a base64 string")
        try:
            raw = b64.decode(encoded.encode("ascii"))
        except (b64.Base64Error, UnicodeEncodeError):
            raise EtsiError("key is not valid base64") from None
        return _build(cls, **{**obj, "key": raw})


@dataclass(frozen=True, kw_only=True)
class KeyContainer:
    """Key container data format (§6.3): the answer of Get key and Get key with key IDs."""

    keys: tuple[Key, ...]
    key_container_extension: JSONObject | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.keys, list | tuple) or not all(isinstance(k, Key) for k in self.keys):
            raise LocalError("keys must be an array of Key")
        object.__setattr__(self, "keys", tuple(self.keys))
        _ext("key_container_extension", self.key_container_extension)

    def __repr__(self) -> str:
        return f"KeyContainer(<{len(self.keys)} keys>)"

    def to_json(self) -> JSONObject:
        out: JSONObject = {"keys": [k.to_json() for k in self.keys]}
        if self.key_container_extension is not None:
            out["key_container_extension"] = self.key_container_extension
        return out

    def to_json_bytes(self) -> bytes:
        """``dumps(self.to_json())``, with the keys written directly (see :meth:`json_pieces`)."""
        parts = [_KEYS_OPEN]
        for i, k in enumerate(self.keys):
            if i:
                parts.append(b",")
            if k.key_ID_extension is None and k.key_extension is None:
                parts += (_KEY_ID_FIELD, k.key_ID.encode("ascii"), _KEY_FIELD, b64.encode(k.key), b'"}')
            else:
                parts.append(dumps(k.to_json()))
        parts.append(b"]")
        if self.key_container_extension is not None:
            parts += (b',"key_container_extension":', dumps(self.key_container_extension))
        parts.append(b"}")
        return b"".join(parts)

    @property
    def key_bytes(self) -> int:
        """Bytes of key material held (a Key container's JSON is about 4/3 of that)."""
        return sum(len(k.key) for k in self.keys)

    def _segments(self) -> Iterator[bytes | Key]:
        """The JSON text in order: literal bytes, and keys whose base64 goes in their place."""
        yield _KEYS_OPEN
        for i, k in enumerate(self.keys):
            if k.key_ID_extension is None and k.key_extension is None:
                yield (b'{"key_ID":"' if i == 0 else b',{"key_ID":"') + k.key_ID.encode("ascii") + _KEY_FIELD
                yield k
                yield b'"}'
            else:
                yield (b"," if i else b"") + dumps(k.to_json())
        if self.key_container_extension is None:
            yield b"]}"
        else:
            yield b'],"key_container_extension":' + dumps(self.key_container_extension) + b"}"

    def json_length(self) -> int:
        """``len(self.to_json_bytes())``, without writing it (a Content-Length)."""
        return sum(len(seg) if isinstance(seg, bytes) else b64.encoded_length(len(seg.key))
                   for seg in self._segments())

    def json_pieces(self, piece: int = JSON_PIECE) -> Iterator[bytes]:
        """``dumps(self.to_json())`` in consecutive pieces of about ``piece`` bytes.

        key_IDs and base64 need no JSON escaping, so a key without extensions
        is pasted in as is, its base64 written straight into the piece; the
        generic encoder would scan every character of megabytes of base64. A
        KME sends the pieces as they are made, so no whole body (22 MB for
        16 keys of 1 MiB) is ever built, and the SAE decodes the first piece
        while the KME encodes the next.

        The first piece, and those in the last ``2 * piece`` bytes of the
        body, are a quarter as long: the SAE cannot start before the first
        piece is written, and still has the last one to decode when the KME
        is done, so small pieces there shorten the whole answer.
        """
        codec = b64.codec()
        plan: list[bytes | memoryview] = []  # literal bytes, and key bytes to encode
        size = 0
        total, written = self.json_length(), 0
        target = _piece_target(written, total, piece)
        for seg in self._segments():
            if size >= target:
                yield _write_piece(plan, size, codec)
                written += size
                plan, size = [], 0
                target = _piece_target(written, total, piece)
            if isinstance(seg, bytes):
                plan.append(seg)
                size += len(seg)
                continue
            if len(seg.key) <= _SMALL_KEY:  # encoded whole: not worth a place in the plan
                text = b64.encode(seg.key)
                plan.append(text)
                size += len(text)
                continue
            raw = memoryview(seg.key)
            at = 0
            while at < len(raw):
                # whole groups of 3 bytes, so that the pieces' base64 joins up; at least one per piece
                room = max((target - size) // 4 * 3, 0 if size else 3)
                if room == 0:
                    yield _write_piece(plan, size, codec)
                    written += size
                    plan, size = [], 0
                    target = _piece_target(written, total, piece)
                    continue
                part = raw[at : at + room]
                plan.append(part)
                size += b64.encoded_length(len(part))
                at += len(part)
        yield _write_piece(plan, size, codec)

    @classmethod
    def from_json(cls, data: object, *, limit: int = MAX_REQUEST_BYTES) -> KeyContainer:
        """Parse a Key container (``limit`` bounds a raw body: size it to the keys asked for)."""
        if isinstance(data, bytes | bytearray) and len(data) <= limit:
            keys = _compact_keys(data)
            if keys is not None:
                return cls(keys=keys)
        if isinstance(data, bytes | bytearray | memoryview | str):
            data = loads(data, limit=limit)
        obj = _object(data, "Key container", ("keys",), ("key_container_extension",))
        if not isinstance(obj["keys"], list):
            raise EtsiError("keys must be an array")
        keys = tuple(Key.from_json(k) for k in obj["keys"])
        return _build(cls, keys=keys, key_container_extension=obj.get("key_container_extension"))


_KEY_ID_FIELD = b'{"key_ID":"'
_KEY_FIELD = b'","key":"'
_KEYS_OPEN = b'{"keys":['
_UUID_LENGTH = 36
_SMALL_KEY = 1 << 13  # keys up to this many bytes are base64-encoded whole, and read from whole bodies
_SMALL_BODY = 1 << 18  # Key containers up to this long are parsed whole (KeyContainerReader)


def _piece_target(written: int, total: int, piece: int) -> int:
    """How long the next piece of :meth:`KeyContainer.json_pieces` should be."""
    if written == 0 or total - written <= 2 * piece:
        return max(piece // 4, 1)
    return piece


def _write_piece(plan: list[bytes | memoryview], size: int, codec: b64.Codec) -> bytes:
    """One piece of a Key container: literals copied, key bytes base64-encoded in place."""
    if all(isinstance(p, bytes) for p in plan):
        return b"".join(plan)  # type: ignore[arg-type]
    out, view = writable_bytes(size)
    with view:
        at = 0
        for p in plan:
            if isinstance(p, bytes):
                view[at : at + len(p)] = p
                at += len(p)
            else:
                at += codec.encode_into(p, view[at:])
    return out


def _compact_keys(body: bytes | bytearray) -> tuple[Key, ...] | None:
    """The keys of a Key container written exactly as :meth:`KeyContainer.to_json_bytes` writes one.

    That is ``{"keys":[{"key_ID":"<UUID>","key":"<base64>"},...]}`` with no
    whitespace, escapes or other fields: then the strict parser would return
    the same keys, and this finds them with a few searches instead of scanning
    every character. None for any other body (valid or not): the caller
    parses it with the strict parser, which also makes the error.
    """
    end = len(body) - 2
    if not body.startswith(_KEYS_OPEN) or body[end:] != b"]}":
        return None
    pos = len(_KEYS_OPEN)
    if pos == end:
        return ()
    keys: list[Key] = []
    with memoryview(body) as view:
        while True:
            id_at = pos + len(_KEY_ID_FIELD)
            key_at = id_at + _UUID_LENGTH + len(_KEY_FIELD)
            if not (body.startswith(_KEY_ID_FIELD, pos)
                    and body.startswith(_KEY_FIELD, key_at - len(_KEY_FIELD))):
                return None
            key_end = body.find(b'"', key_at, end)
            if key_end < 0 or body[key_end + 1] != 0x7D:  # "}"
                return None
            key_id = bytes(view[id_at : id_at + _UUID_LENGTH])
            if not key_id.isascii() or not _UUID.fullmatch(key_id.decode("ascii")):
                return None
            try:
                raw = b64.decode(view[key_at:key_end])
            except b64.Base64Error:
                return None
            if not raw:
                return None
            keys.append(Key(key_ID=key_id.decode("ascii"), key=raw))
            pos = key_end + 2
            if pos == end:
                return tuple(keys)
            if body[pos] != 0x2C:  # ","
                return None
            pos += 1


_UUID_TEXT = rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_FIRST_GAP = re.compile(rb'\{"keys":\[\{"key_ID":"(' + _UUID_TEXT + rb')","key":"')
_NEXT_GAP = re.compile(rb'"\},\{"key_ID":"(' + _UUID_TEXT + rb')","key":"')
_FIRST_GAP_LENGTH = len(_KEYS_OPEN) + len(_KEY_ID_FIELD) + _UUID_LENGTH + len(_KEY_FIELD)
_NEXT_GAP_LENGTH = len(b'"},') + len(_KEY_ID_FIELD) + _UUID_LENGTH + len(_KEY_FIELD)
_NO_KEYS = b'{"keys":[]}'
_LAST = b'"}]}'
_SHORT_TEXT = 64  # key text shorter than this is gathered before it is decoded


class KeyContainerReader:
    """A Key container parsed as it arrives, each key decoded straight into its bytes (sans-IO).

    ``feed(data)`` the body as it comes, then ``finish()``: the same
    :class:`KeyContainer`, or the same :class:`EtsiError`, as
    ``KeyContainer.from_json(body, limit=limit)``. A body in the form
    :meth:`KeyContainer.json_pieces` writes is decoded piece by piece while
    the rest is in transit, without ever holding the body (22 MB of base64
    for 16 keys of 1 MiB); the text between keys is checked against that
    form, and base64 as strictly as :mod:`qstore.b64` does. At the first byte
    that leaves the form, the reader rebuilds the text read so far (exactly:
    only base64 that re-encodes to itself is decoded early) and hands the
    whole body to the strict parser at the end.

    ``key_bytes``: the size of the keys expected, if known; each key is then
    decoded into a bytes object of that size, made once. Otherwise the first
    key's size is taken for the others. Bodies up to ``whole_below`` bytes are
    gathered and parsed whole, which is faster for many small keys.
    """

    def __init__(self, *, limit: int = MAX_REQUEST_BYTES, key_bytes: int | None = None,
                 whole_below: int = _SMALL_BODY):
        self._limit = limit
        self._whole_below = whole_below
        self._size_hint = key_bytes
        self._received = 0
        self._gaps: list[bytes] = []  # the fixed text before each key's base64
        self._keys: list[tuple[str, bytes, bytes]] = []  # key_ID, key, its last 4 characters
        self._gap = bytearray()  # the gap being read (or the end, once read)
        self._in_key = False
        self._ended = False
        self._key_id = ""
        # the key being decoded: its bytes object and a view on it, or parts when it outgrew that
        self._out: bytes | None = None
        self._view: memoryview | None = None
        self._parts: list[bytes] = []
        self._filled = 0
        self._carry = b""  # undecoded characters of the key (fewer than 8)
        self._body: list[bytes] | None = None  # the body as received, once it left the form
        self._whole: list[bytes] | None = []  # the body while it is short enough to parse whole

    def __repr__(self) -> str:
        return f"KeyContainerReader(<{len(self._keys)} keys, {self._received} bytes>)"

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> None:
        """The next bytes of the body: ``data[start:end]`` (read in place from bytes or a bytearray)."""
        end = len(data) if end is None else end
        if isinstance(data, memoryview):
            data, start, end = bytes(data[start:end]), 0, end - start
        self._received += end - start
        if self._received > self._limit:
            self._body = self._whole = None
            self._release()
            return
        if self._body is not None:
            self._body.append(bytes(memoryview(data)[start:end]))
            return
        if self._whole is not None:
            self._whole.append(bytes(memoryview(data)[start:end]))
            if self._received <= self._whole_below:
                return
            data, self._whole = b"".join(self._whole), None  # long: parse it as it comes from here on
            start, end = 0, len(data)
        chunk: bytes | bytearray = data
        pos = start
        while pos < end:
            if self._ended:
                self._leave(chunk, pos, end)
                return
            if not self._in_key:
                pos = self._read_gap(chunk, pos, end)
                if pos < 0:
                    return
                continue
            quote = chunk.find(b'"', pos, end)
            stop = end if quote < 0 else quote
            if not self._read_text(chunk, pos, stop, final=quote >= 0):
                self._leave(chunk, pos, end)
                return
            pos = stop
            if quote >= 0:
                self._in_key = False

    def finish(self) -> KeyContainer:
        """The Key container (EtsiError when the body is not one)."""
        if self._received > self._limit:
            raise EtsiError(f"body longer than {self._limit} bytes")
        if self._whole is not None:  # short: the whole-body parser is faster
            body, self._whole = b"".join(self._whole), None
            return KeyContainer.from_json(body, limit=self._limit)
        if self._body is None and not self._ended:
            self._leave(b"", 0, 0)  # cut short: the strict parser says how
        if self._body is not None:
            body, self._body = b"".join(self._body), None
            return KeyContainer.from_json(body, limit=self._limit)
        return KeyContainer(keys=tuple(Key(key_ID=kid, key=key) for kid, key, _ in self._keys))

    # -- the form -----------------------------------------------------------------

    def _read_gap(self, chunk: bytes | bytearray, pos: int, end: int) -> int:
        """Take the fixed text before the next key (or the end); the next position, -1 when left."""
        first = not self._keys
        short, full = (_NO_KEYS, _FIRST_GAP_LENGTH) if first else (_LAST, _NEXT_GAP_LENGTH)
        gap = self._gap
        if len(gap) < len(short):
            take = len(short) - len(gap)
            gap += chunk[pos : min(end, pos + take)]
            pos = min(end, pos + take)
            if len(gap) < len(short):
                return pos
            if gap == short:
                self._ended = True
                return pos
        take = full - len(gap)
        gap += chunk[pos : min(end, pos + take)]
        pos = min(end, pos + take)
        if len(gap) < full:
            return pos
        match = (_FIRST_GAP if first else _NEXT_GAP).fullmatch(gap)
        if match is None:
            self._leave(chunk, pos, end)
            return -1
        self._gaps.append(bytes(gap))
        self._key_id = match.group(1).decode("ascii")
        self._gap = bytearray()
        self._in_key = True
        self._start_key()
        return pos

    def _start_key(self) -> None:
        self._parts, self._filled, self._carry = [], 0, b""

    def _room(self, n: int) -> memoryview:
        """Where the next ``n`` bytes of the key go."""
        hint = self._size_hint
        if self._filled == 0 and self._view is None and hint is not None and 2 <= n <= hint:
            self._out, self._view = writable_bytes(hint)
        view = self._view
        if view is not None and self._filled + n <= len(view):
            return view[self._filled : self._filled + n]
        if view is not None:  # more than expected: go on in parts
            self._parts.append(bytes(view[: self._filled]))
            self._release()
        part = bytearray(n)
        self._parts.append(part)  # type: ignore[arg-type]
        return memoryview(part)

    def _decode(self, text: bytes | memoryview) -> None:
        """Decode whole quads of the key (Base64Error when they are not base64)."""
        n = b64.decoded_length(text)
        if n:
            with self._room(n) as room:
                b64.decode_into(text, room)
            self._filled += n

    def _read_text(self, chunk: bytes | bytearray, pos: int, end: int, *, final: bool) -> bool:
        """Decode the key's base64 in ``chunk[pos:end]`` (the rest of it when ``final``); False: left."""
        filled, carry = self._filled, self._carry
        if final and not filled and not carry and 4 <= end - pos <= 2 * _SMALL_KEY:  # a whole small key here
            try:
                key = b64.decode(memoryview(chunk)[pos:end])
            except b64.Base64Error:
                return False
            self._keys.append((self._key_id, key, bytes(chunk[end - 4 : end])))
            if self._size_hint is None:
                self._size_hint = len(key)
            return True
        try:
            last = self._decode_text(chunk, pos, end, final=final)
        except b64.Base64Error:
            self._filled, self._carry = filled, carry  # as before this text, to rebuild it
            return False
        if final:
            self._keys.append((self._key_id, self._finish_key(), last))
        return True

    def _decode_text(self, chunk: bytes | bytearray, pos: int, end: int, *, final: bool) -> bytes:
        """Decode what can be decoded now; when ``final``, the key's last 4 characters."""
        with memoryview(chunk) as whole:
            text = whole[pos:end]
            carry = self._carry
            if len(carry) + len(text) < _SHORT_TEXT:
                text = memoryview(carry + bytes(text))
            else:  # complete the carried quad; what follows is at least 54 characters
                if carry:
                    k = -len(carry) % 4
                    head, text = carry + bytes(text[:k]), text[k:]
                    if head.endswith(b"="):
                        raise b64.Base64Error("padding before the end of a key")
                    self._decode(head)
            if not final:
                quads = len(text) // 4 * 4
                if quads and text[quads - 1] == 0x3D:  # "=": the key's last quad, or an error; keep it
                    quads -= 4
                self._decode(text[:quads])
                self._carry = bytes(text[quads:])
                return b""
            if len(text) < 4:
                raise b64.Base64Error("a key's base64 is empty or not whole quads")
            self._decode(text)
            self._carry = b""
            return bytes(text[-4:])

    def _finish_key(self) -> bytes:
        view, out = self._view, self._out
        if view is not None and out is not None and self._filled == len(view):
            self._release()
            key = out
        else:
            if view is not None:
                self._parts.append(bytes(view[: self._filled]))
                self._release()
            key = b"".join(self._parts)
        self._out, self._parts, self._carry = None, [], b""
        if self._size_hint is None:
            self._size_hint = len(key)
        return key

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
        self._view = self._out = None

    # -- leaving the form ---------------------------------------------------------

    def _leave(self, chunk: bytes | bytearray, pos: int, end: int) -> None:
        """From ``chunk[pos:end]`` on the body is not in the form: keep it whole for the strict parser."""
        self._body = [self._text_so_far(), bytes(chunk[pos:end])]
        self._keys, self._gaps, self._parts = [], [], []
        self._release()

    def _text_so_far(self) -> bytes:
        """Exactly the text fed before the current position (see the class docstring)."""
        parts: list[bytes] = []
        for i, gap in enumerate(self._gaps):
            parts.append(gap)
            if i < len(self._keys):
                _, key, last = self._keys[i]
                parts += [b64.encode(key[: len(key) - (3 - last.count(b"="))]), last]
        if self._in_key:  # the key being read: its quads so far, and what is not decoded yet
            done = bytes(self._view[: self._filled]) if self._view is not None else b"".join(self._parts)
            parts += [b64.encode(done[: self._filled]), self._carry]
        else:
            parts.append(bytes(self._gap))
        return b"".join(parts)


@dataclass(frozen=True, kw_only=True)
class Error:
    """Error data format (§6.5)."""

    message: str
    details: tuple[JSONObject, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.message, str):
            raise LocalError("message must be a string")
        object.__setattr__(self, "details", _ext_list("details", self.details))

    def to_json(self) -> JSONObject:
        out: JSONObject = {"message": self.message}
        if self.details:
            out["details"] = list(self.details)
        return out

    @classmethod
    def from_json(cls, data: object) -> Error:
        obj = _object(_parsed(data), "Error", ("message",), ("details",))
        return _build(cls, message=obj["message"], details=obj.get("details", ()))

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        """The Error body for one of our exceptions (``details`` when it carries them)."""
        details = getattr(exc, "details", ())
        return cls(message=str(exc), details=tuple(details) if isinstance(details, tuple | list) else ())


# -- the KME ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one KME serves per request; sizes in bits, multiples of 8, at most 1 MiB."""

    key_size: int = 256
    min_key_size: int = 8
    max_key_size: int = MAX_KEY_BITS
    max_key_count: int = 100_000
    max_key_per_request: int = 128

    def __post_init__(self) -> None:
        for name in ("key_size", "min_key_size", "max_key_size"):
            v = getattr(self, name)
            _int(name, v, 8, MAX_KEY_BITS)
            if v % 8:
                raise LocalError(f"{name} must be a multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise LocalError("need min_key_size <= key_size <= max_key_size")
        _int("max_key_count", self.max_key_count, 1)
        _int("max_key_per_request", self.max_key_per_request, 1, 1 << 20)


class KMECore:
    """One KME's key delivery: its SAEs, the SAE directory, its links' pools and limits.

    ``directory`` maps SAE IDs to the ID of the KME they are attached to (this
    KME's own SAEs are added). Pairs of SAEs on this KME get keys from a local
    pool seeded with ``local_seed`` (random when None): no link is involved.
    Methods are synchronous and complete, so an event loop serialises them and
    no key is handed to two callers. Not thread-safe.
    """

    max_SAE_ID_count = 0

    def __init__(
        self,
        *,
        kme_id: str,
        saes: Iterable[str],
        directory: Mapping[str, str] = MappingProxyType({}),
        links: Iterable[LinkConfig] = (),
        limits: Limits | None = None,
        local_seed: bytes | None = None,
    ):
        _id("kme_id", kme_id)
        self.kme_id = kme_id
        self.limits = limits or Limits()
        self.saes = frozenset(saes)
        for sae in self.saes:
            _id("SAE ID", sae)
        table = dict(directory)
        for sae, kme in table.items():
            _id("SAE ID", sae)
            _id("KME ID", kme)
        for sae in self.saes:
            if table.setdefault(sae, kme_id) != kme_id:
                raise LocalError(f"SAE {sae} is attached here, but the directory puts it at {table[sae]}")
        self.directory: Mapping[str, str] = MappingProxyType(table)
        self._out: dict[str, LinkPool] = {}
        self._in: dict[str, LinkPool] = {}
        for link in links:
            if link.peer == kme_id or link.peer in self._out:
                raise LocalError(f"link to {link.peer}: a link joins this KME to another KME, once")
            self._out[link.peer], self._in[link.peer] = link.pools(kme_id)
        # Two SAEs of this KME need no QKD link (the KME's own random source serves them, without limit):
        # as large as a link's pool, so that a client's 4 MiB chunk to the node of its own site fits.
        capacity = max(self.limits.max_key_count * self.limits.key_size, DEFAULT_CAPACITY_BITS)
        local = LinkPool(seed=local_seed or os.urandom(32), master_kme=kme_id, slave_kme=kme_id,
                         capacity_bits=capacity, initial_bits=capacity)
        self._out[kme_id] = self._in[kme_id] = local

    def __repr__(self) -> str:
        peers = sorted(self._out.keys() - {self.kme_id})
        return f"KMECore({self.kme_id}, saes={len(self.saes)}, links={peers})"

    def authorize(self, caller: str | None) -> str:
        """The caller's SAE ID if it is an SAE of this KME, else :class:`Unauthorized`."""
        if caller is None or caller not in self.saes:
            raise Unauthorized()
        return caller

    def kme_of(self, sae: str, role: str) -> str:
        """The KME ``sae`` is attached to (400 naming ``role`` when the directory has no such SAE)."""
        kme = self.directory.get(sae) if is_id(sae) else None
        if kme is None:
            raise EtsiError(f"unknown {role} {_shown(sae)}", [{role: _shown(sae)}])
        return kme

    def linked(self, kme: str) -> bool:
        """Whether this KME shares a QKD link with ``kme`` (or is ``kme``: the local pool)."""
        return kme in self._out

    @property
    def peers(self) -> frozenset[str]:
        """The KMEs this KME shares a QKD link with."""
        return frozenset(self._out.keys() - {self.kme_id})

    def outbound(self, peer: str) -> LinkPool:
        """Master end of the link direction toward ``peer`` (LocalError when not linked).

        Hazmat: the pool hands out raw link key; the KME methods are the recipes.
        """
        if peer == self.kme_id or peer not in self._out:
            raise LocalError(f"KME {self.kme_id} has no QKD link to {peer}")
        return self._out[peer]

    def inbound(self, peer: str) -> LinkPool:
        """Slave end of the link direction from ``peer`` (LocalError when not linked). Hazmat."""
        if peer == self.kme_id or peer not in self._in:
            raise LocalError(f"KME {self.kme_id} has no QKD link to {peer}")
        return self._in[peer]

    def _pool(self, pools: dict[str, LinkPool], kme: str) -> LinkPool:
        pool = pools.get(kme)
        if pool is None:
            raise NoDirectLink(
                f"no direct QKD link between KME {self.kme_id} and KME {kme}, and no relay route to it",
                [{"source_KME_ID": self.kme_id, "target_KME_ID": kme}],
            )
        return pool

    def pool_to(self, slave_SAE_ID: str) -> LinkPool:
        """The master end of the direction that serves keys for ``slave_SAE_ID``."""
        return self._pool(self._out, self.kme_of(slave_SAE_ID, "slave_SAE_ID"))

    def status(self, caller: str | None, slave_SAE_ID: str, now: float) -> Status:
        """Get status: key available to ``caller`` (master) for ``slave_SAE_ID``."""
        master = self.authorize(caller)
        target = self.kme_of(slave_SAE_ID, "slave_SAE_ID")
        pool = self._pool(self._out, target)
        lim = self.limits
        max_count = lim.max_key_count
        if math.isfinite(pool.capacity_bits):
            max_count = min(max_count, int(pool.capacity_bits // lim.key_size))
        avail = pool.available_bits(now)
        stored = max_count if avail >= max_count * lim.key_size else int(avail // lim.key_size)
        return Status(
            source_KME_ID=self.kme_id, target_KME_ID=target, master_SAE_ID=master,
            slave_SAE_ID=slave_SAE_ID, key_size=lim.key_size, stored_key_count=stored,
            max_key_count=max_count, max_key_per_request=lim.max_key_per_request,
            max_key_size=lim.max_key_size, min_key_size=lim.min_key_size,
            max_SAE_ID_count=self.max_SAE_ID_count,
        )

    def enc_keys(
        self, caller: str | None, slave_SAE_ID: str, request: KeyRequest, now: float
    ) -> KeyContainer:
        """Get key: ``request.number`` new keys for ``caller`` (master) and ``slave_SAE_ID``."""
        master = self.authorize(caller)
        target = self.kme_of(slave_SAE_ID, "slave_SAE_ID")
        size = self.check_request(master, slave_SAE_ID, request)
        pool = self._pool(self._out, target)
        need = request.number * size
        if need > pool.capacity_bits:
            raise EtsiError("request exceeds the key pool of the link",
                            [{"requested_bits": need, "capacity_bits": int(pool.capacity_bits)}])
        taken = pool.take(request.number, size, now, master_sae=master, slave_sae=slave_SAE_ID)
        return KeyContainer(keys=tuple(Key(key_ID=kid, key=key) for kid, key in taken))

    def check_request(self, master: str, slave_SAE_ID: str, request: KeyRequest) -> int:
        """The key size in bits a Get key request asks for, once it is one this KME serves (else 400)."""
        if slave_SAE_ID == master:
            raise EtsiError("slave_SAE_ID must differ from the calling master SAE")
        lim = self.limits
        if request.additional_slave_SAE_IDs:
            raise EtsiError("key multicast (additional_slave_SAE_IDs) is not supported",
                            [{"max_SAE_ID_count": self.max_SAE_ID_count}])
        if request.extension_mandatory:
            names = sorted({k[:MAX_ID_LENGTH] for ext in request.extension_mandatory for k in ext})
            raise EtsiError("not all extension_mandatory parameters are supported",
                            [{"extension_mandatory_unsupported": names[:16]}])
        if request.number > lim.max_key_per_request:
            raise EtsiError(f"number {request.number} exceeds max_key_per_request {lim.max_key_per_request}",
                            [{"number": request.number, "max_key_per_request": lim.max_key_per_request}])
        size = lim.key_size if request.size is None else request.size
        if size % 8:
            raise EtsiError(f"size {size} is not a multiple of 8", [{"size": size, "multiple_of": 8}])
        if not lim.min_key_size <= size <= lim.max_key_size:
            raise EtsiError(
                f"size {size} is outside [{lim.min_key_size}, {lim.max_key_size}]",
                [{"size": size, "min_key_size": lim.min_key_size, "max_key_size": lim.max_key_size}],
            )
        return size

    def dec_keys(self, caller: str | None, master_SAE_ID: str, request: KeyIDs, now: float) -> KeyContainer:
        """Get key with key IDs: the keys ``master_SAE_ID`` obtained for ``caller`` (slave)."""
        slave = self.authorize(caller)
        source = self.kme_of(master_SAE_ID, "master_SAE_ID")
        ids = self.check_key_ids(request)
        pool = self._pool(self._in, source)
        try:
            keys = pool.lookup(ids, now, master_sae=master_SAE_ID, slave_sae=slave)
        except KeyIDNotYours:
            raise Unauthorized() from None
        return KeyContainer(keys=tuple(Key(key_ID=kid, key=key) for kid, key in zip(ids, keys, strict=True)))

    def check_key_ids(self, request: KeyIDs) -> list[str]:
        """The key_IDs of a Get key with key IDs request, if there are not too many (else 400)."""
        ids = request.ids
        most = self.limits.max_key_per_request
        if len(ids) > most:
            raise EtsiError(f"{len(ids)} key_IDs exceed max_key_per_request {most}",
                            [{"key_IDs": len(ids), "max_key_per_request": most}])
        return ids
