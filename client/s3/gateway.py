"""The S3 gateway: an aiohttp shell over :class:`client.storage.QStore` (ARCHITECTURE.md §7).

Handlers parse the request, check it (SigV4 by :mod:`client.s3.sigv4`, the
user's buckets, names, sizes, XML shape), call the client library and render
S3's XML (:mod:`client.s3.xml`). One QStore, opened with the gateway's SAE
identity, lives as long as the app (cleanup_ctx).

Metadata: what S3 shows about content (ETag = MD5, Content-Type,
x-amz-meta-*, multipart manifests) goes into QStore's user metadata, which is
secret-shared across the nodes: a node sees object names and sizes, never an
MD5 or a header. Keys are stored as ``etag``, ``content-type``, ``h:<header>``
and ``m:<x-amz-meta name>``.

Multipart: a part is an ordinary object under the reserved prefix
``.qstore-multipart/<upload id>/<part number>`` (listings hide the prefix; a
user cannot write under it), the upload itself an empty object
``.qstore-multipart/<upload id>/upload`` whose metadata holds the target key
and headers. Complete writes, at the target key, a *manifest*: a small object
whose content (secret-shared like any content) lists each part's number,
size, version and object ID, and whose metadata says ``s3-manifest`` and the
real size. GET streams the parts in order (ranges map onto them, versions
pinned), so completing copies no data. The upload object is then marked
completed (a second Complete answers the same result, as S3 does); deleting
or overwriting the object deletes its parts.

Operations: ``GET /-/health`` and ``GET /-/metrics`` (Prometheus text format,
:class:`qstore.telemetry.GatewayMetrics`: requests, errors, latency and body
bytes by S3 operation, see :func:`s3_operation`) need no signature; no bucket
name starts with ``-``, so neither path is an S3 one. Every response carries
``X-Request-ID`` (the client's when it is a short safe token), the same ID as
``x-amz-request-id`` and the ``request_id`` of the JSON log lines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import email.utils
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from client.s3 import sigv4
from client.s3 import xml as sx
from client.s3.errors import S3Error
from client.s3.users import User, Users
from client.storage import ObjectInfo, QStore, Refused
from qkd_sim import observability
from qstore import telemetry
from qstore.cluster import GATEWAY_SAE, ClusterState
from qstore.errors import BucketNotEmpty, LocalError, NoSuchBucket, NoSuchKey, QStoreError

log = logging.getLogger(__name__)

MPU = ".qstore-multipart"
MAX_PUT = 5 << 30
MAX_PART = 5 << 30
MIN_PART = 5 << 20
MAX_KEYS = 1000
MAX_USER_META = 2048  # bytes of x-amz-meta-* names and values, as S3
HEALTH_PATH = "/-/health"
METRICS_PATH = "/-/metrics"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PRECONDITION = "at least one of the preconditions you specified did not hold"
_SAVED_HEADERS = ("cache-control", "content-disposition", "content-encoding", "content-language", "expires")


@dataclass(frozen=True)
class GatewayConfig:
    """Where the cluster is, who may call, where to listen."""

    state_dir: Path
    users: Users
    host: str = "127.0.0.1"
    port: int = 0
    sae_id: str = GATEWAY_SAE
    now: Callable[[], float] = field(default=time.time)
    chunk_size: int | None = None


STORE = web.AppKey("store", QStore)
CONFIG = web.AppKey("config", GatewayConfig)
STARTED = web.AppKey("started", float)
MULTIPART_TTL_S = 1.0  # how long "this bucket holds no multipart objects" is believed
MANIFESTS_KEPT = 256
READ_BUFSIZE = 1 << 20  # a request body arrives in pieces of up to this much


# -- small helpers ------------------------------------------------------------------------------


def _check_bucket(name: str) -> str:
    if not _BUCKET.fullmatch(name) or ".." in name:
        raise S3Error("InvalidBucketName", "the specified bucket is not valid", resource=name)
    return name


def _check_key(key: str) -> str:
    if not key or "\x00" in key:
        raise S3Error("InvalidArgument", "object keys are 1 to 1024 bytes without NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise S3Error("InvalidArgument", "the object key is not valid UTF-8") from None
    if size > 1024:
        raise S3Error("KeyTooLongError", "your key is too long")
    if key == MPU or key.startswith(MPU + "/"):
        raise S3Error("InvalidArgument", f"keys under {MPU}/ are reserved by the gateway")
    return key


def _etag_header(etag: str) -> str:
    return f'"{etag}"'


def _user_meta(request: web.Request) -> dict[str, str]:
    """What of the request's headers becomes the object's (secret-shared) metadata."""
    meta: dict[str, str] = {}
    total = 0
    for name, value in request.headers.items():
        low = name.lower()
        if low.startswith("x-amz-meta-"):
            total += len(low) - 11 + len(value.encode())
            meta["m:" + low[11:]] = value
        elif low in _SAVED_HEADERS:
            meta["h:" + low] = value
    if total > MAX_USER_META:
        raise S3Error("MetadataTooLarge", "your metadata headers exceed the maximum allowed metadata size")
    ctype = request.headers.get("Content-Type")
    if ctype:
        meta["content-type"] = ctype
    return meta


def _meta_headers(meta: dict[str, str]) -> dict[str, str]:
    out = {"Content-Type": meta.get("content-type", "binary/octet-stream")}
    for k, v in meta.items():
        if k.startswith("m:"):
            out["x-amz-meta-" + k[2:]] = v
        elif k.startswith("h:"):
            out[k[2:].title()] = v
    return out


def _size(info: ObjectInfo) -> int:
    meta = info.user_meta
    return int(meta["s3-size"]) if "s3-manifest" in meta else info.size


def _etag(info: ObjectInfo) -> str:
    return str(info.user_meta.get("etag", "")) or hashlib.md5(info.object_id.encode()).hexdigest()  # noqa: S324


def _int_param(value: str | None, name: str, low: int, high: int, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        v = int(value)
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer") from None
    if not low <= v <= high:
        raise S3Error("InvalidArgument", f"{name} must be from {low} to {high}")
    return v


def _xml(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/xml", headers=headers)


def _error_response(err: S3Error, request: web.Request, request_id: str) -> web.Response:
    headers = {"x-amz-request-id": request_id}
    if err.status == 304 or request.method == "HEAD":
        return web.Response(status=err.status, headers=headers)
    return _xml(sx.error(err.code, err.message, resource=err.resource or request.path, request_id=request_id),
                err.status, headers)


def _map_error(exc: QStoreError, bucket: str, key: str) -> S3Error:
    if isinstance(exc, NoSuchBucket):
        return S3Error("NoSuchBucket", "the specified bucket does not exist", resource=bucket)
    if isinstance(exc, NoSuchKey):
        return S3Error("NoSuchKey", "the specified key does not exist", resource=key)
    if isinstance(exc, BucketNotEmpty):
        return S3Error("BucketNotEmpty", "the bucket you tried to delete is not empty", resource=bucket)
    if isinstance(exc, Refused) and exc.name == "InvalidName":
        return S3Error("InvalidArgument", str(exc))
    if isinstance(exc, LocalError):
        return S3Error("InvalidArgument", str(exc))
    return S3Error("ServiceUnavailable", "the storage cluster could not complete the request")


def _parse_http_date(value: str) -> float | None:
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return d.timestamp() if d is not None else None


# -- request bodies -----------------------------------------------------------------------------


class Body:
    """A request body as a QStore source (``async read(n)``), checked as it streams.

    Decodes aws-chunked (with per-chunk signatures), counts bytes against the
    declared length and the limit, hashes MD5 (the ETag) and, when the client
    signed one, SHA-256; at the end a mismatch raises, so the put aborts and
    nothing is stored. ``gate``: a check running beside the upload (does the
    multipart upload exist?); its failure ends the body with that error, and
    the body never ends before it has passed.
    """

    def __init__(self, request: web.Request, auth: sigv4.Auth, limit: int,
                 gate: asyncio.Future[Any] | None = None):
        self._content = request.content
        self._gate = gate
        self._auth = auth
        self._limit = limit
        self.md5 = hashlib.md5()  # noqa: S324  # S3's ETag, not a security check
        self._sha = hashlib.sha256() if not auth.streaming and auth.payload != sigv4.UNSIGNED else None
        self._decoder = sigv4.ChunkedDecoder(auth) if auth.streaming else None
        self._pending = b""
        self._done = False
        self.total = 0
        h = request.headers
        self._expect_md5: bytes | None = None
        if "Content-MD5" in h:
            try:
                self._expect_md5 = base64.b64decode(h["Content-MD5"], validate=True)
            except (binascii.Error, ValueError):
                raise S3Error("InvalidDigest", "the Content-MD5 you specified is not valid") from None
            if len(self._expect_md5) != 16:
                raise S3Error("InvalidDigest", "the Content-MD5 you specified is not valid")
        declared = h.get("x-amz-decoded-content-length") if self._decoder else h.get("Content-Length")
        if declared is None and self._decoder is None and request.method == "PUT" and \
                "chunked" not in h.get("Transfer-Encoding", "").lower():
            raise S3Error("MissingContentLength", "you must provide the Content-Length HTTP header")
        self.declared: int | None = None
        if declared is not None:
            try:
                self.declared = int(declared)
            except ValueError:
                raise S3Error("InvalidArgument", "the content length is not a number") from None
            if self.declared < 0:
                raise S3Error("InvalidArgument", "the content length is negative")
            if self.declared > limit:
                raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed size")

    async def _raw(self, n: int) -> bytes:
        if self._decoder is None:
            return await self._content.read(n)
        while True:
            piece = self._decoder.next()
            if isinstance(piece, bytes):
                return piece
            if piece is sigv4.END:
                return b""
            self._decoder.feed(await self._content.read(1 << 16))

    async def read(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._gate is not None and self._gate.done():
            self._gate.result()  # raises the check's error: the put aborts
        if not self._pending:
            self._pending = await self._raw(n)
            if not self._pending:
                if self._gate is not None:
                    await self._gate
                self._finish()
                return b""
        out, self._pending = self._pending[:n], self._pending[n:]
        self.total += len(out)
        if self.total > self._limit or (self.declared is not None and self.total > self.declared):
            raise S3Error("IncompleteBody" if self.declared is not None else "EntityTooLarge",
                          "the body is longer than declared")
        self.md5.update(out)
        if self._sha is not None:
            self._sha.update(out)
        return out

    def _finish(self) -> None:
        self._done = True
        if self.declared is not None and self.total != self.declared:
            raise S3Error("IncompleteBody", "you did not provide the number of bytes specified")
        if self._expect_md5 is not None and self.md5.digest() != self._expect_md5:
            raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received")
        if self._sha is not None and self._sha.hexdigest() != self._auth.payload:
            raise S3Error("XAmzContentSHA256Mismatch",
                          "the provided x-amz-content-sha256 header does not match what was computed")

    async def read_all(self, limit: int) -> bytes:
        """A small body (XML) whole; longer than ``limit`` is refused."""
        out = bytearray()
        while piece := await self.read(65536):
            out += piece
            if len(out) > limit:
                raise S3Error("MalformedXML", "the XML document is too large")
        return bytes(out)


class Pipe:
    """A bounded in-memory pipe: a get's sink at one end, a put's source at the other."""

    def __init__(self, depth: int = 4):
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._rest = b""
        self.md5 = hashlib.md5()  # noqa: S324  # the copy's ETag

    async def write(self, data: bytes | memoryview) -> None:
        await self._q.put(bytes(data))

    async def close(self) -> None:
        await self._q.put(None)

    async def read(self, n: int) -> bytes:
        if not self._rest:
            got = await self._q.get()
            if got is None:
                self._q.put_nowait(None)
                return b""
            self._rest = got
        out, self._rest = self._rest[:n], self._rest[n:]
        self.md5.update(out)
        return out


# -- the gateway --------------------------------------------------------------------------------


class MultipartBuckets:
    """Which buckets may hold multipart objects: a PUT looks for a manifest it replaces only there.

    Every PUT would otherwise cost a HEAD (a round to every node) to learn
    that the object it overwrites has no parts to drop. One listing of the
    reserved prefix is believed for ``ttl_s``; a bucket where this gateway
    has just started an upload holds them. An upload that another gateway
    starts *and* completes inside that window, then overwritten here, leaves
    its parts behind as hidden objects (a race between two gateways could
    always do that).
    """

    def __init__(self, store: QStore, *, ttl_s: float = MULTIPART_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._ttl = ttl_s
        self._clock = clock
        self._seen: dict[str, tuple[float, bool]] = {}  # bucket -> (when learnt, holds multipart objects)

    def mark(self, bucket: str) -> None:
        """An upload was just created in ``bucket``."""
        self._seen[bucket] = (self._clock(), True)

    async def may_hold(self, bucket: str) -> bool:
        learnt, holds = self._seen.get(bucket, (float("-inf"), True))
        started = self._clock()
        if started - learnt < self._ttl:
            return holds
        # a few entries, not one: a key whose versions the nodes disagree on is left out of a listing
        holds = bool(await self._store.list(bucket, f"{MPU}/", limit=8))
        if self._seen.get(bucket, (float("-inf"), True))[0] < started:  # nothing newer learnt meanwhile
            self._seen[bucket] = (started, holds)
        return holds


class Gateway:
    """Request handling: one instance per app, holding its QStore, users and what it caches."""

    def __init__(self, store: QStore, config: GatewayConfig, started: float):
        self.store = store
        self.users = config.users
        self.now = config.now
        self.started = started
        self.multipart = MultipartBuckets(store)
        # (bucket, key, version, object ID) -> parts: a manifest never changes once written
        self._manifests: collections.OrderedDict[tuple[str, str, int | None, str], list[dict[str, Any]]] = \
            collections.OrderedDict()

    # -- dispatch --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = telemetry.request_id.get() or os.urandom(8).hex().upper()
        try:
            return await self._route(request, request_id)
        except S3Error as err:
            observability.note_error(request, err.code)
            return _error_response(err, request, request_id)

    def _authenticate(self, request: web.Request) -> tuple[User, sigv4.Auth]:
        headers = {k: ",".join(request.headers.getall(k)) for k in request.headers}
        req = sigv4.Request(method=request.method, raw_path=request.rel_url.raw_path,
                            query=request.rel_url.raw_query_string, headers=headers)
        auth = sigv4.verify(req, self.users.secret_of, now=self.now())
        user = self.users.get(auth.access_key)
        if user is None:  # removed between the two look-ups
            raise S3Error("InvalidAccessKeyId", "the access key ID does not exist")
        return user, auth

    async def _route(self, request: web.Request, rid: str) -> web.StreamResponse:
        user, auth = self._authenticate(request)
        raw = request.rel_url.raw_path
        bucket_raw, _, key_raw = raw.lstrip("/").partition("/")
        bucket, key = unquote(bucket_raw), unquote(key_raw)
        q = request.rel_url.query
        m = request.method
        if not bucket:
            if m == "GET":
                return await self.list_buckets(user)
            raise S3Error("MethodNotAllowed", "the method is not allowed against this resource", status=405)
        _check_bucket(bucket)
        if not user.may_use(bucket):
            raise S3Error("AccessDenied", "access denied", resource=bucket)
        try:
            if not key:
                return await self._bucket_op(request, auth, user, bucket, m, q)
            _check_key(key)
            return await self._object_op(request, auth, bucket, key, m, q)
        except QStoreError as exc:
            raise _map_error(exc, bucket, key) from None

    async def _bucket_op(self, request: web.Request, auth: sigv4.Auth, user: User, bucket: str, m: str,
                         q: Any) -> web.StreamResponse:
        if m == "PUT":
            if any(k in q for k in ("versioning", "acl", "policy", "tagging", "cors", "lifecycle")):
                raise S3Error("NotImplemented", "this bucket configuration is not supported")
            sx.parse_bucket_config(await Body(request, auth, sx.MAX_XML).read_all(sx.MAX_XML))
            await self.store.create_bucket(bucket)
            return web.Response(status=200, headers={"Location": "/" + bucket})
        if m == "HEAD":
            await self.store.list(bucket, limit=1)
            return web.Response(status=200, headers={"x-amz-bucket-region": "us-east-1"})
        if m == "DELETE":
            await self.store.delete_bucket(bucket)
            return web.Response(status=204)
        if m == "POST" and "delete" in q:
            return await self.delete_objects(request, auth, bucket)
        if m == "GET":
            if "location" in q:
                await self.store.list(bucket, limit=1)
                return _xml(sx.document("LocationConstraint", []))
            if "versioning" in q:
                await self.store.list(bucket, limit=1)
                return _xml(sx.document("VersioningConfiguration", []))
            if "uploads" in q:
                return await self.list_uploads(bucket, q)
            if "versions" in q:
                return await self.list_objects(bucket, q, user, mode="versions")
            if any(k in q for k in ("acl", "policy", "tagging", "cors", "lifecycle", "encryption",
                                    "website", "logging", "notification", "replication")):
                raise S3Error("NotImplemented", "this bucket configuration is not supported")
            return await self.list_objects(bucket, q, user, mode="v2" if q.get("list-type") == "2" else "v1")
        raise S3Error("MethodNotAllowed", "the method is not allowed against this resource", status=405)

    async def _object_op(self, request: web.Request, auth: sigv4.Auth, bucket: str, key: str, m: str,
                         q: Any) -> web.StreamResponse:
        upload = q.get("uploadId")
        if upload is not None and not _UPLOAD_ID.fullmatch(upload):
            raise S3Error("NoSuchUpload", "the specified upload does not exist", resource=upload)
        if m == "PUT":
            if upload is not None:
                return await self.upload_part(request, auth, bucket, key, upload, q)
            if "x-amz-copy-source" in request.headers:
                return await self.copy_object(request, bucket, key)
            if any(k in q for k in ("acl", "tagging", "retention", "legal-hold")):
                raise S3Error("NotImplemented", "object subresources are not supported")
            return await self.put_object(request, auth, bucket, key)
        if m in ("GET", "HEAD"):
            if upload is not None and m == "GET":
                return await self.list_parts(bucket, key, upload, q)
            if any(k in q for k in ("acl", "tagging", "attributes", "torrent")):
                raise S3Error("NotImplemented", "object subresources are not supported")
            return await self.get_object(request, bucket, key, head=(m == "HEAD"))
        if m == "DELETE":
            if upload is not None:
                return await self.abort_upload(bucket, key, upload)
            await self.delete_object(bucket, key)
            return web.Response(status=204)
        if m == "POST":
            if "uploads" in q:
                return await self.create_upload(request, bucket, key)
            if upload is not None:
                return await self.complete_upload(request, auth, bucket, key, upload)
        raise S3Error("MethodNotAllowed", "the method is not allowed against this resource", status=405)

    # -- buckets ---------------------------------------------------------------------------

    async def list_buckets(self, user: User) -> web.Response:
        names = [b for b in await self.store.list_buckets() if user.may_use(b)]
        created = sx.timestamp(self.started)
        return _xml(sx.document("ListAllMyBucketsResult", [
            ("Owner", sx.owner(user.name)),
            ("Buckets", [("Bucket", [("Name", b), ("CreationDate", created)]) for b in names])]))

    async def _listing(self, bucket: str, prefix: str, after: str) -> AsyncIterator[ObjectInfo]:
        """Every visible object from ``after`` on, in key order, pages fetched as needed."""
        while True:
            batch = await self.store.list_meta(bucket, prefix, start_after=after, limit=MAX_KEYS)
            for info in batch:
                if info.key.startswith(MPU + "/"):
                    continue
                yield info
            if len(batch) < MAX_KEYS:
                return
            after = batch[-1].key

    async def list_objects(self, bucket: str, q: Any, user: User, *, mode: str) -> web.Response:
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        max_keys = _int_param(q.get("max-keys"), "max-keys", 0, 100_000, MAX_KEYS)
        max_keys = min(max_keys, MAX_KEYS)
        encode = q.get("encoding-type") == "url"
        if mode == "v2":
            token = q.get("continuation-token")
            if token is not None:
                try:
                    after = base64.urlsafe_b64decode(token.encode()).decode()
                except (binascii.Error, ValueError):
                    raise S3Error("InvalidArgument", "the continuation token is not valid") from None
            else:
                after = q.get("start-after", "")
        elif mode == "versions":
            after = q.get("key-marker", "")
        else:
            after = q.get("marker", "")
        start = max(after, prefix) if after >= prefix else prefix
        start_after = after if after >= prefix else ""
        rows: list[tuple[str, sx.Value]] = []
        prefixes: list[str] = []
        count = 0
        last = ""
        truncated = False
        if max_keys:
            async for info in self._listing(bucket, prefix, start_after):
                if not info.key.startswith(prefix) or info.key <= after:
                    continue
                common = None
                if delimiter:
                    cut = info.key.find(delimiter, len(prefix))
                    if cut >= 0:
                        common = info.key[: cut + len(delimiter)]
                if common is not None and prefixes and prefixes[-1] == common:
                    continue
                if common is not None and after.startswith(common):
                    continue  # resumed inside a prefix already returned
                if count == max_keys:
                    truncated = True
                    break
                count += 1
                if common is not None:
                    prefixes.append(common)
                    last = common
                    continue
                last = info.key
                rows.append(self._entry(info, mode, user, encode))
        del start
        name = self._encode(bucket, False)
        common_rows: list[tuple[str, sx.Value]] = [
            ("CommonPrefixes", [("Prefix", self._encode(p, encode))]) for p in prefixes]
        head: list[tuple[str, sx.Value]] = [("Name", name), ("Prefix", self._encode(prefix, encode))]
        tail: list[tuple[str, sx.Value]] = [("MaxKeys", max_keys),
                                            ("Delimiter", self._encode(delimiter, encode) or None),
                                            ("IsTruncated", truncated),
                                            ("EncodingType", "url" if encode else None)]
        if mode == "v2":
            token = q.get("continuation-token")
            head += [("KeyCount", count), ("ContinuationToken", token),
                     ("StartAfter", q.get("start-after") or None)]
            if truncated:
                tail.append(("NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode()))
            return _xml(sx.document("ListBucketResult", head + tail + rows + common_rows))
        if mode == "versions":
            head += [("KeyMarker", q.get("key-marker", "")),
                     ("VersionIdMarker", q.get("version-id-marker", ""))]
            if truncated:
                tail += [("NextKeyMarker", self._encode(last, encode)), ("NextVersionIdMarker", "null")]
            return _xml(sx.document("ListVersionsResult", head + tail + rows + common_rows))
        head.append(("Marker", self._encode(q.get("marker", ""), encode)))
        if truncated:
            tail.append(("NextMarker", self._encode(last, encode)))
        return _xml(sx.document("ListBucketResult", head + tail + rows + common_rows))

    @staticmethod
    def _encode(s: str, encode: bool) -> str:
        from urllib.parse import quote

        return quote(s, safe="/") if encode else s

    def _entry(self, info: ObjectInfo, mode: str, user: User, encode: bool) -> tuple[str, sx.Value]:
        fields: list[tuple[str, sx.Value]] = [("Key", self._encode(info.key, encode))]
        if mode == "versions":
            fields += [("VersionId", "null"), ("IsLatest", True)]
        fields += [("LastModified", sx.timestamp(info.committed_at)), ("ETag", _etag_header(_etag(info))),
                   ("Size", _size(info)), ("StorageClass", "STANDARD")]
        if mode != "v2":
            fields.append(("Owner", sx.owner(user.name)))
        return ("Version" if mode == "versions" else "Contents", fields)

    # -- objects ---------------------------------------------------------------------------

    async def put_object(self, request: web.Request, auth: sigv4.Auth, bucket: str, key: str) -> web.Response:
        meta = _user_meta(request)
        body = Body(request, auth, MAX_PUT)
        old = None
        if await self.multipart.may_hold(bucket):  # a multipart object it replaces has parts to drop
            old = asyncio.create_task(self._head_or_none(bucket, key))
        try:
            # the ETag is known only at the end of the body; it goes into the secret metadata
            await self.store.put(bucket, key, body, meta=meta, size=body.declared,
                                 meta_after=lambda: {"etag": body.md5.hexdigest()})
        except BaseException:
            if old is not None:
                old.cancel()
                with contextlib.suppress(BaseException):
                    await old
            raise
        if old is not None:
            await self._drop_manifest_parts(bucket, await old)
        return web.Response(status=200, headers={"ETag": _etag_header(body.md5.hexdigest())})

    async def _head_or_none(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            return await self.store.head(bucket, key)
        except (NoSuchKey, QStoreError):
            return None

    async def _drop_manifest_parts(self, bucket: str, old: ObjectInfo | None) -> None:
        """An overwritten or deleted multipart object's parts go too."""
        if old is None or "s3-manifest" not in old.user_meta:
            return
        upload = old.user_meta.get("s3-upload", "")
        if _UPLOAD_ID.fullmatch(upload):
            await self._drop_upload(bucket, upload)

    async def _drop_upload(self, bucket: str, upload: str) -> None:
        for info in await self.store.list(bucket, f"{MPU}/{upload}/", limit=10_000):
            with contextlib.suppress(NoSuchKey):
                await self.store.delete(bucket, info.key)

    async def get_object(self, request: web.Request, bucket: str, key: str, *,
                         head: bool) -> web.StreamResponse:
        if "versionId" in request.rel_url.query and request.rel_url.query["versionId"] != "null":
            raise S3Error("NoSuchKey", "the specified version does not exist", resource=key)
        info = await self.store.head(bucket, key, inline=not head)  # a small object's shares come along
        meta = dict(info.user_meta)
        etag, size = _etag(info), _size(info)
        headers = {"ETag": _etag_header(etag), "Last-Modified": sx.http_date(info.committed_at),
                   "Accept-Ranges": "bytes", **_meta_headers(meta)}
        self._preconditions(request, etag, info.committed_at)
        if "partNumber" in request.rel_url.query:
            raise S3Error("NotImplemented", "GET by part number is not supported")
        start, end = 0, size
        status = 200
        rng = request.headers.get("Range")
        if rng is not None:
            parsed = _parse_range(rng, size)
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        for name, header in (("response-content-type", "Content-Type"),
                             ("response-content-disposition", "Content-Disposition"),
                             ("response-cache-control", "Cache-Control"),
                             ("response-content-encoding", "Content-Encoding")):
            if name in request.rel_url.query:
                headers[header] = request.rel_url.query[name]
        headers["Content-Length"] = str(end - start)
        if head:
            return web.Response(status=status, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        await resp.prepare(request)
        if end > start:
            await self._stream(bucket, key, info, resp, start, end)
        await resp.write_eof()
        return resp

    async def _stream(self, bucket: str, key: str, info: ObjectInfo, sink: Any, start: int, end: int) -> None:
        version = (info.version, info.object_id)
        if "s3-manifest" not in info.user_meta:
            await self.store.get(bucket, key, sink, start=start, end=end, version=version, info=info)
            return
        offset = 0
        for part in await self._manifest(bucket, key, version):
            lo, hi = max(start, offset), min(end, offset + part["size"])
            if lo < hi:
                await self.store.get(bucket, part["key"], sink, start=lo - offset, end=hi - offset,
                                     version=(part["version"], part["object_id"]))
            offset += part["size"]

    async def _manifest(self, bucket: str, key: str, version: tuple[int | None, str]) -> list[dict[str, Any]]:
        """A multipart object's parts, read once per version (ranged GETs of one object read it often)."""
        ref = (bucket, key, *version)
        parts = self._manifests.get(ref)
        if parts is None:
            raw = io.BytesIO()
            await self.store.get(bucket, key, raw, version=version)
            parts = json.loads(raw.getvalue())["parts"]
            self._manifests[ref] = parts
            while len(self._manifests) > MANIFESTS_KEPT:
                self._manifests.popitem(last=False)
        else:
            self._manifests.move_to_end(ref)
        return parts

    @staticmethod
    def _preconditions(request: web.Request, etag: str, modified: float) -> None:
        h = request.headers
        modified = float(int(modified))  # HTTP dates have whole seconds

        def matches(value: str) -> bool:
            tags = [t.strip().removeprefix("W/").strip('"') for t in value.split(",")]
            return "*" in tags or etag in tags

        if "If-Match" in h and not matches(h["If-Match"]):
            raise S3Error("PreconditionFailed", _PRECONDITION)
        if "If-Match" not in h and "If-Unmodified-Since" in h:
            t = _parse_http_date(h["If-Unmodified-Since"])
            if t is not None and modified > t:
                raise S3Error("PreconditionFailed",
                              _PRECONDITION)
        if "If-None-Match" in h:
            if matches(h["If-None-Match"]):
                raise S3Error("NotModified", "not modified")
        elif "If-Modified-Since" in h:
            t = _parse_http_date(h["If-Modified-Since"])
            if t is not None and modified <= t:
                raise S3Error("NotModified", "not modified")

    async def delete_object(self, bucket: str, key: str) -> None:
        old = await self._head_or_none(bucket, key)
        try:
            await self.store.delete(bucket, key)
        except NoSuchKey:
            return  # S3 answers 204 for a key that is not there
        await self._drop_manifest_parts(bucket, old)

    async def delete_objects(self, request: web.Request, auth: sigv4.Auth, bucket: str) -> web.Response:
        body = await Body(request, auth, sx.MAX_XML).read_all(sx.MAX_XML)
        quiet, objects = sx.parse_delete(body)
        rows: list[tuple[str, sx.Value]] = []
        for key, version in objects:
            try:
                _check_key(key)
                if version not in (None, "null"):
                    raise S3Error("NoSuchKey", "no such version")
                await self.delete_object(bucket, key)
                if not quiet:
                    rows.append(("Deleted", [("Key", key), ("VersionId", version)]))
            except S3Error as err:
                rows.append(("Error", [("Key", key), ("Code", err.code), ("Message", err.message)]))
            except QStoreError as exc:
                err = _map_error(exc, bucket, key)
                rows.append(("Error", [("Key", key), ("Code", err.code), ("Message", err.message)]))
        return _xml(sx.document("DeleteResult", rows))

    async def copy_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        source = unquote(request.headers["x-amz-copy-source"].split("?", 1)[0]).lstrip("/")
        src_bucket, _, src_key = source.partition("/")
        _check_bucket(src_bucket)
        _check_key(src_key)
        user = self.users.get(sigv4_access_key(request))
        if user is None or not user.may_use(src_bucket):
            raise S3Error("AccessDenied", "access denied", resource=src_bucket)
        try:
            info = await self.store.head(src_bucket, src_key)
        except QStoreError as exc:
            raise _map_error(exc, src_bucket, src_key) from None
        directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "unknown metadata directive")
        if directive == "COPY":
            meta = {k: v for k, v in info.user_meta.items() if not k.startswith("s3-") and k != "etag"}
            if (src_bucket, src_key) == (bucket, key) and "s3-manifest" not in info.user_meta:
                raise S3Error("InvalidRequest", "this copy request is illegal because it is trying to copy "
                              "an object to itself without changing the object's metadata")
        else:
            meta = _user_meta(request)
        self._preconditions_copy(request, _etag(info), info.committed_at)
        pipe = Pipe()

        async def produce() -> None:
            try:
                await self._stream(src_bucket, src_key, info, pipe, 0, _size(info))
            finally:
                await pipe.close()

        old = await self._head_or_none(bucket, key)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            put = tg.create_task(self.store.put(bucket, key, pipe, meta=meta,
                                                meta_after=lambda: {"etag": pipe.md5.hexdigest()}))
        report = put.result()
        if old is not None and (old.version, old.object_id) != (info.version, info.object_id):
            await self._drop_manifest_parts(bucket, old)
        etag = pipe.md5.hexdigest()
        when = time.time() if report.version is None else report.version / 1e9
        return _xml(sx.document("CopyObjectResult", [("LastModified", sx.timestamp(when)),
                                                     ("ETag", _etag_header(etag))]))

    @staticmethod
    def _preconditions_copy(request: web.Request, etag: str, modified: float) -> None:
        h = request.headers
        if "x-amz-copy-source-if-match" in h and h["x-amz-copy-source-if-match"].strip('"') != etag:
            raise S3Error("PreconditionFailed", _PRECONDITION)
        if "x-amz-copy-source-if-none-match" in h and h["x-amz-copy-source-if-none-match"].strip('"') == etag:
            raise S3Error("PreconditionFailed", _PRECONDITION)
        del modified

    # -- multipart -------------------------------------------------------------------------

    @staticmethod
    def _upload_key(upload: str) -> str:
        return f"{MPU}/{upload}/upload"

    @staticmethod
    def _part_key(upload: str, number: int) -> str:
        return f"{MPU}/{upload}/{number:05d}"

    async def _upload(self, bucket: str, key: str, upload: str) -> ObjectInfo:
        try:
            info = await self.store.head(bucket, self._upload_key(upload))
        except NoSuchKey:
            raise S3Error("NoSuchUpload", "the specified upload does not exist", resource=upload) from None
        if info.user_meta.get("s3-key") != key:
            raise S3Error("NoSuchUpload", "the specified upload does not exist", resource=upload)
        return info

    async def create_upload(self, request: web.Request, bucket: str, key: str) -> web.Response:
        meta = _user_meta(request)
        upload = uuid.uuid4().hex
        meta.update({"s3-key": key, "s3-initiated": repr(self.now())})
        await self.store.put(bucket, self._upload_key(upload), b"", meta=meta)
        self.multipart.mark(bucket)  # after the put: a listing from now on sees the upload
        return _xml(sx.document("InitiateMultipartUploadResult", [("Bucket", bucket), ("Key", key),
                                                                  ("UploadId", upload)]))

    async def upload_part(self, request: web.Request, auth: sigv4.Auth, bucket: str, key: str, upload: str,
                          q: Any) -> web.Response:
        number = _int_param(q.get("partNumber"), "partNumber", 1, sx.MAX_PARTS, 0)
        if number == 0:
            raise S3Error("InvalidArgument", "partNumber is required")
        if "x-amz-copy-source" in request.headers:
            raise S3Error("NotImplemented", "UploadPartCopy is not supported")
        # the upload's check runs beside the part's upload; the part commits only once it passed
        check = asyncio.create_task(self._open_upload(bucket, key, upload))
        try:
            body = Body(request, auth, MAX_PART, gate=check)
            await self.store.put(bucket, self._part_key(upload, number), body, size=body.declared,
                                 meta_after=lambda: {"etag": body.md5.hexdigest()})
        finally:
            if not check.done():
                check.cancel()
            with contextlib.suppress(BaseException):  # its error, if any, went up through the body
                await check
        return web.Response(status=200, headers={"ETag": _etag_header(body.md5.hexdigest())})

    async def _open_upload(self, bucket: str, key: str, upload: str) -> ObjectInfo:
        info = await self._upload(bucket, key, upload)
        if "s3-completed" in info.user_meta:
            raise S3Error("NoSuchUpload", "the upload was completed", resource=upload)
        return info

    async def _parts(self, bucket: str, upload: str) -> list[tuple[int, ObjectInfo]]:
        out = []
        for info in await self.store.list_meta(bucket, f"{MPU}/{upload}/", limit=10_000):
            tail = info.key.rsplit("/", 1)[1]
            if tail.isdigit():
                out.append((int(tail), info))
        return out

    async def complete_upload(self, request: web.Request, auth: sigv4.Auth, bucket: str, key: str,
                              upload: str) -> web.Response:
        wanted = sx.parse_complete(await Body(request, auth, sx.MAX_XML).read_all(sx.MAX_XML))
        info = await self._upload(bucket, key, upload)
        done = info.user_meta.get("s3-completed")
        location = f"/{bucket}/{key}"
        if done is not None:  # completed before: S3 answers the same again
            return _xml(sx.document("CompleteMultipartUploadResult", [
                ("Location", location), ("Bucket", bucket), ("Key", key), ("ETag", _etag_header(done))]))
        have = dict(await self._parts(bucket, upload))
        manifest = []
        md5s = b""
        for i, ref in enumerate(wanted):
            part = have.get(ref.number)
            if part is None or part.user_meta.get("etag") != ref.etag:
                raise S3Error("InvalidPart", "one or more of the specified parts could not be found")
            if i < len(wanted) - 1 and part.size < MIN_PART:
                raise S3Error("EntityTooSmall", "your proposed upload is smaller than the minimum size")
            manifest.append({"number": ref.number, "key": part.key, "size": part.size,
                             "version": part.version, "object_id": part.object_id})
            md5s += bytes.fromhex(ref.etag)
        etag = f"{hashlib.md5(md5s).hexdigest()}-{len(wanted)}"  # noqa: S324  # S3's multipart ETag
        total = sum(p["size"] for p in manifest)
        meta = {k: v for k, v in info.user_meta.items() if not k.startswith("s3-")}
        meta.update({"etag": etag, "s3-manifest": "1", "s3-size": str(total), "s3-upload": upload})
        old = await self._head_or_none(bucket, key)
        await self.store.put(bucket, key, json.dumps({"parts": manifest}).encode(), meta=meta)
        used = {p["number"] for p in manifest}
        for number, part in have.items():
            if number not in used:
                with contextlib.suppress(NoSuchKey):
                    await self.store.delete(bucket, part.key)
        done_meta = {**info.user_meta, "s3-completed": etag}
        await self.store.put(bucket, self._upload_key(upload), b"", meta=done_meta)
        if old is not None and old.user_meta.get("s3-upload") != upload:
            await self._drop_manifest_parts(bucket, old)
        return _xml(sx.document("CompleteMultipartUploadResult", [
            ("Location", location), ("Bucket", bucket), ("Key", key), ("ETag", _etag_header(etag))]))

    async def abort_upload(self, bucket: str, key: str, upload: str) -> web.Response:
        info = await self._upload(bucket, key, upload)
        if "s3-completed" in info.user_meta:
            raise S3Error("NoSuchUpload", "the upload was completed", resource=upload)
        await self._drop_upload(bucket, upload)
        return web.Response(status=204)

    async def list_parts(self, bucket: str, key: str, upload: str, q: Any) -> web.Response:
        info = await self._upload(bucket, key, upload)
        if "s3-completed" in info.user_meta:
            raise S3Error("NoSuchUpload", "the upload was completed", resource=upload)
        marker = _int_param(q.get("part-number-marker"), "part-number-marker", 0, sx.MAX_PARTS, 0)
        max_parts = min(_int_param(q.get("max-parts"), "max-parts", 0, 100_000, 1000), 1000)
        parts = [(n, p) for n, p in sorted(await self._parts(bucket, upload)) if n > marker]
        shown, truncated = parts[:max_parts], len(parts) > max_parts
        rows: list[tuple[str, sx.Value]] = [
            ("Part", [("PartNumber", n), ("LastModified", sx.timestamp(p.committed_at)),
                      ("ETag", _etag_header(p.user_meta.get("etag", ""))), ("Size", p.size)])
            for n, p in shown]
        return _xml(sx.document("ListPartsResult", [
            ("Bucket", bucket), ("Key", key), ("UploadId", upload), ("PartNumberMarker", marker),
            ("NextPartNumberMarker", shown[-1][0] if shown else marker), ("MaxParts", max_parts),
            ("IsTruncated", truncated), ("StorageClass", "STANDARD"), *rows]))

    async def list_uploads(self, bucket: str, q: Any) -> web.Response:
        prefix = q.get("prefix", "")
        rows: list[tuple[str, sx.Value]] = []
        after = ""
        while True:
            batch = await self.store.list_meta(bucket, f"{MPU}/", start_after=after, limit=MAX_KEYS)
            for info in batch:
                meta = info.user_meta
                if not info.key.endswith("/upload") or "s3-completed" in meta:
                    continue
                key = meta.get("s3-key", "")
                if not key.startswith(prefix):
                    continue
                initiated = float(meta.get("s3-initiated", info.committed_at))
                rows.append((key, [("Key", key), ("UploadId", info.key.split("/")[1]),
                                   ("Initiated", sx.timestamp(initiated)), ("StorageClass", "STANDARD")]))
            if len(batch) < MAX_KEYS:
                break
            after = batch[-1].key
        rows.sort(key=lambda r: r[0])
        return _xml(sx.document("ListMultipartUploadsResult", [
            ("Bucket", bucket), ("KeyMarker", ""), ("UploadIdMarker", ""), ("Prefix", prefix),
            ("MaxUploads", 1000), ("IsTruncated", False), *[("Upload", r[1]) for r in rows]]))


