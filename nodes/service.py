"""The storage node: an aiohttp shell around :class:`nodes.store.Store` and the sealed links.

A node is an SAE of its site's KME. Share frames arrive sealed (one-time pad
and one-time MAC, or the named hybrid AES-256-GCM mode) with key from the
client's KME; the node resolves the key_IDs with ``dec_keys``, checks the tag,
the frame and its digest, and only then stages the share. Shares go back out
sealed with fresh key the node obtains with ``enc_keys`` (it is then the
master SAE). Every request is mutual TLS; the caller is the SAE named by its
client certificate, and its key stream is the one the envelope must open with.

Routes (JSON unless said otherwise; errors are ``{"error": Name, "message"}``
with the status the error carries)::

    GET    /v1/health                       {"status": "ok", "site", "sae_id", "x"}
    GET    /v1/status                       store figures, key spent per peer
    GET    /v1/buckets                      {"buckets": [{"name", "created"}]}
    PUT    /v1/buckets/{bucket}             {"created": bool}
    DELETE /v1/buckets/{bucket}             204; 404 / 409 (not empty)
    POST   /v1/uploads                      begin: {"upload_id", "bucket", "key", "object_id" (hex),
                                            "version", "x", "k", "n"}
    PUT    /v1/uploads/{upload_id}/chunks   body: a sealed envelope of one share frame
    PUT    /v1/uploads/{upload_id}/oneshot?chunks=0|1   a small object: begin (X-QStore-Upload
                                            header), its one sealed frame, prepare
    POST   /v1/uploads/{upload_id}/prepare  {"chunks": N}: all there, on disk (fsync)
    POST   /v1/uploads/{upload_id}/commit   {"meta": {...}}: the version becomes visible
    DELETE /v1/uploads/{upload_id}          abort
    POST   /v1/tombstones                   {"bucket", "key", "object_id", "version", "meta"}
    GET    /v1/versions?bucket=&key=        {"versions": [...]} newest first
    GET    /v1/objects?bucket=&prefix=&start_after=&limit=   newest live version per key
    GET    /v1/object-versions?bucket=&prefix=&key_marker=&limit=
    GET    /v1/chunk?bucket=&key=&object_id=&version=&index=&cipher=   a sealed share frame
    POST   /v1/admin/gc                     {"staging_ttl_s"?}: collect stale staging now
    POST   /v1/admin/scrub                  re-check share digests now
    GET    /metrics                         Prometheus text format, any cluster certificate
                                            (names: :class:`qstore.telemetry.NodeMetrics`)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodes import mpc as runtime
from nodes.blobs import open_blobs
from nodes.catalog import catalog_schema_for
from nodes.mpc import Mailbox, QueryFailed
from nodes.pending import PendingSecrets
from nodes.store import Store, Upload, Version
from nodes.tables import TableInfo, TableStore, TableUpload, check_sae, check_table_name
from qkd_sim import observability, pki
from qkd_sim.envelope_keys import (
    ANNOUNCE_HEADER,
    EPOCH_HEADER,
    AheadKeys,
    OpeningKeys,
    check_epoch,
    envelope_keys,
    parse_announcement,
)
from qkd_sim.kme import caller_of
from qkd_sim.sae import KMEError, SAEClient, SAEConfig
from qstore import otp, secret_meta, telemetry
from qstore.cluster import ClusterState, check_catalog_url, node_sae_id
from qstore.errors import Forbidden, FrameError, LocalError, QStoreError, RemoteError, SealError
from qstore.framing import split_frame

log = logging.getLogger(__name__)

MAX_ENVELOPE = otp.MAX_LENGTH + (1 << 16)
MAX_JSON = 1 << 20
MAX_INLINE = 64 << 10  # largest share a versions answer carries along
_HEX32 = re.compile(r"[0-9a-f]{32}")


class Unauthorized(RemoteError):
    status = 401


@dataclass(frozen=True, kw_only=True)
class Peer:
    """Another storage node: an MPC partner."""

    x: int
    sae_id: str
    site: str
    url: str


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """One storage node: who it is, where its data lives, how it reaches its KME."""

    site: str
    sae_id: str
    x: int
    data_dir: Path
    cert: Path
    key: Path
    ca: Path
    kme_url: str
    host: str = "127.0.0.1"
    port: int = 0
    staging_ttl_s: float = 3600.0
    superseded_ttl_s: float = 86400.0
    gc_interval_s: float = 60.0
    scrub_interval_s: float = 3600.0
    scrub_bytes: int = 256 << 20
    key_wait_s: float = 30.0
    fsync: bool = True
    t: int = 1  # MPC threshold: any t nodes learn nothing (t = k - 1 of the cluster)
    peers: tuple[Peer, ...] = ()  # the other storage nodes (MPC partners)
    mpc_round_timeout_s: float = 60.0
    # Where committed share data lives: "local" (<data_dir>/objects) or "s3" (a bucket of an object store
    # at this site: MinIO, Ceph RGW, AWS). Staging and the catalog stay in data_dir either way.
    blob_store: str = "local"
    s3_endpoint: str | None = None  # e.g. "http://minio.site1:9000"; None: AWS
    s3_bucket: str | None = None
    s3_prefix: str | None = None  # None: "<sae_id>/", so nodes may share a bucket
    s3_region: str | None = None
    s3_access_key: str | None = None  # None: boto3's chain (AWS_ACCESS_KEY_ID, profile, instance role)
    s3_secret_key: str | None = field(default=None, repr=False)
    # The catalog: SQLite in data_dir (None), or a PostgreSQL URL without password (PGPASSWORD, ~/.pgpass)
    # and this node's schema there (None: "qstore_<sae id>").
    catalog_url: str | None = None
    catalog_schema: str | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("data_dir", "cert", "key", "ca"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.x, int) or not 1 <= self.x <= 255:
            raise LocalError("x must be in 1..255")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise LocalError("port must be in [0, 65535]")
        if not isinstance(self.t, int) or not 1 <= self.t <= 127:
            raise LocalError("t must be in 1..127")
        if self.blob_store not in ("local", "s3"):
            raise LocalError("blob_store must be 'local' or 's3'")
        if self.blob_store == "s3" and not self.s3_bucket:
            raise LocalError("blob_store 's3' needs s3_bucket")
        if self.catalog_url is not None:
            check_catalog_url(self.catalog_url)
        if any(p.x == self.x for p in self.peers) or len({p.x for p in self.peers}) != len(self.peers):
            raise LocalError("peers must have distinct x coordinates other than this node's")

    @classmethod
    def from_state(cls, state: ClusterState, site: str, **overrides: Any) -> NodeConfig:
        """The config of ``site``'s node as ``cluster.json`` describes it."""
        node = state.node(site)
        sae = state.sae(node.id)
        host, _, port = node.url.removeprefix("https://").rpartition(":")
        peers = tuple(Peer(x=o.x, sae_id=o.id, site=o.site, url=o.url)
                      for o in state.nodes if o.id != node.id)
        storage = node.storage or {}  # the cluster file's [sites.storage], under this class's names
        names = {"endpoint": "s3_endpoint", "bucket": "s3_bucket", "prefix": "s3_prefix",
                 "region": "s3_region", "catalog": "catalog_url", "catalog_schema": "catalog_schema"}
        stored = {names[k]: v for k, v in storage.items() if k in names}
        stored["blob_store"] = storage.get("backend", "local")
        return cls(**{
            "site": node.site, "sae_id": node.id, "x": node.x, "t": max(1, state.k - 1), "peers": peers,
            "data_dir": node.data or state.directory / "nodes" / node.site,
            "cert": sae.cert, "key": sae.key, "ca": state.ca, "kme_url": state.kme_url_of(node.id),
            "host": host.strip("[]"), "port": int(port), **stored, **overrides,
        })


