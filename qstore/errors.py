"""One tree of qstore errors.

Every error carries the HTTP status a service should answer with, so an
aiohttp shell maps any of them to a response without a table of its own.
Two branches, as in h11: :class:`LocalError` is our caller's misuse (bad
arguments), :class:`RemoteError` is bad input from a peer or from storage
(a garbled frame, a forged tag, a corrupted share). A parser fed garbage
raises only :class:`RemoteError` subclasses; tests fuzz for that.

Messages never contain key material, share bytes or plaintext.
"""

from __future__ import annotations


class QStoreError(Exception):
    """Base of every error qstore raises on purpose."""

    status: int = 500


class LocalError(QStoreError, ValueError):
    """The caller asked for something impossible (bad k/n, wrong types)."""

    status = 400


class RemoteError(QStoreError):
    """Input from outside (a peer, a file, a disk) is unacceptable."""

    status = 400


class ParameterError(LocalError):
    """Bad sharing parameters: need 2 <= k <= n <= 255."""


class ShareError(RemoteError):
    """A set of shares cannot be combined as given."""

    status = 422


class NotEnoughShares(ShareError):
    """Fewer distinct shares than the threshold k."""

    def __init__(self, needed: int, got: int):
        self.needed = needed
        self.got = got
        super().__init__(f"need at least {needed} shares, got {got}")


class DuplicateShare(ShareError):
    """Two shares carry the same x coordinate."""

    def __init__(self, x: int):
        self.x = x
        super().__init__(f"two shares have x = {x}")


class MixedShares(ShareError):
    """Shares differ in length or come from different splits."""


class ShareCorruption(ShareError):
    """Shares disagree and the disagreement cannot be corrected.

    ``bad`` names the x of shares known to be wrong (possibly empty), and
    ``detail`` says what could not be fixed.
    """

    def __init__(self, detail: str, bad: tuple[int, ...] = ()):
        self.bad = bad
        self.detail = detail
        named = f" (bad shares at x = {', '.join(map(str, bad))})" if bad else ""
        super().__init__(f"{detail}{named}")


class FrameError(RemoteError):
    """A share frame is truncated, oversized, garbled or of another version."""


class SealError(RemoteError):
    """An envelope failed to open. Deliberately says nothing about why."""

    status = 403

    def __init__(self, message: str = "envelope rejected"):
        super().__init__(message)


class KeyMaterialError(LocalError):
    """Misuse of one-time key material: reuse or shortage."""

    status = 409


class KeyReuse(KeyMaterialError):
    """A key byte range was asked for a second time."""


class KeyShortage(KeyMaterialError):
    """Not enough unused key material for the request."""

    status = 503


class NotFound(RemoteError):
    """No such bucket, object, version, chunk or upload."""

    status = 404


class NoSuchBucket(NotFound):
    def __init__(self, bucket: str):
        self.bucket = bucket
        super().__init__(f"no bucket {bucket!r}")


class NoSuchKey(NotFound):
    def __init__(self, bucket: str, key: str):
        self.bucket, self.key = bucket, key
        super().__init__(f"no object {key!r} in bucket {bucket!r}")


class Conflict(RemoteError):
    """The request contradicts what is already there (an upload with other parameters, a chunk sent twice)."""

    status = 409


class BucketNotEmpty(Conflict):
    def __init__(self, bucket: str):
        self.bucket = bucket
        super().__init__(f"bucket {bucket!r} is not empty")


class Forbidden(RemoteError):
    """The caller is known but may not do this (drop another owner's table, query without a grant)."""

    status = 403


class NoSuchTable(NotFound):
    def __init__(self, table: str):
        self.table = table
        super().__init__(f"no table {table!r}")