GATEWAY = web.AppKey("gateway", Gateway)


def sigv4_access_key(request: web.Request) -> str:
    """The access key a request (already verified) was signed with."""
    auth = request.headers.get("Authorization", "")
    m = re.search(r"Credential=([^/]+)/", auth)
    if m:
        return m.group(1)
    cred = request.rel_url.query.get("X-Amz-Credential", "")
    return cred.split("/", 1)[0]


_BUCKET_CONFIG = frozenset({"acl", "policy", "tagging", "cors", "lifecycle", "encryption", "website",
                            "logging", "notification", "replication"})
_OBJECT_SUBRESOURCES = frozenset({"acl", "tagging", "retention", "legal-hold", "attributes", "torrent"})


def s3_operation(method: str, raw_path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The S3 operation a request asks for (its metrics label), as :meth:`Gateway._route` dispatches it.

    ``Unsupported`` for the subresources the gateway refuses, ``Unknown`` for anything else.
    ``headers`` is case-insensitive (aiohttp's).
    """
    bucket, _, key = raw_path.lstrip("/").partition("/")
    upload = "uploadId" in query
    if not bucket:
        return "ListBuckets" if method == "GET" else "Unknown"
    if not key:
        if method == "PUT":
            refused = any(k in query for k in ("versioning", "acl", "policy", "tagging", "cors", "lifecycle"))
            return "Unsupported" if refused else "CreateBucket"
        if method == "GET":
            for name, op in (("location", "GetBucketLocation"), ("versioning", "GetBucketVersioning"),
                             ("uploads", "ListMultipartUploads"), ("versions", "ListObjectVersions")):
                if name in query:
                    return op
            if _BUCKET_CONFIG.intersection(query):
                return "Unsupported"
            return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
        if method == "POST":
            return "DeleteObjects" if "delete" in query else "Unknown"
        return {"HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, "Unknown")
    if method == "PUT":
        if upload:
            return "UploadPart"
        if "x-amz-copy-source" in headers:
            return "CopyObject"
        return "Unsupported" if _OBJECT_SUBRESOURCES.intersection(query) else "PutObject"
    if method in ("GET", "HEAD"):
        if upload and method == "GET":
            return "ListParts"
        if _OBJECT_SUBRESOURCES.intersection(query):
            return "Unsupported"
        return "GetObject" if method == "GET" else "HeadObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if upload else "DeleteObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if upload:
            return "CompleteMultipartUpload"
    return "Unknown"


def _operation(request: web.Request) -> str | None:
    """The S3 operation of a request (None for /-/health and /-/metrics: their route names)."""
    if request.path in (HEALTH_PATH, METRICS_PATH):
        return None
    return s3_operation(request.method, request.rel_url.raw_path, request.rel_url.query, request.headers)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``bytes=`` range; None to ignore it (S3 ignores what it cannot use)."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first, dash, last = value[6:].strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise S3Error("InvalidRange", "the requested range is not satisfiable")
            return max(size - n, 0), size
        start = int(first)
        end = int(last) + 1 if last else max(size, start + 1)
    except ValueError:
        return None
    if start < 0 or end <= start:
        return None
    if start >= size:  # also for an empty object: nothing to satisfy any range
        raise S3Error("InvalidRange", "the requested range is not satisfiable")
    return start, min(end, size)


# -- the app ------------------------------------------------------------------------------------


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    state = ClusterState.load(config.state_dir)
    kw: dict[str, Any] = {"sae_id": config.sae_id, "key_ahead": True}  # long-lived: small puts' key ahead
    if config.chunk_size:
        kw["chunk_size"] = config.chunk_size
    async with QStore(state, **kw) as store:
        app[STORE] = store
        app[STARTED] = float(state.extra.get("started_at", config.now()))
        app[GATEWAY] = Gateway(store, config, app[STARTED])
        yield


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"service": "qstore-s3", "sae_id": request.app[CONFIG].sae_id})


def create_app(config: GatewayConfig) -> web.Application:
    """The gateway's aiohttp app; its QStore opens at startup and closes at cleanup."""
    app = web.Application(client_max_size=sx.MAX_XML)
    app[CONFIG] = config
    app.cleanup_ctx.append(_resources)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].handle(request)

    app.router.add_get(HEALTH_PATH, _health, name="health")
    observability.install(app, telemetry.GatewayMetrics(config.sae_id), path=METRICS_PATH,
                          require_client_cert=False, operation=_operation)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve(config: GatewayConfig) -> None:
    """Run the gateway until SIGTERM or SIGINT; logs: JSON lines on stderr."""
    telemetry.configure_json_logging(static={"service": "s3", "instance": config.sae_id})
    web.run_app(create_app(config), host=config.host, port=config.port, print=None,
                access_log=None, handle_signals=True, read_bufsize=READ_BUFSIZE)
