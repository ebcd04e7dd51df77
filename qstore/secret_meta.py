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
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qstore.errors import QStoreError, ShareCorruption
from qstore.sharing import Share, combine, split

PAD = 64  # the document is padded to a multiple of this, so its share's length says little
MAX_SHARE_BYTES = 8192  # user metadata is at most 2 KiB (S3's limit); digest and JSON around it fit
_HEX = re.compile(r"[0-9a-f]*")


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
    """The plaintext a node seals for a listing: one hex share (or null) per listed version."""
    return json.dumps(list(shares), separators=(",", ":")).encode()


def unpack_shares(data: bytes, count: int) -> list[str | None]:
    """Inverse of :func:`pack_shares`, checked: ``count`` entries, each null or even-length hex."""
    try:
        items = json.loads(data)
    except ValueError:
        raise ShareCorruption("the sealed metadata shares are not JSON") from None
    if not isinstance(items, list) or len(items) != count:
        raise ShareCorruption("the sealed metadata shares do not match the listing")
    for item in items:
        if item is None:
            continue
        if (not isinstance(item, str) or len(item) % 2 or len(item) > 2 * MAX_SHARE_BYTES
                or not _HEX.fullmatch(item)):
            raise ShareCorruption("a sealed metadata share is not hex")
    return items
