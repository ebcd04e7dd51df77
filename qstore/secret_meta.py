"""An object's secret metadata (content SHA-256, user metadata): shared k-of-n, and packed for sealing.

Names and sizes are public (ARCHITECTURE §1, §4); the content digest and the
user's metadata are not: a digest confirms a guess of low-entropy content,
and ``x-amz-meta-*`` may name a patient. So they are Shamir-shared like the
content, and every share of them crosses a link only inside a one-time-pad
envelope: recorded TLS traffic, once broken, yields no share of them.

Sans-IO: the node and the client seal and open what these functions pack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from qstore.errors import QStoreError, ShareCorruption
from qstore.sharing import Share, combine, split

PAD = 64  # the document is padded to a multiple of this, so its share's length says little
MAX_SHARE_BYTES = 8192  # user metadata is at most 2 KiB (S3's limit); digest and JSON around it fit
_NONE = 0xFFFF  # a listed version without a share (a tombstone)


def share_doc(doc: Mapping[str, Any], n: int, k: int) -> list[bytes]:
    """Split a small JSON document k-of-n; share i (0-based) is for the node at x = i + 1."""
    data = json.dumps(doc, sort_keys=True).encode()
    data += b" " * (-len(data) % PAD)
    if len(data) > MAX_SHARE_BYTES:
        raise ValueError(f"secret metadata of {len(data)} bytes is above {MAX_SHARE_BYTES}")
    return [bytes(s.data) for s in split(data, n, k)]


def open_doc(shares: Sequence[Share], k: int) -> dict[str, Any]:
    """The document from its shares: robust decoding when more than k are given.

    ShareCorruption when fewer than k are given or they do not agree.
    """
    if len(shares) < k:
        raise ShareCorruption(f"only {len(shares)} nodes hold readable shares of the object's metadata")
    try:
        data = combine(list(shares))
        doc = json.loads(data.rstrip(b" "))
    except (QStoreError, ValueError, IndexError):
        raise ShareCorruption("the object's metadata shares do not agree") from None
    if not isinstance(doc, dict):
        raise ShareCorruption("the object's metadata shares do not agree")
    return doc


def pack_shares(shares: Sequence[str | None]) -> bytes:
    """The plaintext a node seals for a listing: per listed version, its share (stored as hex) or none.

    Binary, so that the one-time pad it costs is the shares' size, not twice that: each entry is a
    2-byte big-endian length (:data:`_NONE` for none) and that many bytes.
    """
    out = bytearray()
    for share in shares:
        if share is None:
            out += _NONE.to_bytes(2, "big")
            continue
        raw = bytes.fromhex(share)
        if len(raw) > MAX_SHARE_BYTES:
            raise ValueError(f"a metadata share of {len(raw)} bytes is above {MAX_SHARE_BYTES}")
        out += len(raw).to_bytes(2, "big") + raw
    return bytes(out)


def unpack_shares(data: bytes, count: int) -> list[str | None]:
    """Inverse of :func:`pack_shares` (shares as hex again), checked: exactly ``count`` entries."""
    items: list[str | None] = []
    view, pos = memoryview(data), 0
    while pos < len(view) and len(items) < count:
        if pos + 2 > len(view):
            raise ShareCorruption("the sealed metadata shares are truncated")
        length = int.from_bytes(view[pos : pos + 2], "big")
        pos += 2
        if length == _NONE:
            items.append(None)
            continue
        if length > MAX_SHARE_BYTES or pos + length > len(view):
            raise ShareCorruption("the sealed metadata shares are truncated or too long")
        items.append(view[pos : pos + length].hex())
        pos += length
    if len(items) != count or pos != len(view):
        raise ShareCorruption("the sealed metadata shares do not match the listing")
    return items
