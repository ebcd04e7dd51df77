"""One-time pad and one-time MAC for frames on a link, keyed by QKD.

Hazmat layer: these are primitives. Key streams, offsets and envelopes are
easy to misuse; the node and client transports are the recipes built on them.

Sealing spends ``32 + len(frame)`` bytes of QKD key: the first 32 are a fresh
Poly1305 one-time key, the rest are the pad. The ciphertext is ``frame XOR
pad``; the tag is Poly1305 over the cleartext envelope header and the
ciphertext (Wegman-Carter style: information-theoretic as long as no key byte
is ever used twice, which :class:`KeyStream` enforces on both sides).

Envelope (all integers big-endian)::

    magic        4   b"QOTP"
    version      1   1
    nrefs        2   number of key references, 1 <= nrefs <= MAX_REFS
    nrefs times:
      key_id    16   raw UUID bytes of the ETSI GS QKD 014 key_ID
      offset     4   first byte of the range within that key
      length     4   bytes in the range (>= 1)
    ct_length    4   ciphertext length
    ciphertext   ct_length
    tag         16   Poly1305(otk, everything above the ciphertext || ciphertext)

The key material named by the references, concatenated in order, is the
32-byte one-time key followed by the pad, so the lengths sum to
``32 + ct_length``.

Hybrid mode, by name: :func:`seal_gcm` writes the same envelope with magic
``b"QGCM"``: the named key ranges are exactly 32 bytes, a fresh AES-256 key
used for this one frame (so the all-zero nonce is never repeated under a key),
the ciphertext is AES-256-GCM of the frame with the cleartext header as
associated data, and the tag slot holds the GCM tag. It spends 32 bytes of
QKD key per frame instead of ``32 + len(frame)``, and is only computationally
secure: for links whose key rate cannot carry the data. :func:`open_` accepts
both kinds; the caller learns which from :func:`envelope_cipher`.

The receiver (:func:`open_`) parses with every size bounded before it
allocates, takes the named ranges from its own :class:`KeyStream` (a range it
has seen before is refused with :class:`~qstore.errors.KeyReuse`), checks the
tag in constant time and only then decrypts. Every other failure is one opaque
:class:`~qstore.errors.SealError`. The ranges are consumed as soon as they are
taken, also when the tag then fails: a one-time key that has been tried is
never tried again, so a forger gets exactly one guess per key range. The price
is that a forged envelope naming ranges the real sender has not used yet burns
them (a denial of service the peer's TLS authentication already limits).
"""

from __future__ import annotations

import struct
import uuid
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qstore.errors import KeyMaterialError, KeyReuse, KeyShortage, LocalError, SealError
from qstore.framing import HEADER_SIZE, MAX_BODY

MAGIC = b"QOTP"
MAGIC_GCM = b"QGCM"
GCM_KEY_SIZE = 32
_GCM_NONCE = bytes(12)
CIPHERS = ("otp", "aes-256-gcm")
VERSION = 1
OTK_SIZE = 32
TAG_SIZE = 16
MAX_REFS = 1024
"""Bound on key references per envelope (about 24 KiB of header).

A frame spanning more QKD keys than this needs larger keys from the KME
(ETSI ``size``); the sender refuses rather than emit an envelope no receiver
would parse.
"""
MAX_LENGTH = HEADER_SIZE + MAX_BODY
"""Default bound on the ciphertext a receiver accepts: one maximal share frame."""

_PREFIX = struct.Struct(">4sBH")
_REF = struct.Struct(">16sII")
_CT_LEN = struct.Struct(">I")
_U32 = 2**32 - 1

BytesLike = bytes | bytearray | memoryview


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _canonical_key_id(key_id: object) -> str:
    """The lowercase 8-4-4-4-12 form, so IDs from JSON and from the wire compare equal."""
    if not isinstance(key_id, str):
        raise LocalError("key_id must be a UUID string")
    try:
        canonical = str(uuid.UUID(key_id))
    except ValueError:
        raise LocalError("key_id must be a UUID string") from None
    if canonical != key_id.lower():
        raise LocalError("key_id must be a UUID in 8-4-4-4-12 form")
    return canonical