CONFIG = web.AppKey("config", NodeConfig)
STORE = web.AppKey("store", Store)
SAE = web.AppKey("sae", SAEClient)
STATS = web.AppKey("stats", dict)
TABLES = web.AppKey("tables", TableStore)
MAILBOX = web.AppKey("mailbox", Mailbox)
PEER_KEYS = web.AppKey("peer_keys", AheadKeys)  # MPC round messages to peer nodes
CLIENT_KEYS = web.AppKey("client_keys", AheadKeys)  # small shares served to clients
OPENING = web.AppKey("opening", OpeningKeys)  # keys that clients announced, fetched ahead
PEER_SESSION = web.AppKey("peer_session", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", telemetry.NodeMetrics)
PENDING = web.AppKey("pending", PendingSecrets)  # metadata shares that came with oneshot


def _json(obj: object, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status)


def version_json(v: Version) -> dict[str, Any]:
    """A version's public facts: never its share of the secret metadata (see :func:`_versions_answer`)."""
    return {
        "bucket": v.bucket, "key": v.key, "object_id": v.object_id.hex(), "version": v.version,
        "x": v.x, "k": v.k, "n": v.n, "chunks": v.chunks, "share_bytes": v.share_bytes,
        "deleted": v.deleted, "committed_at": v.committed_at,
        "meta": {name: value for name, value in v.meta.items() if name != "secret"},
    }


async def _versions_answer(request: web.Request, caller: str, name: str, versions: list[Version],
                           inline: tuple[Version, list[Any]] | None = None, *,
                           more: bool | None = None) -> web.Response:
    """``{name: [version, ...]}``; with ``?secret=1`` also ``secrets``: this node's shares of their
    secret metadata (one hex string or null per version), sealed for the caller in one envelope.

    ``inline``: a version and its frame of chunk 0, sealed after the shares in the same envelope
    (``inline`` in the answer says which version and how many bytes).
    """
    doc: dict[str, Any] = {name: [version_json(v) for v in versions]}
    if more is not None:
        doc["more"] = more  # older versions than these exist here
    shares = [v.meta.get("secret") for v in versions]
    headers: dict[str, str] = {}
    if request.query.get("secret") == "1" and (inline is not None or any(s is not None for s in shares)):
        parts: list[Any] = [secret_meta.pack_shares(shares)]
        if inline is not None:
            v, frame = inline
            parts += frame
            doc["inline"] = {"object_id": v.object_id.hex(), "version": v.version,
                             "bytes": sum(len(p) for p in frame)}
        envelope, headers = await _seal_reply(request, caller, "otp", parts)
        doc["secrets"] = base64.b64encode(envelope).decode()
    return web.json_response(doc, headers=headers)


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except QStoreError as exc:
        observability.note_error(request, type(exc).__name__)
        return _json({"error": type(exc).__name__, "message": str(exc)}, exc.status)
    except web.HTTPRequestEntityTooLarge:
        observability.note_error(request, "TooLarge")
        return _json({"error": "TooLarge", "message": "request body too long"}, 413)
    except web.HTTPException:
        raise
    except Exception:
        observability.note_error(request, "InternalError")
        log.exception("node %s: internal error on %s %s", request.app[CONFIG].site, request.method,
                      request.path)
        return _json({"error": "InternalError", "message": "internal error"}, 500)


def _caller(request: web.Request) -> str:
    """The calling SAE; the keys it announced (ANNOUNCE_HEADER) start being fetched ahead."""
    caller = caller_of(request)
    if caller is None:
        raise Unauthorized("a client certificate naming an SAE is required")
    news = request.headers.get(ANNOUNCE_HEADER)
    if news:
        try:
            request.app[OPENING].announce(caller, parse_announcement(news))
        except LocalError as exc:
            raise RemoteError(str(exc)) from None
    return caller


async def _seal_reply(request: web.Request, caller: str, cipher: str,
                      parts: list[Any]) -> tuple[bytes | bytearray, dict[str, str]]:
    """``parts`` sealed for the caller, and the headers to send with it.

    A caller that names its process (EPOCH_HEADER: long-lived ones, such as
    the S3 gateway) gets key from a pool of its own, whose key IDs the
    headers announce so that it fetches them ahead. Without it, keys of one
    pool would reach several processes of one SAE, and one could not open
    what the other fetched.
    """
    epoch = request.headers.get(EPOCH_HEADER)
    if epoch is not None:
        try:
            check_epoch(epoch)
        except LocalError as exc:
            raise RemoteError(str(exc)) from None
    pool = caller if epoch is None else (caller, epoch)
    keys = request.app[CLIENT_KEYS]
    stream, spent = await keys.envelope(caller, otp.key_cost(cipher, sum(len(p) for p in parts)), pool=pool)
    try:
        envelope = otp.seal_with(cipher, parts, stream)
    finally:
        stream.wipe()
    _count(request, caller, "key_out", spent)
    _count(request, caller, "bytes_out", len(envelope))
    news = keys.news(pool) if epoch is not None else []
    return envelope, ({ANNOUNCE_HEADER: ",".join(news)} if news else {})


async def _body_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON:
        raise RemoteError("JSON body too long")
    parts, size = [], 0
    async for piece in request.content.iter_any():  # read() may stop short of the whole body
        size += len(piece)
        if size > MAX_JSON:
            raise RemoteError("JSON body too long")
        parts.append(piece)
    raw = b"".join(parts)
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        raise RemoteError("body is not JSON") from None
    if not isinstance(doc, dict):
        raise RemoteError("body must be a JSON object")
    return doc


def _q(request: web.Request, name: str, default: str | None = None) -> str:
    value = request.query.get(name, default)
    if value is None:
        raise RemoteError(f"query parameter {name!r} is required")
    return value


def _int(value: object, name: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 20:  # int() would take " 5", "5_0"
            raise RemoteError(f"{name} must be an integer")
        value = int(value)
    out = value
    if not isinstance(out, int) or isinstance(out, bool) or not low <= out <= high:
        raise RemoteError(f"{name} must be an integer in [{low}, {high}]")
    return out


def _object_id(value: object) -> bytes:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise RemoteError("object_id must be 32 lowercase hex digits")
    return bytes.fromhex(value)


def _count(request: web.Request, peer: str, what: str, nbytes: int) -> None:
    _count_app(request.app, peer, what, nbytes)


# -- handlers ------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    c = request.app[CONFIG]
    return _json({"status": "ok", "site": c.site, "sae_id": c.sae_id, "x": c.x})


async def _status(request: web.Request) -> web.Response:
    _caller(request)
    c = request.app[CONFIG]
    stats = await asyncio.to_thread(request.app[STORE].stats)
    return _json({"site": c.site, "sae_id": c.sae_id, "x": c.x, "store": stats, "peers": request.app[STATS]})


async def _buckets(request: web.Request) -> web.Response:
    _caller(request)
    return _json({"buckets": [{"name": b.name, "created": b.created} for b in request.app[STORE].buckets()]})


async def _create_bucket(request: web.Request) -> web.Response:
    _caller(request)
    return _json({"created": request.app[STORE].create_bucket(request.match_info["bucket"])})


async def _delete_bucket(request: web.Request) -> web.Response:
    _caller(request)
    request.app[STORE].delete_bucket(request.match_info["bucket"])
    return web.Response(status=204)


async def _begin(request: web.Request) -> web.Response:
    _caller(request)
    upload = _upload_of(await _body_json(request), request.app[CONFIG])
    await asyncio.to_thread(request.app[STORE].begin, upload)
    return _json({"upload_id": upload.upload_id})


async def _oneshot(request: web.Request) -> web.Response:
    """A whole small object in one request: begin, its only chunk (if any), prepare.

    The upload's parameters come as JSON in the ``X-QStore-Upload`` header,
    ``?chunks=`` is 0 or 1, the body is the sealed frame (empty for 0). Two
    round trips per node (this and commit) instead of four for small objects.
    """
    caller = _caller(request)
    try:
        doc = json.loads(request.headers.get("X-QStore-Upload", ""))
    except ValueError:
        raise RemoteError("X-QStore-Upload must be a JSON object") from None
    if not isinstance(doc, dict) or doc.get("upload_id") != request.match_info["upload_id"]:
        raise RemoteError("X-QStore-Upload must be a JSON object naming this upload")
    upload = _upload_of(doc, request.app[CONFIG])
    chunks = _int(request.query.get("chunks", "1"), "chunks", 0, 1)
    secret_bytes = _int(doc.get("secret_bytes", 0), "secret_bytes", 0, secret_meta.MAX_SHARE_BYTES)
    envelope = await request.read()
    store = request.app[STORE]
    frame = None
    if chunks or secret_bytes:
        plain = await _open(request, caller, envelope)
        if len(plain) < secret_bytes:
            raise FrameError("the envelope is shorter than its metadata share")
        cut = len(plain) - secret_bytes
        if chunks:
            frame = split_frame(memoryview(plain)[:cut])
        elif cut:
            raise RemoteError("no chunk announced, but the envelope holds one")
        if secret_bytes:
            request.app[PENDING].put(upload.upload_id, bytes(plain[cut:]))
    elif envelope:
        raise RemoteError("no chunk announced, but a body was sent")
    await asyncio.to_thread(_stage_whole, store, upload, frame, chunks)  # one thread hop, not three
    return _json({"prepared": True})


def _stage_whole(store: Store, upload: Upload, frame: tuple[Any, ...] | None, chunks: int) -> None:
    store.begin(upload)
    if frame is not None:
        store.write_chunk(upload.upload_id, *frame)
    store.prepare(upload.upload_id, chunks=chunks)


def _upload_of(doc: dict[str, Any], c: NodeConfig) -> Upload:
    """The upload a begin request describes, checked against this node."""
    x = _int(doc.get("x"), "x", 1, 255)
    if x != c.x:
        raise RemoteError(f"this node holds shares at x = {c.x}, not {x}")
    upload_id = doc.get("upload_id")
    if not isinstance(upload_id, str) or not _HEX32.fullmatch(upload_id):
        raise RemoteError("upload_id must be 32 lowercase hex digits")
    bucket, key = doc.get("bucket"), doc.get("key")
    if not isinstance(bucket, str) or not isinstance(key, str):
        raise RemoteError("bucket and key must be strings")
    return Upload(upload_id=upload_id, bucket=bucket, key=key,
                  object_id=_object_id(doc.get("object_id")), version=_int(doc.get("version"), "version"),
                  x=x, k=_int(doc.get("k"), "k", 2, 255), n=_int(doc.get("n"), "n", 2, 255))


async def _open(request: web.Request, caller: str, envelope: bytes) -> bytes:
    """The frame inside a sealed envelope from ``caller`` (fetching its keys with dec_keys)."""
    refs = otp.parse_envelope_refs(envelope, max_length=otp.MAX_LENGTH)
    try:
        stream = await request.app[OPENING].stream(caller, refs)
    except KMEError as exc:
        if exc.kme_status in (400, 401):
            raise SealError() from None  # a replayed or invented key_ID: the KME has none for us
        raise
    spent = sum(r.length for r in refs)
    try:
        frame = otp.open_(envelope, stream)
    finally:
        stream.wipe()
    _count(request, caller, "key_in", spent)
    _count(request, caller, "bytes_in", len(envelope))
    return frame


async def _put_chunk(request: web.Request) -> web.Response:
    caller = _caller(request)
    if request.content_length is not None and request.content_length > MAX_ENVELOPE:
        raise RemoteError("envelope too long")
    envelope = await request.read()
    header, body = split_frame(await _open(request, caller, envelope))  # the store checks the digest
    await asyncio.to_thread(request.app[STORE].write_chunk, request.match_info["upload_id"], header, body)
    return _json({"index": header.chunk_index})


async def _prepare(request: web.Request) -> web.Response:
    _caller(request)
    doc = await _body_json(request)
    chunks = _int(doc.get("chunks"), "chunks", 0, 2**32 - 1)
    await asyncio.to_thread(request.app[STORE].prepare, request.match_info["upload_id"], chunks=chunks)
    return _json({"prepared": True})


async def _commit(request: web.Request) -> web.Response:
    """Make a prepared upload visible, with its share of the secret metadata.

    The share comes sealed: as ``secret`` (base64 envelope) in the body, or
    earlier in the oneshot envelope. A share in the clear is refused: it
    would cross the link under TLS alone.
    """
    caller = _caller(request)
    upload_id = request.match_info["upload_id"]
    doc = await _body_json(request)
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise RemoteError("meta must be a JSON object")
    if "secret" in meta:
        raise RemoteError("a share of secret metadata must come sealed, not in meta")
    store, pending = request.app[STORE], request.app[PENDING]
    sealed = doc.get("secret")
    if sealed is not None:
        if not isinstance(sealed, str) or len(sealed) > 2 * secret_meta.MAX_SHARE_BYTES:
            raise RemoteError("secret must be a base64 envelope")
        try:
            envelope = base64.b64decode(sealed, validate=True)
        except ValueError:
            raise RemoteError("secret must be a base64 envelope") from None
        share: bytes | None = await _open(request, caller, envelope)
    else:
        share = pending.get(upload_id)
    if share is None:
        done = await asyncio.to_thread(store.committed, upload_id)
        if done is None:
            raise RemoteError("no share of the object's secret metadata came with this upload "
                              "(the node may have restarted since): put the object again")
        return _json(version_json(done))
    if not share or len(share) > secret_meta.MAX_SHARE_BYTES:
        raise RemoteError(f"a metadata share must be 1 to {secret_meta.MAX_SHARE_BYTES} bytes")
    v = await asyncio.to_thread(store.commit, upload_id, {**meta, "secret": bytes(share).hex()})
    pending.drop(upload_id)
    return _json(version_json(v))


async def _abort(request: web.Request) -> web.Response:
    _caller(request)
    request.app[PENDING].drop(request.match_info["upload_id"])
    await asyncio.to_thread(request.app[STORE].abort, request.match_info["upload_id"])
    return web.Response(status=204)


async def _tombstone(request: web.Request) -> web.Response:
    _caller(request)
    doc = await _body_json(request)
    bucket, key, meta = doc.get("bucket"), doc.get("key"), doc.get("meta", {})
    if not isinstance(bucket, str) or not isinstance(key, str) or not isinstance(meta, dict):
        raise RemoteError("bucket and key must be strings, meta an object")
    v = request.app[STORE].tombstone(bucket, key, _object_id(doc.get("object_id")),
                                     _int(doc.get("version"), "version"), meta)
    return _json(version_json(v))


async def _versions(request: web.Request) -> web.Response:
    """A key's versions here; ``?secret=1&inline=N``: with the newest one's share when it is one chunk
    of at most N bytes, so that a small object's get takes one trip (versions, shares and all)."""
    caller = _caller(request)
    store = request.app[STORE]
    limit = request.query.get("limit")
    most_versions = None if limit is None else _int(limit, "limit", 1, 10000)
    versions = store.versions(_q(request, "bucket"), _q(request, "key"),
                              None if most_versions is None else most_versions + 1)
    more = most_versions is not None and len(versions) > most_versions
    versions = versions[:most_versions]
    inline = None
    most = request.query.get("inline")
    if most is not None and request.query.get("secret") == "1":
        newest = versions[0] if versions else None
        if (newest is not None and not newest.deleted and newest.chunks == 1
                and newest.share_bytes <= _int(most, "inline", 0, MAX_INLINE)):
            # a rotten or missing share is not sent along: the client asks for it alone, and hears why
            with contextlib.suppress(QStoreError):
                header, body = await asyncio.to_thread(store.read_chunk, newest, 0)
                inline = (newest, [header.to_bytes(), body])
    return await _versions_answer(request, caller, "versions", versions, inline, more=more)


def _limit(request: web.Request) -> int:
    return _int(request.query.get("limit", "1000"), "limit", 1, 10000)


async def _objects(request: web.Request) -> web.Response:
    caller = _caller(request)
    found = request.app[STORE].list(_q(request, "bucket"), prefix=request.query.get("prefix", ""),
                                    start_after=request.query.get("start_after", ""), limit=_limit(request))
    return await _versions_answer(request, caller, "objects", found)


async def _object_versions(request: web.Request) -> web.Response:
    caller = _caller(request)
    found = request.app[STORE].list_versions(_q(request, "bucket"), prefix=request.query.get("prefix", ""),
                                             key_marker=request.query.get("key_marker", ""),
                                             limit=_limit(request))
    return await _versions_answer(request, caller, "versions", found)


async def _get_chunk(request: web.Request) -> web.Response:
    caller = _caller(request)
    store = request.app[STORE]
    cipher = request.query.get("cipher", "otp")
    if cipher not in otp.CIPHERS:
        raise RemoteError(f"cipher must be one of {', '.join(otp.CIPHERS)}")
    v = store.version(_q(request, "bucket"), _q(request, "key"), _object_id(_q(request, "object_id")),
                      _int(_q(request, "version"), "version"))
    index = _int(_q(request, "index"), "index", 0, 2**32 - 1)
    header, body = await asyncio.to_thread(store.read_chunk, v, index)
    envelope, headers = await _seal_reply(request, caller, cipher, [header.to_bytes(), body])
    return web.Response(body=envelope, content_type="application/octet-stream", headers=headers)


async def _admin_gc(request: web.Request) -> web.Response:
    _caller(request)
    doc = await _body_json(request)
    c = request.app[CONFIG]
    ttl = doc.get("staging_ttl_s", c.staging_ttl_s)
    if not isinstance(ttl, int | float) or ttl < 1:
        raise RemoteError("staging_ttl_s must be a number >= 1")
    report = await asyncio.to_thread(request.app[STORE].gc, staging_ttl_s=float(ttl),
                                     superseded_ttl_s=c.superseded_ttl_s)
    return _json(_plain(report))


async def _admin_scrub(request: web.Request) -> web.Response:
    _caller(request)
    report = await asyncio.to_thread(request.app[STORE].scrub)
    return _json(_plain(report))


# -- tables --------------------------------------------------------------------------


async def _tables(request: web.Request) -> web.Response:
    _caller(request)
    infos = await asyncio.to_thread(request.app[TABLES].list)
    return _json({"tables": [i.to_json() for i in infos]})


async def _table(request: web.Request) -> web.Response:
    _caller(request)
    info = await asyncio.to_thread(request.app[TABLES].get, request.match_info["name"])
    return _json(info.to_json())


async def _table_begin(request: web.Request) -> web.Response:
    caller = _caller(request)
    doc = await _body_json(request)
    from qstore.tables import Schema

    columns = doc.get("columns")
    upload = TableUpload(upload_id=doc.get("upload_id"), name=doc.get("name"), owner=caller,  # type: ignore[arg-type]
                         schema=doc.get("schema"), rows=doc.get("rows"),  # type: ignore[arg-type]
                         columns=tuple(columns) if isinstance(columns, list) else None)  # type: ignore[arg-type]
    schema = Schema.from_json(upload.schema)  # a schema the statistics layer understands, or 400
    if list(upload.columns) != list(schema.stored_columns()):
        raise RemoteError("columns must be the schema's stored columns, in order")
    await asyncio.to_thread(request.app[TABLES].begin, upload)
    return _json({"upload_id": upload.upload_id})


async def _table_part(request: web.Request) -> web.Response:
    caller = _caller(request)
    column = _int(request.match_info["column"], "column", 0, 4095)
    row = _int(_q(request, "row"), "row", 0, 10**7)
    if request.content_length is not None and request.content_length > MAX_ENVELOPE:
        raise RemoteError("envelope too long")
    shares = await _open(request, caller, await request.read())
    await asyncio.to_thread(request.app[TABLES].write, request.match_info["upload_id"], caller, column, row,
                            shares)
    return _json({"column": column, "rows": len(shares) // 16})


async def _table_commit(request: web.Request) -> web.Response:
    caller = _caller(request)
    info = await asyncio.to_thread(request.app[TABLES].commit, request.match_info["upload_id"], caller)
    log.info("table %s committed by %s: %d rows", info.name, caller, info.rows)
    return _json(info.to_json())


async def _table_abort(request: web.Request) -> web.Response:
    caller = _caller(request)
    await asyncio.to_thread(request.app[TABLES].abort, request.match_info["upload_id"], caller)
    return web.Response(status=204)


async def _table_drop(request: web.Request) -> web.Response:
    caller = _caller(request)
    await asyncio.to_thread(request.app[TABLES].drop, request.match_info["name"], caller)
    return web.Response(status=204)


async def _table_grant(request: web.Request) -> web.Response:
    caller = _caller(request)
    doc = await _body_json(request)
    revoke = doc.get("revoke", False)
    if not isinstance(revoke, bool):
        raise RemoteError("revoke must be true or false")
    info = await asyncio.to_thread(request.app[TABLES].grant, request.match_info["name"], caller,
                                   check_sae(doc.get("analyst")), revoke=revoke)
    return _json(info.to_json())


# -- MPC -----------------------------------------------------------------------------


def _peer_x(request: web.Request, caller: str) -> int:
    for p in request.app[CONFIG].peers:
        if p.sae_id == caller:
            return p.x
    raise Forbidden("only the cluster's storage nodes take part in MPC")


def _query_id(value: object) -> str:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise RemoteError("query_id must be 32 lowercase hex digits")
    return value


async def _mpc_message(request: web.Request) -> web.Response:
    """A sealed message of a peer node for one round of a query."""
    caller = _caller(request)
    x = _peer_x(request, caller)
    query_id = _query_id(_q(request, "query"))
    round_ = _int(_q(request, "round"), "round", 0, 10**6)
    parts = _int(_q(request, "parts"), "parts", 1, 1024)
    part = _int(_q(request, "part"), "part", 0, parts - 1)
    if request.content_length is not None and request.content_length > MAX_ENVELOPE:
        raise RemoteError("envelope too long")
    payload = await _open(request, caller, await request.read())
    request.app[MAILBOX].put(query_id, round_, x, part, parts, payload)
    return web.Response(status=204)


async def _mpc_abort(request: web.Request) -> web.Response:
    caller = _caller(request)
    _peer_x(request, caller)
    doc = await _body_json(request)
    reason = doc.get("reason", "")
    why = reason[:300] if isinstance(reason, str) else ""
    request.app[MAILBOX].fail(_query_id(_q(request, "query")), f"node {caller} stopped: {why}")
    return web.Response(status=204)


async def _mpc_audit(request: web.Request) -> web.Response:
    """The audit log entries the caller may see: its own queries and those on tables it owns."""
    caller = _caller(request)
    limit = _limit(request)
    tables = request.app[TABLES]
    owned = {i.name for i in await asyncio.to_thread(tables.list) if i.owner == caller}
    entries = await asyncio.to_thread(tables.audit_log, limit)
    return _json({"entries": [e for e in entries if e["analyst"] == caller or owned & set(e["tables"])]})


async def _send_to_peer(app: web.Application, peer: Peer, query_id: str, round_: int, payload: bytes) -> int:
    """Seal ``payload`` for ``peer`` (in parts if long) and post it; QKD key bytes spent."""
    step = runtime.PART_BYTES
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    # parts travel concurrently: one part's key fetches overlap another's transfer
    return sum(await asyncio.gather(*(_send_part(app, peer, query_id, round_, i, len(pieces), piece)
                                      for i, piece in enumerate(pieces))))


async def _send_part(app: web.Application, peer: Peer, query_id: str, round_: int, i: int, parts: int,
                     piece: bytes) -> int:
    """Seal one part with fresh key for ``peer`` and post it; the key bytes spent.

    Small messages take keys fetched before the round, off its critical path,
    and the keys fetched since the last message are announced so that the
    peer fetches them in one request. A peer that restarted has lost what it
    fetched on announcements and answers SealError: the message goes once
    more under fresh key.
    """
    keys = app[PEER_KEYS]
    params = {"query": query_id, "round": str(round_), "part": str(i), "parts": str(parts)}
    spent, retried = 0, False
    while True:
        stream, need = await keys.envelope(peer.sae_id, otp.key_cost("otp", len(piece)))
        try:
            envelope = otp.seal_parts(piece, stream)
        finally:
            stream.wipe()
        spent += need
        news = keys.news(peer.sae_id)
        headers = {ANNOUNCE_HEADER: ",".join(news)} if news else {}
        try:
            async with app[PEER_SESSION].post(peer.url + "/v1/mpc/messages", params=params,
                                              data=bytes(envelope), headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError) as exc:
            raise QueryFailed(f"node {peer.site} unreachable ({type(exc).__name__})") from None
        _count_app(app, peer.sae_id, "key_out", need)
        _count_app(app, peer.sae_id, "bytes_out", len(envelope))
        if status < 300:
            return spent
        try:
            error = json.loads(body)
            name, message = str(error.get("error", "")), str(error.get("message", ""))
        except (ValueError, AttributeError):
            name, message = "", f"HTTP {status}"
        if name != "SealError" or retried:
            raise QueryFailed(f"node {peer.site} refused a message: {message}")
        keys.reset(peer.sae_id)
        retried = True


def _count_app(app: web.Application, peer: str, what: str, nbytes: int) -> None:
    per_peer = app[STATS].setdefault(peer, {"key_in": 0, "key_out": 0, "bytes_in": 0, "bytes_out": 0})
    per_peer[what] += nbytes


async def _abort_peers(app: web.Application, peers: list[Peer], query_id: str, reason: str) -> None:
    async def one(peer: Peer) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                async with app[PEER_SESSION].post(peer.url + "/v1/mpc/abort", params={"query": query_id},
                                                  json={"reason": reason}) as resp:
                    await resp.read()

    await asyncio.gather(*(one(p) for p in peers))


def _union(infos: list[TableInfo]) -> tuple[Any, int]:
    """The schema a query over the union of ``infos`` runs with, and the total row count."""
    from qstore.tables import Schema, union_schema

    schemas = [Schema.from_json(i.schema) for i in infos]
    for info, other in zip(infos[1:], schemas[1:], strict=True):
        if not schemas[0].same_shape(other):  # checked here too, to name the tables
            raise RemoteError(f"table {info.name!r} does not have the schema of {infos[0].name!r}")
    return union_schema(schemas), sum(i.rows for i in infos)


async def _mpc_query(request: web.Request) -> web.Response:
    """Run one statistics query with the other parties; answer with result shares sealed for the caller."""
    import numpy as np

    from qstore.mpc import engine, join, stats
    from qstore.query import Query
    from qstore.rng import AesCtrRandom
    from qstore.tables import join_schema

    caller = _caller(request)
    c = request.app[CONFIG]
    doc = await _body_json(request)
    query_id = _query_id(doc.get("query_id"))
    query = Query.from_json(doc.get("query"))
    parties = doc.get("parties")
    if not isinstance(parties, list) or not all(type(p) is int for p in parties):
        raise RemoteError("parties must be a list of node x coordinates")
    by_x = {p.x: p for p in c.peers}
    if c.x not in parties or len(set(parties)) != len(parties) or not set(parties) <= set(by_x) | {c.x}:
        raise RemoteError("parties must name distinct storage nodes of this cluster, this one included")
    if len(parties) < 2 * c.t + 1:
        raise RemoteError(f"MPC needs at least {2 * c.t + 1} nodes (2t+1, t = {c.t}), {len(parties)} named")
    peers = sorted(x for x in parties if x != c.x)
    tables = request.app[TABLES]
    try:  # a node that refuses tells the others at once, or they would wait a round timeout for it
        names = list(query.tables) + ([query.join.table] if query.join is not None else [])
        infos = [await asyncio.to_thread(tables.get, check_table_name(n)) for n in names]
        for info in infos:
            if not info.may_query(caller):
                raise Forbidden(f"{caller} has no grant to query table {info.name!r}")
        main = infos[: len(query.tables)]
        schema, rows = _union(main)
        other: tuple[Any, dict[str, Any], int] | None = None
        if query.join is None:
            needed = stats.columns_needed(query, schema)
        else:  # the join's columns come from either side, plus the id column of both
            other_schema, other_rows = _union(infos[len(query.tables):])
            joined = join_schema(schema, other_schema, query.join.on)
            wanted = set(stats.columns_needed(join.without_join(query), joined)) | {query.join.on}
            needed = [c for c in schema.stored_columns() if c in wanted]
            other_needed = [c for c in other_schema.stored_columns() if c in wanted]
            other = (other_schema, await asyncio.to_thread(tables.load, infos[-1], other_needed), other_rows)
        loaded = [await asyncio.to_thread(tables.load, info, needed) for info in main]
        data = {col: np.concatenate([part[col] for part in loaded]) for col in needed}
    except QStoreError as exc:
        await _abort_peers(request.app, [by_x[x] for x in peers], query_id, str(exc))
        raise
    ctx = engine.Context(me=c.x, parties=tuple(sorted(parties)), t=c.t, rng=AesCtrRandom())
    revealed = stats.revealed(query)
    entry = await asyncio.to_thread(tables.audit_start, query_id, caller, names, query.to_json(), revealed)
    mailbox = request.app[MAILBOX]
    run = runtime.RunStats()
    status = "failed"
    try:
        if other is None:
            protocol = stats.program(ctx, query, schema, data, rows)
        else:
            protocol = join.joined_program(ctx, query, schema, data, rows, *other)
        outputs = await runtime.drive(
            protocol, query_id=query_id, me=c.x, peers=peers,
            send=lambda x, r, payload: _send_to_peer(request.app, by_x[x], query_id, r, payload),
            mailbox=mailbox, names={p.x: p.site for p in c.peers},
            round_timeout_s=c.mpc_round_timeout_s, max_elements=64 * max(rows, 1) * 256 + 2**20, stats=run)
        names_out = sorted(outputs)
        payload = engine.encode_payload([outputs[n] for n in names_out])
        need = otp.key_cost("otp", len(payload))
        stream = await envelope_keys(request.app[SAE], caller, need)
        try:
            envelope = otp.seal_parts(payload, stream)
        finally:
            stream.wipe()
        _count(request, caller, "key_out", need)
        run.key_spent += need
        status = "ok"
    except QStoreError as exc:  # QueryFailed included: a peer down, late or garbled
        status = f"failed: {exc}"
        await _abort_peers(request.app, [by_x[x] for x in peers], query_id, str(exc))
        raise
    finally:
        mailbox.close(query_id)
        request.app[METRICS].query_done(ok=status == "ok", key_spent=run.key_spent, rounds=run.rounds,
                                        bytes_sent=run.bytes_sent, seconds=run.seconds)
        await asyncio.to_thread(tables.audit_end, entry, status, run.key_spent)
    log.info("query %s by %s on %s: %s, %d rounds, %d bytes sent, %d key bytes, %.3f s (compute %.3f, "
             "send %.3f, wait %.3f)", query_id, caller, ",".join(names), status, run.rounds, run.bytes_sent,
             run.key_spent, run.seconds, run.compute_s, run.send_s, run.wait_s)
    info = {"outputs": names_out, "rounds": run.rounds, "key_spent": run.key_spent, "seconds": run.seconds,
            "bytes_sent": run.bytes_sent}
    return web.Response(body=bytes(envelope), content_type="application/octet-stream",
                        headers={"X-QStore-Result": json.dumps(info)})


def _plain(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(o) for o in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


# -- resources -----------------------------------------------------------------------


async def _resources(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG]
    blobs = await asyncio.to_thread(
        open_blobs, c.blob_store, c.data_dir, fsync=c.fsync,
        **({} if c.blob_store != "s3" else {
            "bucket": c.s3_bucket, "endpoint_url": c.s3_endpoint, "region": c.s3_region,
            "prefix": f"{c.sae_id}/" if c.s3_prefix is None else c.s3_prefix,
            "access_key": c.s3_access_key, "secret_key": c.s3_secret_key}))
    schema = c.catalog_schema or catalog_schema_for(c.sae_id)
    app[STORE] = await asyncio.to_thread(Store, c.data_dir, clock=c.clock, fsync=c.fsync, blobs=blobs,
                                         catalog_url=c.catalog_url, catalog_schema=schema)
    app[TABLES] = await asyncio.to_thread(TableStore, c.data_dir, clock=c.clock, fsync=c.fsync)
    await asyncio.to_thread(_warm_up)
    app[MAILBOX] = Mailbox()
    peer_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=c.mpc_round_timeout_s)
    app[PEER_SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=pki.client_ssl_context(c.cert, c.key, c.ca), limit=0),
        timeout=peer_timeout, trace_configs=[observability.propagate_request_ids()])
    sae = SAEClient(SAEConfig(sae_id=c.sae_id, kme_url=c.kme_url, cert=c.cert, key=c.key, ca=c.ca,
                              key_size=8 * 2**20, batch=8, wait_s=c.key_wait_s))
    app[SAE] = await sae.__aenter__()
    app[PEER_KEYS] = AheadKeys(app[SAE])
    # a small object's share (up to 16 KiB) in whole 1 KiB keys; larger ones fetch key cut to size
    # one pool per client process that names itself (at most 256 of them: 16 MiB of key held at most)
    app[CLIENT_KEYS] = AheadKeys(app[SAE], unit=1024, depth=64, most=16, max_pools=256)
    app[OPENING] = OpeningKeys(app[SAE])
    tasks = [asyncio.create_task(_every(c.gc_interval_s, lambda: app[STORE].gc(
                 staging_ttl_s=c.staging_ttl_s, superseded_ttl_s=c.superseded_ttl_s), "gc")),
             asyncio.create_task(_every(c.scrub_interval_s,
                                        lambda: app[STORE].scrub(max_bytes=c.scrub_bytes), "scrub"))]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await app[PEER_KEYS].close()
        await app[CLIENT_KEYS].close()
        await app[OPENING].close()
        await sae.close()
        await app[PEER_SESSION].close()
        app[STORE].close()
        app[TABLES].close()


def _warm_up() -> None:
    """Compile the field kernels now, not inside the first query's first round (about a second)."""
    from qstore import field

    one = field.from_int(1, (1,))
    field.power(field.mul(one, one), 3)


async def _every(interval_s: float, job: Callable[[], object], name: str) -> None:
    """Run ``job`` in a worker thread every ``interval_s``; a failure is logged, never fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            result = await asyncio.to_thread(job)
            log.info("%s: %s", name, result)
        except Exception:
            log.exception("%s failed", name)


def _peer_values(app: web.Application) -> telemetry.Values:
    """Key and envelope bytes per peer SAE (:data:`qstore.telemetry.NODE_FAMILIES`), from app[STATS]."""
    key, link = [], []
    for peer, figures in sorted(app[STATS].items()):
        for direction in ("in", "out"):
            key.append(((peer, direction), figures[f"key_{direction}"]))
            link.append(((peer, direction), figures[f"bytes_{direction}"]))
    return {telemetry.NODE_KEY.name: key, telemetry.NODE_LINK.name: link}


async def _store_figures(app: web.Application) -> None:
    """Before a scrape: the store's figures (a few SQL counts, in a worker thread)."""
    if STORE in app:
        app[METRICS].set_store(await asyncio.to_thread(app[STORE].stats))


def create_app(config: NodeConfig) -> web.Application:
    """The node's aiohttp application (TLS is the server's: see :func:`start` and :func:`serve`)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_ENVELOPE)
    app[CONFIG] = config
    app[STATS] = {}
    app[PENDING] = PendingSecrets(config.staging_ttl_s)
    app[METRICS] = telemetry.NodeMetrics(config.sae_id, lambda: _peer_values(app))
    observability.install(app, app[METRICS], before_scrape=_store_figures)
    app.cleanup_ctx.append(_resources)
    r = app.router
    r.add_get("/v1/health", _health)
    r.add_get("/v1/status", _status)
    r.add_get("/v1/buckets", _buckets)
    r.add_put("/v1/buckets/{bucket}", _create_bucket)
    r.add_delete("/v1/buckets/{bucket}", _delete_bucket)
    r.add_post("/v1/uploads", _begin)
    r.add_put("/v1/uploads/{upload_id}/chunks", _put_chunk)
    r.add_put("/v1/uploads/{upload_id}/oneshot", _oneshot)
    r.add_post("/v1/uploads/{upload_id}/prepare", _prepare)
    r.add_post("/v1/uploads/{upload_id}/commit", _commit)
    r.add_delete("/v1/uploads/{upload_id}", _abort)
    r.add_post("/v1/tombstones", _tombstone)
    r.add_get("/v1/versions", _versions)
    r.add_get("/v1/objects", _objects)
    r.add_get("/v1/object-versions", _object_versions)
    r.add_get("/v1/chunk", _get_chunk)
    r.add_post("/v1/admin/gc", _admin_gc)
    r.add_post("/v1/admin/scrub", _admin_scrub)
    r.add_get("/v1/tables", _tables)
    r.add_post("/v1/tables/uploads", _table_begin)
    r.add_put("/v1/tables/uploads/{upload_id}/columns/{column}", _table_part)
    r.add_post("/v1/tables/uploads/{upload_id}/commit", _table_commit)
    r.add_delete("/v1/tables/uploads/{upload_id}", _table_abort)
    r.add_get("/v1/tables/{name}", _table)
    r.add_delete("/v1/tables/{name}", _table_drop)
    r.add_post("/v1/tables/{name}/grants", _table_grant)
    r.add_post("/v1/mpc/queries", _mpc_query)
    r.add_post("/v1/mpc/messages", _mpc_message)
    r.add_post("/v1/mpc/abort", _mpc_abort)
    r.add_get("/v1/mpc/audit", _mpc_audit)
    return app


@dataclass
class RunningNode:
    config: NodeConfig
    runner: web.AppRunner
    url: str

    @property
    def store(self) -> Store:
        return self.runner.app[STORE]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start(config: NodeConfig) -> RunningNode:
    """Start a node on ``config.host:config.port`` (0: a free port) in the running loop."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        ctx = pki.server_ssl_context(config.cert, config.key, config.ca)
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ctx)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return RunningNode(config, runner, f"https://{host}:{port}")


def serve(config: NodeConfig) -> None:
    """Run one node until SIGTERM/SIGINT (blocking; for a standalone process); logs: JSON lines on stderr."""
    telemetry.configure_json_logging(static={"service": "node", "instance": config.sae_id})
    web.run_app(
        create_app(config), host=config.host, port=config.port,
        ssl_context=pki.server_ssl_context(config.cert, config.key, config.ca), access_log=None,
        print=lambda msg: log.info("node %s: %s", config.site, msg),
    )


__all__ = ["NodeConfig", "create_app", "node_sae_id", "serve", "start", "version_json"]
