"""Share frames: one chunk share with the bookkeeping a node needs to store it.

A frame is a fixed-size header followed by the share bytes (the body)::

    offset size  field
         0    4  magic b"QSHR"
         4    1  version (1)
         5    1  flags (0; no flag is defined yet)
         6   16  object id (raw UUID bytes)
        22    8  object version
        30    4  chunk index
        34    1  x   (Shamir x coordinate of this share, 1 <= x <= n)
        35    1  k   (threshold, 2 <= k <= n)
        36    1  n   (number of shares, n <= 255)
        37    1  reserved (0)
        38    4  body length
        42   32  SHA-256 of the body
        74       body

All integers are big-endian. The digest detects bit rot at a node; it is not
an authenticator (the link's one-time MAC in :mod:`qstore.otp` is).

Parsing is strict, as h11 parses HTTP: anything other than exactly one valid
frame raises :class:`~qstore.errors.FrameError`, and a declared body length is
checked against a cap before any buffer of that size exists, so a peer cannot
make us allocate by lying about a length.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from qstore.errors import FrameError, LocalError

MAGIC = b"QSHR"
VERSION = 1
MAX_BODY = 64 * 2**20
"""Default cap on a body; parsers take a lower ``max_body`` where they know better."""

_HEADER = struct.Struct(">4sBB16sQIBBBBI32s")
HEADER_SIZE = _HEADER.size
DIGEST_SIZE = 32

_U32 = 2**32 - 1
_U64 = 2**64 - 1

BytesLike = bytes | bytearray | memoryview


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_uint(name: str, value: object, top: int, low: int = 0) -> None:
    if not _is_int(value) or not low <= value <= top:  # type: ignore[operator]
        raise FrameError(f"{name} must be an integer in [{low}, {top}]")


@dataclass(frozen=True, kw_only=True, slots=True)
class FrameHeader:
    """The decoded header of a version-1 frame; valid by construction."""

    object_id: bytes
    object_version: int
    chunk_index: int
    x: int
    k: int
    n: int
    body_length: int
    digest: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.object_id, bytes) or len(self.object_id) != 16:
            raise FrameError("object id must be 16 bytes")
        _check_uint("object version", self.object_version, _U64)
        _check_uint("chunk index", self.chunk_index, _U32)
        _check_uint("n", self.n, 255)
        _check_uint("k", self.k, 255)
        _check_uint("x", self.x, 255)
        if not 2 <= self.k <= self.n:
            raise FrameError("need 2 <= k <= n <= 255")
        if not 1 <= self.x <= self.n:
            raise FrameError("need 1 <= x <= n")
        _check_uint("body length", self.body_length, MAX_BODY)
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise FrameError("digest must be 32 bytes")

    def to_bytes(self) -> bytes:
        """The wire form of this header (HEADER_SIZE bytes)."""
        return _HEADER.pack(
            MAGIC,
            VERSION,
            0,
            self.object_id,
            self.object_version,
            self.chunk_index,
            self.x,
            self.k,
            self.n,
            0,
            self.body_length,
            self.digest,
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """A header with its body; construction checks the body against the header."""

    header: FrameHeader
    body: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.header, FrameHeader):
            raise FrameError("header must be a FrameHeader")
        if not isinstance(self.body, bytes) or len(self.body) != self.header.body_length:
            raise FrameError("body length does not match header")
        if not hmac.compare_digest(hashlib.sha256(self.body).digest(), self.header.digest):
            raise FrameError("body digest mismatch")

    def to_bytes(self) -> bytes:
        """The wire form of the whole frame."""
        return self.header.to_bytes() + self.body


def encode_header(
    *,
    object_id: bytes,
    object_version: int,
    chunk_index: int,
    x: int,
    k: int,
    n: int,
    body: BytesLike,
) -> bytes:
    """The header of the frame of ``body`` (digest included), for senders that keep the body apart."""
    return FrameHeader(
        object_id=bytes(object_id) if isinstance(object_id, bytearray | memoryview) else object_id,
        object_version=object_version,
        chunk_index=chunk_index,
        x=x,
        k=k,
        n=n,
        body_length=len(memoryview(body).cast("B")),
        digest=hashlib.sha256(body).digest(),
    ).to_bytes()


def split_frame(buf: BytesLike, *, max_body: int = MAX_BODY) -> tuple[FrameHeader, memoryview]:
    """Exactly one frame, as its header and a view of its body; the digest is NOT checked here.

    For a receiver that checks the digest where it uses the body (a node's
    store hashes as it writes), so that no share is hashed twice.
    """
    _check_max_body(max_body)
    mv = _view(buf)
    header = _parse_header(mv, max_body)
    end = HEADER_SIZE + header.body_length
    if len(mv) < end:
        raise FrameError("truncated body")
    if len(mv) > end:
        raise FrameError("trailing bytes after frame")
    return header, mv[HEADER_SIZE:end]


def encode_frame(
    *,
    object_id: bytes,
    object_version: int,
    chunk_index: int,
    x: int,
    k: int,
    n: int,
    body: BytesLike,
) -> bytes:
    """Frame one share; the digest is computed here so callers cannot get it wrong."""
    header = encode_header(object_id=object_id, object_version=object_version, chunk_index=chunk_index,
                           x=x, k=k, n=n, body=body)
    return header + bytes(body)


def _check_max_body(max_body: int) -> None:
    # The cap may only be lowered: FrameHeader itself never admits more than MAX_BODY.
    if not _is_int(max_body) or not 0 <= max_body <= MAX_BODY:
        raise LocalError(f"max_body must be an integer in [0, {MAX_BODY}]")


def _view(buf: BytesLike) -> memoryview:
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise TypeError("frame input must be bytes, bytearray or memoryview")
    return memoryview(buf).cast("B")


def _parse_header(mv: memoryview, max_body: int) -> FrameHeader:
    if len(mv) < HEADER_SIZE:
        raise FrameError("truncated header")
    (
        magic,
        version,
        flags,
        object_id,
        object_version,
        chunk_index,
        x,
        k,
        n,
        reserved,
        body_length,
        digest,
    ) = _HEADER.unpack_from(mv)
    if magic != MAGIC:
        raise FrameError("not a share frame")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if flags != 0:
        raise FrameError("unknown frame flags")
    if reserved != 0:
        raise FrameError("reserved byte is not zero")
    if body_length > max_body:
        raise FrameError(f"body length {body_length} exceeds limit {max_body}")
    return FrameHeader(
        object_id=object_id,
        object_version=object_version,
        chunk_index=chunk_index,
        x=x,
        k=k,
        n=n,
        body_length=body_length,
        digest=digest,
    )


def parse_header(buf: BytesLike, *, max_body: int = MAX_BODY) -> FrameHeader:
    """Read only the header, so a node can stream the body straight to disk."""
    _check_max_body(max_body)
    return _parse_header(_view(buf), max_body)


def parse_frame(buf: BytesLike, *, max_body: int = MAX_BODY) -> Frame:
    """Parse exactly one frame; anything else is a FrameError."""
    header, body = split_frame(buf, max_body=max_body)
    return Frame(header, bytes(body))