def _zero(buf: bytearray, start: int = 0, end: int | None = None) -> None:
    """Overwrite key material in place (a numpy view, not a loop)."""
    if len(buf):
        np.frombuffer(buf, dtype=np.uint8)[start:end] = 0


@dataclass(frozen=True, slots=True)
class QKDKey:
    """One key as a KME delivers it (ETSI GS QKD 014 ``key_ID`` and ``key``).

    ``key`` is immutable and so cannot be wiped; :meth:`KeyStream.add` copies it
    into a buffer that can, so drop the QKDKey as soon as it has been added.
    """

    key_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", _canonical_key_id(self.key_id))
        if not isinstance(self.key, bytes):
            raise LocalError("key must be bytes")
        if not 1 <= len(self.key) <= _U32:
            raise LocalError(f"key length must be in [1, {_U32}]")


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A byte range ``[offset, offset + length)`` of one QKD key."""

    key_id: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", _canonical_key_id(self.key_id))
        if not _is_int(self.offset) or not 0 <= self.offset <= _U32:
            raise LocalError(f"offset must be an integer in [0, {_U32}]")
        if not _is_int(self.length) or not 1 <= self.length <= _U32:
            raise LocalError(f"length must be an integer in [1, {_U32}]")


class _Intervals:
    """Sorted, disjoint, merged half-open ranges ``[start, end)``."""

    __slots__ = ("ends", "starts", "total")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.total = 0

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect_right(self.starts, start) - 1
        if i >= 0 and self.ends[i] > start:
            return True
        return i + 1 < len(self.starts) and self.starts[i + 1] < end

    def add(self, start: int, end: int) -> None:
        """Add a range known not to overlap, merging with touching neighbours."""
        self.total += end - start
        i = bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] == start:
            i -= 1
            start = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == end:
            end = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, start)
        self.ends.insert(i, end)

    def gaps(self, limit: int) -> Iterator[tuple[int, int]]:
        """Unused ranges within ``[0, limit)``, lowest first."""
        pos = 0
        for s, e in zip(self.starts, self.ends, strict=True):
            if s > pos:
                yield pos, s
            pos = e
        if pos < limit:
            yield pos, limit


class _Entry:
    __slots__ = ("material", "used")

    def __init__(self, material: bytearray) -> None:
        self.material = material
        self.used = _Intervals()

    @property
    def free(self) -> int:
        return len(self.material) - self.used.total


class KeyStream:
    """Key material shared with one peer, each byte handed out at most once.

    The sender calls :meth:`take` for the next unused bytes; the receiver calls
    :meth:`take_refs` with the ranges the sender named. Bytes are zeroed in the
    buffer as they are handed out, and a key whose bytes are all used is
    dropped; its ID is remembered so that a replay is refused as reuse rather
    than mistaken for a key still to be fetched. Not thread-safe.
    """

    def __init__(self, keys: Iterable[QKDKey] = ()) -> None:
        self._keys: dict[str, _Entry] = {}
        self._retired: set[str] = set()
        self._available = 0
        for key in keys:
            self.add(key)

    def __repr__(self) -> str:
        return f"KeyStream(keys={len(self._keys)}, available={self._available})"

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, str) and key_id.lower() in self._keys

    def add(self, key: QKDKey) -> None:
        """Buffer a key; a key ID seen before is refused (QKD never repeats one)."""
        if not isinstance(key, QKDKey):
            raise LocalError("add() takes a QKDKey")
        if key.key_id in self._keys or key.key_id in self._retired:
            raise KeyReuse(f"key {key.key_id} was added before")
        self._keys[key.key_id] = _Entry(bytearray(key.key))
        self._available += len(key.key)

    def available(self) -> int:
        """Unused bytes buffered, over all keys."""
        return self._available

    def missing(self, refs: Iterable[KeyRef]) -> list[str]:
        """Key IDs named by ``refs`` that this stream has never held (to fetch with dec_keys)."""
        out: dict[str, None] = {}
        for ref in refs:
            if ref.key_id not in self._keys and ref.key_id not in self._retired:
                out[ref.key_id] = None
        return list(out)

    def take(self, nbytes: int, *, max_refs: int | None = None) -> tuple[list[KeyRef], bytearray]:
        """Sender side: the next ``nbytes`` unused bytes and the ranges they came from.

        Takes nothing if there are fewer than ``nbytes`` bytes (KeyShortage) or
        they would span more than ``max_refs`` ranges (KeyMaterialError).
        """
        if not _is_int(nbytes) or nbytes < 0:
            raise LocalError("nbytes must be a non-negative integer")
        if nbytes > self._available:
            raise KeyShortage(f"need {nbytes} bytes of key, {self._available} available")
        plan: list[tuple[str, int, int]] = []
        remaining = nbytes
        for key_id, entry in self._keys.items():
            if not remaining:
                break
            for start, end in entry.used.gaps(len(entry.material)):
                n = min(end - start, remaining)
                plan.append((key_id, start, n))
                remaining -= n
                if not remaining:
                    break
        if max_refs is not None and len(plan) > max_refs:
            raise KeyMaterialError(f"{nbytes} bytes would span more than {max_refs} key ranges")
        refs = [KeyRef(key_id, start, n) for key_id, start, n in plan]
        return refs, self._consume(refs, nbytes)

    def take_refs(self, refs: Iterable[KeyRef]) -> bytearray:
        """Receiver side: exactly the named ranges, concatenated in order.

        All ranges are checked before any is consumed: an unknown key ID raises
        KeyShortage, a range beyond its key LocalError, a byte handed out before
        (or named twice in ``refs``) KeyReuse.
        """
        refs = list(refs)
        pending: dict[str, _Intervals] = {}
        total = 0
        for ref in refs:
            if not isinstance(ref, KeyRef):
                raise LocalError("take_refs() takes KeyRefs")
            if ref.key_id in self._retired:
                raise KeyReuse(f"key {ref.key_id} is used up")
            entry = self._keys.get(ref.key_id)
            if entry is None:
                raise KeyShortage(f"key {ref.key_id} is not held")
            end = ref.offset + ref.length
            if end > len(entry.material):
                raise LocalError(f"range beyond the end of key {ref.key_id}")
            mine = pending.setdefault(ref.key_id, _Intervals())
            if entry.used.overlaps(ref.offset, end) or mine.overlaps(ref.offset, end):
                raise KeyReuse(f"key {ref.key_id} range was used before")
            mine.add(ref.offset, end)
            total += ref.length
        return self._consume(refs, total)

    def _consume(self, refs: list[KeyRef], total: int) -> bytearray:
        """Copy out validated ranges, zero them, mark them used, drop spent keys."""
        out = bytearray(total)
        pos = 0
        for ref in refs:
            entry = self._keys[ref.key_id]
            end = ref.offset + ref.length
            out[pos : pos + ref.length] = memoryview(entry.material)[ref.offset : end]
            pos += ref.length
            _zero(entry.material, ref.offset, end)
            entry.used.add(ref.offset, end)
            self._available -= ref.length
            if entry.free == 0:
                del self._keys[ref.key_id]
                self._retired.add(ref.key_id)
        return out

    def wipe(self) -> None:
        """Zero and drop every buffered key; their IDs can never be used again."""
        for key_id, entry in self._keys.items():
            _zero(entry.material)
            self._retired.add(key_id)
        self._keys.clear()
        self._available = 0


def _xor_into(out: memoryview, a: BytesLike, b: BytesLike) -> None:
    if len(out):
        np.bitwise_xor(
            np.frombuffer(a, dtype=np.uint8),
            np.frombuffer(b, dtype=np.uint8),
            out=np.frombuffer(out, dtype=np.uint8),
        )


def _pack_header(refs: list[KeyRef], ct_length: int, magic: bytes = MAGIC) -> bytes:
    parts = [_PREFIX.pack(magic, VERSION, len(refs))]
    parts += [_REF.pack(uuid.UUID(r.key_id).bytes, r.offset, r.length) for r in refs]
    parts.append(_CT_LEN.pack(ct_length))
    return b"".join(parts)


def _parts(frame: BytesLike | Sequence[BytesLike]) -> list[memoryview]:
    pieces = [frame] if isinstance(frame, bytes | bytearray | memoryview) else list(frame)
    try:
        views = [memoryview(p).cast("B") for p in pieces]  # any contiguous buffer (numpy rows too)
    except TypeError:
        raise LocalError("frame must be bytes-like (or a sequence of bytes-like parts)") from None
    if not views:
        raise LocalError("frame must not be an empty sequence of parts")
    if sum(len(v) for v in views) > _U32:
        raise LocalError("frame too long for an envelope")
    return views


def seal_parts(frame: BytesLike | Sequence[BytesLike], keystream: KeyStream) -> bytearray:
    """:func:`seal` of the concatenation of ``frame``'s parts, without joining them first.

    A frame's header and its share body can stay where they are: the pad is
    applied part by part straight into the envelope.
    """
    views = _parts(frame)
    n = sum(len(v) for v in views)
    refs, material = keystream.take(OTK_SIZE + n, max_refs=MAX_REFS)
    try:
        header = _pack_header(refs, n)
        h = len(header)
        out = bytearray(h + n + TAG_SIZE)
        view = memoryview(out)
        view[:h] = header
        pad = memoryview(material)[OTK_SIZE:]
        pos = 0
        for part in views:
            _xor_into(view[h + pos : h + pos + len(part)], part, pad[pos : pos + len(part)])
            pos += len(part)
        view[h + n :] = Poly1305.generate_tag(memoryview(material)[:OTK_SIZE], view[: h + n])
        return out
    finally:
        _zero(material)


def seal(frame: BytesLike, keystream: KeyStream) -> bytes:
    """Encrypt and authenticate one frame with fresh key from ``keystream``."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise LocalError("frame must be bytes-like")
    return bytes(seal_parts(frame, keystream))


