"""Share frames: round trips, and a strict parser that raises only FrameError."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import tracemalloc
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qstore.errors import FrameError, LocalError, RemoteError
from qstore.framing import (
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    Frame,
    FrameHeader,
    encode_frame,
    parse_frame,
    parse_header,
)

# Offsets of the header fields, from the layout in the module docstring.
OFF_VERSION, OFF_FLAGS, OFF_ID, OFF_OBJVER, OFF_CHUNK = 4, 5, 6, 22, 30
OFF_X, OFF_K, OFF_N, OFF_RESERVED, OFF_LEN, OFF_DIGEST = 34, 35, 36, 37, 38, 42


@st.composite
def frame_fields(draw: st.DrawFn, max_body: int = 512) -> dict:
    n = draw(st.integers(2, 255))
    k = draw(st.integers(2, n))
    return {
        "object_id": draw(st.binary(min_size=16, max_size=16)),
        "object_version": draw(st.integers(0, 2**64 - 1)),
        "chunk_index": draw(st.integers(0, 2**32 - 1)),
        "x": draw(st.integers(1, n)),
        "k": k,
        "n": n,
        "body": draw(st.binary(max_size=max_body)),
    }


def sample(body: bytes = b"share bytes") -> bytes:
    return encode_frame(
        object_id=uuid.UUID(int=7).bytes, object_version=3, chunk_index=5, x=2, k=3, n=5, body=body
    )


def patched(frame: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    buf = bytearray(frame)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def test_header_size_matches_layout() -> None:
    assert HEADER_SIZE == 74
    assert sample()[:4] == MAGIC


@given(frame_fields())
def test_round_trip(fields: dict) -> None:
    wire = encode_frame(**fields)
    frame = parse_frame(wire)
    h = frame.header
    assert frame.body == fields["body"]
    assert (h.object_id, h.object_version, h.chunk_index, h.x, h.k, h.n) == (
        fields["object_id"],
        fields["object_version"],
        fields["chunk_index"],
        fields["x"],
        fields["k"],
        fields["n"],
    )
    assert h.body_length == len(fields["body"])
    assert h.digest == hashlib.sha256(fields["body"]).digest()
    assert parse_header(wire) == h
    assert frame.to_bytes() == wire


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(kind: type) -> None:
    wire = sample()
    assert parse_frame(kind(wire)) == parse_frame(wire)
    assert parse_header(kind(wire)) == parse_frame(wire).header


def test_parse_header_reads_only_header() -> None:
    wire = sample(b"x" * 100)
    assert parse_header(wire[:HEADER_SIZE]).body_length == 100
    assert parse_header(wire + b"more stream data").body_length == 100


def test_every_truncation_fails() -> None:
    wire = sample(b"0123456789" * 5)
    for cut in range(len(wire)):
        with pytest.raises(FrameError):
            parse_frame(wire[:cut])
    for cut in range(HEADER_SIZE):
        with pytest.raises(FrameError):
            parse_header(wire[:cut])


def test_trailing_bytes_fail() -> None:
    with pytest.raises(FrameError, match="trailing"):
        parse_frame(sample() + b"\0")


def test_wrong_magic_and_version_and_flags_and_reserved() -> None:
    wire = sample()
    for bad in (
        b"QSHX" + wire[4:],
        patched(wire, OFF_VERSION, ">B", 2),
        patched(wire, OFF_VERSION, ">B", 0),
        patched(wire, OFF_FLAGS, ">B", 1),
        patched(wire, OFF_RESERVED, ">B", 0x80),
    ):
        with pytest.raises(FrameError):
            parse_frame(bad)
        with pytest.raises(FrameError):
            parse_header(bad)


@pytest.mark.parametrize(
    ("x", "k", "n"),
    [(0, 3, 5), (6, 3, 5), (1, 1, 5), (1, 0, 5), (1, 6, 5), (1, 2, 1), (3, 2, 2), (0, 0, 0)],
)
def test_bad_x_k_n(x: int, k: int, n: int) -> None:
    wire = sample()
    wire = patched(wire, OFF_X, ">B", x)
    wire = patched(wire, OFF_K, ">B", k)
    wire = patched(wire, OFF_N, ">B", n)
    with pytest.raises(FrameError):
        parse_frame(wire)
    with pytest.raises(FrameError):
        encode_frame(object_id=bytes(16), object_version=0, chunk_index=0, x=x, k=k, n=n, body=b"")


def test_digest_mismatch() -> None:
    wire = bytearray(sample(b"abcdef"))
    wire[-1] ^= 1
    with pytest.raises(FrameError, match="digest"):
        parse_frame(bytes(wire))


def test_oversized_length_refused_before_allocation() -> None:
    # A 4 GiB declared body behind a 74-byte input: must fail on the length, not on memory.
    wire = patched(sample(), OFF_LEN, ">I", 2**32 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="exceeds"):
            parse_frame(wire, max_body=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    with pytest.raises(FrameError, match="exceeds"):
        parse_header(wire[:HEADER_SIZE], max_body=1024)
    with pytest.raises(FrameError, match="exceeds"):
        parse_frame(wire)  # default cap is MAX_BODY < 2**32 - 1
    small = sample(b"y" * 65)
    with pytest.raises(FrameError, match="exceeds"):
        parse_frame(small, max_body=64)
    assert parse_frame(small, max_body=65).body == b"y" * 65


def test_max_body_may_only_be_lowered() -> None:
    with pytest.raises(LocalError):
        parse_frame(sample(), max_body=MAX_BODY + 1)
    with pytest.raises(LocalError):
        parse_header(sample(), max_body=-1)


def test_header_validates_itself() -> None:
    good = {
        "object_id": bytes(16),
        "object_version": 0,
        "chunk_index": 0,
        "x": 1,
        "k": 2,
        "n": 2,
        "body_length": 0,
        "digest": hashlib.sha256(b"").digest(),
    }
    FrameHeader(**good)
    for key, bad in [
        ("object_id", bytes(15)),
        ("object_id", "0" * 16),
        ("object_version", -1),
        ("object_version", 2**64),
        ("chunk_index", 2**32),
        ("chunk_index", True),
        ("body_length", MAX_BODY + 1),
        ("digest", bytes(31)),
    ]:
        with pytest.raises(FrameError):
            FrameHeader(**{**good, key: bad})
    with pytest.raises(TypeError):
        FrameHeader(bytes(16), 0, 0, 1, 2, 2, 0, bytes(32))  # type: ignore[misc]  # keyword-only


def test_frame_checks_body_against_header() -> None:
    frame = parse_frame(sample(b"abc"))
    with pytest.raises(FrameError):
        Frame(frame.header, b"abd")
    with pytest.raises(FrameError):
        Frame(frame.header, b"abcd")


def test_reprs_hold_no_body_or_digest() -> None:
    body = b"SECRET-SHARE-BYTES"
    frame = parse_frame(sample(body))
    assert "SECRET" not in repr(frame)
    assert repr(frame.header.digest) not in repr(frame)


@given(st.binary(max_size=300))
def test_garbage_raises_only_frame_error(data: bytes) -> None:
    for buf in (data, MAGIC + bytes([1]) + data):
        with contextlib.suppress(FrameError):
            parse_frame(buf)
        with contextlib.suppress(FrameError):
            parse_header(buf)


# Bytes whose change must always be detected: structure, length, digest and body.
_ALWAYS_FATAL = set(range(0, OFF_ID)) | {OFF_RESERVED} | set(range(OFF_LEN, OFF_DIGEST + 32))


@settings(max_examples=300)
@given(frame_fields(max_body=64), st.data())
def test_byte_flips(fields: dict, data: st.DataObject) -> None:
    wire = encode_frame(**fields)
    pos = data.draw(st.integers(0, len(wire) - 1))
    mask = data.draw(st.integers(1, 255))
    flipped = bytearray(wire)
    flipped[pos] ^= mask
    fatal = pos in _ALWAYS_FATAL or pos >= HEADER_SIZE
    try:
        frame = parse_frame(bytes(flipped))
    except FrameError:
        return
    assert not fatal, f"flip at {pos} went undetected"
    # A flip in id, version, chunk index or x/k/n may parse, but never to the original frame.
    assert frame != parse_frame(wire)
    assert frame.body == fields["body"]


def test_errors_are_remote_errors() -> None:
    assert issubclass(FrameError, RemoteError)