def seal_gcm(frame: BytesLike | Sequence[BytesLike], keystream: KeyStream) -> bytes:
    """Hybrid mode: AES-256-GCM under a fresh 32-byte QKD key per frame (computationally secure only)."""
    views = _parts(frame)
    data = views[0] if len(views) == 1 else b"".join(views)
    refs, material = keystream.take(GCM_KEY_SIZE, max_refs=MAX_REFS)
    try:
        header = _pack_header(refs, len(data), MAGIC_GCM)
        return header + AESGCM(bytes(material)).encrypt(_GCM_NONCE, data, header)
    finally:
        _zero(material)


def seal_with(cipher: str, frame: BytesLike | Sequence[BytesLike], keystream: KeyStream) -> bytes | bytearray:
    """Seal with the link cipher named in :data:`CIPHERS` (``"otp"`` or ``"aes-256-gcm"``).

    ``frame`` may be given as parts (header, body) that are sealed as one.
    """
    if cipher == "otp":
        return seal_parts(frame, keystream)
    if cipher == "aes-256-gcm":
        return seal_gcm(frame, keystream)
    raise LocalError(f"link cipher must be one of {', '.join(CIPHERS)}")


def key_cost(cipher: str, frame_length: int) -> int:
    """Bytes of QKD key that sealing a frame of ``frame_length`` bytes spends."""
    return GCM_KEY_SIZE if cipher == "aes-256-gcm" else OTK_SIZE + frame_length


def envelope_cipher(envelope: BytesLike) -> str:
    """``"otp"`` or ``"aes-256-gcm"`` by the envelope's magic (SealError for anything else)."""
    head = bytes(memoryview(envelope)[:4]) if isinstance(envelope, bytes | bytearray | memoryview) else b""
    if head == MAGIC:
        return "otp"
    if head == MAGIC_GCM:
        return "aes-256-gcm"
    raise SealError()


def _parse(envelope: BytesLike, max_length: int) -> tuple[list[KeyRef], int, int]:
    """Strictly parse; returns refs, header length and ciphertext length. Raises SealError only."""
    if not _is_int(max_length) or not 0 <= max_length <= _U32:
        raise LocalError(f"max_length must be an integer in [0, {_U32}]")
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise SealError()
    try:
        mv = memoryview(envelope).cast("B")
        if len(mv) < _PREFIX.size:
            raise SealError()
        magic, version, nrefs = _PREFIX.unpack_from(mv)
        if magic not in (MAGIC, MAGIC_GCM) or version != VERSION or not 1 <= nrefs <= MAX_REFS:
            raise SealError()
        header_len = _PREFIX.size + nrefs * _REF.size + _CT_LEN.size
        if len(mv) < header_len + TAG_SIZE:
            raise SealError()
        refs = []
        total = 0
        for i in range(nrefs):
            raw_id, offset, length = _REF.unpack_from(mv, _PREFIX.size + i * _REF.size)
            if length == 0:
                raise SealError()
            refs.append(KeyRef(str(uuid.UUID(bytes=raw_id)), offset, length))
            total += length
        (ct_length,) = _CT_LEN.unpack_from(mv, header_len - _CT_LEN.size)
        need = GCM_KEY_SIZE if magic == MAGIC_GCM else OTK_SIZE + ct_length
        if ct_length > max_length or total != need:
            raise SealError()
        if len(mv) != header_len + ct_length + TAG_SIZE:
            raise SealError()
        return refs, header_len, ct_length
    except (struct.error, ValueError, TypeError):
        # ValueError covers LocalError from KeyRef; none can occur on checked input.
        raise SealError() from None


def parse_envelope_refs(envelope: BytesLike, *, max_length: int = MAX_LENGTH) -> list[KeyRef]:
    """The key ranges an envelope names, so the receiver can fetch them (dec_keys) first."""
    return _parse(envelope, max_length)[0]


def open_(envelope: BytesLike, keystream: KeyStream, *, max_length: int = MAX_LENGTH) -> bytes:
    """Check and decrypt one envelope; the named key ranges are spent whatever the outcome.

    Raises SealError for anything wrong with the envelope or its tag, KeyReuse if
    a range was used before, KeyShortage if a named key has not been fetched.
    """
    refs, header_len, ct_length = _parse(envelope, max_length)
    try:
        material = keystream.take_refs(refs)
    except KeyMaterialError:
        raise
    except LocalError:
        # A range beyond its key: the envelope is malformed, and says so no louder than a bad tag.
        raise SealError() from None
    mv = memoryview(envelope).cast("B")
    ct_end = header_len + ct_length
    key = memoryview(material)
    if mv[:4] == MAGIC_GCM:
        try:
            return AESGCM(bytes(material)).decrypt(_GCM_NONCE, mv[header_len:], mv[:header_len])
        except InvalidTag:
            raise SealError() from None
        finally:
            _zero(material)
    try:
        try:
            Poly1305.verify_tag(key[:OTK_SIZE], mv[:ct_end], bytes(mv[ct_end:]))
        except InvalidSignature:
            raise SealError() from None
        out = bytearray(ct_length)
        _xor_into(memoryview(out), mv[header_len:ct_end], key[OTK_SIZE:])
        return bytes(out)
    finally:
        _zero(material)
