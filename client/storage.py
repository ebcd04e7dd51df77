"""The client library: store and fetch objects across the cluster's nodes.

This is the recipe layer over the primitives of :mod:`qstore` (sharing,
framing, one-time pad): a caller names a bucket and a key and gets
information-theoretic confidentiality, integrity checks and quorum writes
without handling shares, x coordinates or key streams.

Put: the object is read in chunks (default 4 MiB); each chunk is split k-of-n
with fresh randomness, node i always receiving the share at x = i, framed
(with a SHA-256 of the share for the node's bit-rot checks), sealed for that
node with QKD key (one-time pad + one-time MAC, or the named hybrid
``aes-256-gcm``) and sent, all nodes in parallel, through bounded queues so
that reading, splitting, sealing and sending overlap while memory stays
bounded. Then two-phase commit: every node that holds every chunk prepares
(fsync); if at least W did, they commit, else every node aborts and the
previous version stays what readers see.

Metadata: object names, sizes and chunk counts are visible to the nodes.
Everything else about the content (its SHA-256, user metadata) is itself
secret-shared: node i's copy of the metadata carries only share i of it.

Get: ask every node for the key's versions, pick the newest one committed on
at least k nodes (with the same public metadata), fetch each chunk's shares
from the fastest nodes (k plus one to verify, when there is one more),
decode robustly (a wrong share is detected with k+1 and corrected with k+2),
ask further nodes when one is down, slow or wrong, check the whole object's
SHA-256, and report which nodes misbehaved.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import inspect
import json
import os
import ssl
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO

import aiohttp
import numpy as np

from qkd_sim import observability, pki
from qkd_sim.envelope_keys import (
    ANNOUNCE_HEADER,
    EPOCH_HEADER,
    AheadKeys,
    OpeningKeys,
    envelope_keys,
    opening_keys,
    parse_announcement,
)
from qkd_sim.sae import SAEClient, SAEConfig
from qstore import otp, secret_meta
from qstore.cluster import CLIENT_SAE, ClusterState, NodeInfo
from qstore.decoding import decode
from qstore.errors import (
    BucketNotEmpty,
    FrameError,
    LocalError,
    NoSuchBucket,
    NoSuchKey,
    QStoreError,
    RemoteError,
    SealError,
    ShareCorruption,
)
from qstore.framing import HEADER_SIZE, encode_header, split_frame
from qstore.linmap import empty_rows
from qstore.sharing import Share, interpolate, split_into

DEFAULT_CHUNK = 4 << 20
VERSIONS_FIRST = 4  # versions asked of each node first: the newest readable one is almost always there
INLINE_SHARE = 12 << 10  # a node sends a share this small with the version it answers (one trip for a get)
MAX_CHUNK = 32 << 20
QUEUE_DEPTH = 2
READ_WINDOW = 3
# Chunks being fetched at once over all gets of one QStore: a gateway serving many ranged GETs keeps
# the nodes' and its own memory (and page faults) to a few chunks, as one get would.
FETCH_SLOTS = 2 * READ_WINDOW
KEY_SIZE_BITS = 8 * 2**20  # 1 MiB keys: few key_IDs per frame, few KME round trips
MAX_META_BYTES = 16 << 10

Progress = Callable[[int], None]


class NodeError(RemoteError):
    """A node refused or failed a request; ``site`` names it."""

    status = 502

    def __init__(self, site: str, message: str, *, status: int | None = None, name: str = ""):
        self.site, self.node_status, self.name = site, status, name
        super().__init__(f"node {site}: {message}")


class Refused(RemoteError):
    """Every node refused the request for the same reason (a bad name, a missing bucket...)."""

    def __init__(self, message: str, *, status: int, name: str):
        self.status, self.name = status, name
        super().__init__(message)


class QuorumError(RemoteError):
    """Too few nodes took part for the operation to be safe; nothing was made visible."""

    status = 503


@dataclass
class LinkUse:
    """What one client↔node link carried during an operation."""

    bytes_sent: int = 0
    bytes_received: int = 0
    key_bytes: int = 0  # QKD key spent on this link (pad + MAC keys)


@dataclass
class Report:
    """The outcome of one operation, for people (``str``) and programs (:meth:`to_json`)."""

    op: str
    bucket: str
    key: str
    size: int = 0
    seconds: float = 0.0
    version: int | None = None
    object_id: str | None = None
    link_cipher: str = "otp"
    nodes: list[str] = field(default_factory=list)  # nodes that hold (put) or served (get) it
    failed: dict[str, str] = field(default_factory=dict)  # node -> why it was left out
    bad: dict[str, str] = field(default_factory=dict)  # node -> what was wrong with what it sent
    links: dict[str, LinkUse] = field(default_factory=dict)
    verified: bool = True
    slow: set[str] = field(default_factory=set)  # nodes that answered too slowly and were raced

    def link(self, site: str) -> LinkUse:
        return self.links.setdefault(site, LinkUse())

    @property
    def key_bytes(self) -> int:
        return sum(u.key_bytes for u in self.links.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op, "bucket": self.bucket, "key": self.key, "size": self.size,
            "seconds": round(self.seconds, 6), "version": self.version, "object_id": self.object_id,
            "link_cipher": self.link_cipher, "nodes": self.nodes, "failed": self.failed, "bad": self.bad,
            "verified": self.verified, "key_bytes": self.key_bytes, "slow": sorted(self.slow),
            "links": {site: vars(use) for site, use in sorted(self.links.items())},
        }


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    version: int
    object_id: str
    chunks: int
    chunk_size: int
    link_cipher: str
    committed_at: float
    holders: tuple[str, ...]  # sites holding this version
    user_meta: Mapping[str, str] = field(default_factory=dict)
    # what head learnt from the nodes, so that a get of this version right after asks them no more
    found: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "size": self.size, "version": self.version,
                "object_id": self.object_id, "chunks": self.chunks, "chunk_size": self.chunk_size,
                "link_cipher": self.link_cipher, "committed_at": self.committed_at,
                "holders": list(self.holders), "meta": dict(self.user_meta)}


def _public(meta: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "secret"}, sort_keys=True)


@dataclass
class _Candidate:
    version: int
    object_id: str
    holders: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> version json
    inline: dict[str, bytes] = field(default_factory=dict)  # site -> its frame of chunk 0, sent along


class _Node:
    """HTTP to one node, with its errors turned into NodeError.

    With key fetched ahead (``ahead``, ``opening``), every request names this
    client process (EPOCH_HEADER) and announces the keys fetched ahead for
    the node since the last one; keys the node announces in its answers start
    being fetched here (:class:`qkd_sim.envelope_keys.OpeningKeys`).
    """

    def __init__(self, info: NodeInfo, session: aiohttp.ClientSession, *, ahead: AheadKeys | None = None,
                 opening: OpeningKeys | None = None, epoch: str | None = None):
        self.info = info
        self.session = session
        self.site = info.site
        self.ahead, self.opening, self.epoch = ahead, opening, epoch

    async def call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                   body: object = None, data: bytes | None = None, raw: bool = False,
                   headers: Mapping[str, str] | None = None,
                   reply_headers: dict[str, str] | None = None) -> Any:
        """The JSON answer (``raw``: the bytes); ``reply_headers`` (if given) gets the answer's headers."""
        headers = dict(headers or {})
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if self.epoch is not None:
            headers[EPOCH_HEADER] = self.epoch
        news = self.ahead.news(self.info.id) if self.ahead is not None else []
        if news:
            headers[ANNOUNCE_HEADER] = ",".join(news)
        try:
            async with self.session.request(method, self.info.url + path, params=params, data=data,
                                            headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
                if reply_headers is not None:
                    reply_headers.update(resp.headers)
                announced = resp.headers.get(ANNOUNCE_HEADER)
        except (aiohttp.ClientError, OSError) as exc:
            raise NodeError(self.site, f"unreachable ({type(exc).__name__})") from None
        if announced and self.opening is not None:
            try:
                self.opening.announce(self.info.id, parse_announcement(announced))
            except LocalError:
                raise NodeError(self.site, "announced malformed key IDs") from None
        if status >= 300:
            try:
                err = json.loads(payload)
                name, message = str(err.get("error", "")), str(err.get("message", ""))
            except (ValueError, AttributeError):
                name, message = "", f"HTTP {status}"
            raise NodeError(self.site, message or f"HTTP {status}", status=status, name=name)
        if raw:
            return payload
        if status == 204 or not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise NodeError(self.site, "answered with malformed JSON") from None


class QStore:
    """A client of one cluster (use as ``async with``).

    ``write_quorum``: nodes that must hold every chunk before a put commits
    (default n; at least k+1 unless n = k). ``link_cipher``: ``"otp"``
    (default, information-theoretic) or ``"aes-256-gcm"`` (computationally
    secure, keyed per frame from QKD key; for links whose key rate cannot
    carry the data). ``verify``: read one share more than needed, when a node
    has it, to detect a wrong share. ``hedge_s``: a node that has not sent a
    share within this many seconds is raced by the next one.
    ``key_ahead``: fetch key for small objects' shares ahead, per node, so
    that a small put needs no KME round trip of its own (for long-lived
    processes such as the S3 gateway: a short one would leave keys unused).
    """

    def __init__(self, state: ClusterState, *, sae_id: str = CLIENT_SAE, chunk_size: int = DEFAULT_CHUNK,
                 write_quorum: int | None = None, link_cipher: str = "otp", verify: bool = True,
                 key_wait_s: float = 30.0, node_timeout_s: float = 30.0, hedge_s: float = 2.0,
                 key_ahead: bool = False):
        if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK:
            raise LocalError(f"chunk size must be 1 byte to {MAX_CHUNK >> 20} MiB")
        if link_cipher not in otp.CIPHERS:
            raise LocalError(f"link cipher must be one of {', '.join(otp.CIPHERS)}")
        self.state = state
        self.k, self.n = state.k, len(state.nodes)
        if self.n < self.k:
            raise LocalError(f"cluster has {self.n} nodes, fewer than k = {self.k}")
        low = self.k + 1 if self.n > self.k else self.n
        w = self.n if write_quorum is None else write_quorum
        if not isinstance(w, int) or not low <= w <= self.n:
            raise LocalError(f"write quorum must be from {low} to {self.n}")
        self.write_quorum = w
        self.chunk_size = chunk_size
        self.link_cipher = link_cipher
        self.verify = verify
        self.node_timeout_s = node_timeout_s
        self.hedge_s = hedge_s
        sae = state.sae(sae_id)
        self._sae_config = SAEConfig(sae_id=sae_id, kme_url=state.kme_url_of(sae_id), cert=sae.cert,
                                     key=sae.key, ca=state.ca, key_size=KEY_SIZE_BITS,
                                     wait_s=key_wait_s)
        self._session: aiohttp.ClientSession | None = None
        self._sae: SAEClient | None = None
        self._key_ahead = key_ahead
        self._ahead: AheadKeys | None = None
        self._opening: OpeningKeys | None = None
        self._fetch_slots: asyncio.Semaphore | None = None
        self._nodes: list[_Node] = []
        self._latency: dict[str, float] = {}

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str] | None = None, **kw: Any) -> QStore:
        """A client of the cluster whose state is in ``state_dir`` (see :func:`qstore.cluster.state_dir`)."""
        from qstore.cluster import state_dir as find

        return cls(ClusterState.load(find(state_dir)), **kw)

    async def __aenter__(self) -> QStore:
        ctx: ssl.SSLContext = pki.client_ssl_context(self._sae_config.cert, self._sae_config.key,
                                                     self._sae_config.ca)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.node_timeout_s)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
                                              timeout=timeout,
                                              trace_configs=[observability.propagate_request_ids()])
        self._sae = await SAEClient(self._sae_config).__aenter__()
        epoch = None
        if self._key_ahead:
            # a share of up to 16 KiB in whole 1 KiB keys; larger ones fetch key cut to size
            self._ahead = AheadKeys(self._sae, unit=1024, depth=64, most=16)
            self._opening = OpeningKeys(self._sae)
            epoch = uuid.uuid4().hex
        self._nodes = [_Node(info, self._session, ahead=self._ahead, opening=self._opening, epoch=epoch)
                       for info in sorted(self.state.nodes, key=lambda i: i.x)]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ahead is not None:
            await self._ahead.close()
            self._ahead = None
        if self._opening is not None:
            await self._opening.close()
            self._opening = None
        if self._sae is not None:
            await self._sae.close()
            self._sae = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def nodes(self) -> list[_Node]:
        """HTTP clients of the cluster's nodes, by x (inside ``async with``)."""
        if self._session is None:
            raise LocalError("use QStore inside 'async with'")
        return self._nodes

    def tables(self) -> Any:
        """Secret-shared tables and statistics on them (:class:`client.tables.Tables`)."""
        from client.tables import Tables

        return Tables(self)

    def table(self, *names: str) -> Any:
        """A query builder over the union of tables ``names``: ``await qs.table("p").mean("w")``."""
        return self.tables().table(*names)

    @property
    def sae(self) -> SAEClient:
        if self._sae is None:
            raise LocalError("use QStore inside 'async with'")
        return self._sae

    # -- fan-out helper -----------------------------------------------------------------

    async def _each(self, nodes: Iterable[_Node], call: Callable[[_Node], Awaitable[Any]], *,
                    bucket: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """Run ``call`` on every node; results and failures (site -> message) by site.

        When every node refuses for one reason, that reason is raised (NoSuchBucket
        and BucketNotEmpty as such when ``bucket`` is given).
        """
        nodes = list(nodes)

        async def one(node: _Node) -> Any:
            started = time.perf_counter()
            async with asyncio.timeout(self.node_timeout_s):
                out = await call(node)
            self._latency[node.site] = time.perf_counter() - started
            return out

        outcomes = await asyncio.gather(*(one(node) for node in nodes), return_exceptions=True)
        ok, failed = {}, {}
        refusals = set()
        for node, out in zip(nodes, outcomes, strict=True):
            if isinstance(out, BaseException):
                if not isinstance(out, QStoreError | TimeoutError | OSError):
                    raise out
                failed[node.site] = "timed out" if isinstance(out, TimeoutError) else str(out)
                if isinstance(out, NodeError) and 400 <= (out.node_status or 0) < 500:
                    refusals.add((out.name, out.node_status, str(out).removeprefix(f"node {node.site}: ")))
            else:
                ok[node.site] = out
        if nodes and not ok and len(refusals) == 1 and len(failed) == len(nodes):
            (name, status, message), = refusals
            if bucket is not None and name == "NoSuchBucket":
                raise NoSuchBucket(bucket)
            if bucket is not None and name == "BucketNotEmpty":
                raise BucketNotEmpty(bucket)
            raise Refused(message, status=status, name=name)  # every node says the same: our request is wrong
        return ok, failed

    # -- buckets ------------------------------------------------------------------------

    async def create_bucket(self, bucket: str) -> bool:
        """Create ``bucket`` on every node (True if it is new). Needs every node up."""
        ok, failed = await self._each(self._nodes, lambda nd: nd.call("PUT", f"/v1/buckets/{bucket}"),
                                      bucket=bucket)
        if failed:
            raise QuorumError(f"bucket {bucket!r} not created everywhere: " + _why(failed))
        return any(r["created"] for r in ok.values())

    async def delete_bucket(self, bucket: str) -> None:
        _, failed = await self._each(self._nodes, lambda nd: nd.call("DELETE", f"/v1/buckets/{bucket}"),
                                     bucket=bucket)
        _raise_common(failed, self.k)
        if failed:
            raise QuorumError(f"bucket {bucket!r} not deleted everywhere: " + _why(failed))

    async def list_buckets(self) -> list[str]:
        ok, failed = await self._each(self._nodes, lambda nd: nd.call("GET", "/v1/buckets"))
        counts: collections.Counter[str] = collections.Counter(
            b["name"] for r in ok.values() for b in r["buckets"])
        if len(ok) < self.k:
            raise QuorumError("fewer than k nodes answered: " + _why(failed))
        return sorted(name for name, c in counts.items() if c >= self.k)

    # -- put ----------------------------------------------------------------------------

    async def put(self, bucket: str, key: str, source: bytes | bytearray | memoryview | BinaryIO | Any, *,
                  meta: Mapping[str, str] | None = None, size: int | None = None,
                  progress: Progress | None = None,
                  meta_after: Callable[[], Mapping[str, str]] | None = None) -> Report:
        """Store ``source`` as ``bucket/key``; a new version.

        ``source``: bytes, a binary file object, or an object with an async
        ``read(n)`` (an aiohttp request body), read chunk by chunk.
        ``meta_after``: called once the source is read, for metadata known only
        then (the S3 gateway's MD5 ETag); merged over ``meta``, secret-shared alike.

        Raises QuorumError (nothing visible, the previous version stays) when
        fewer than W nodes hold every chunk at the end.
        """
        started = time.perf_counter()
        user_meta = _check_user_meta(meta)
        reader = _Reader(source, self.chunk_size)
        object_id = uuid.uuid4().bytes
        version = time.time_ns()
        upload_id = uuid.uuid4().hex
        report = Report("put", bucket, key, version=version, object_id=object_id.hex(),
                        link_cipher=self.link_cipher)
        begin = {"upload_id": upload_id, "bucket": bucket, "key": key, "object_id": object_id.hex(),
                 "version": version, "k": self.k, "n": self.n}
        digest = hashlib.sha256()
        known = _known_size(source, size)

        def secret_shares() -> list[bytes]:
            """The secret metadata's shares, once the source is read (the digest and meta_after need it)."""
            doc_meta = user_meta if meta_after is None else _check_user_meta({**user_meta, **meta_after()})
            return secret_meta.share_doc({"sha256": digest.hexdigest(), "meta": doc_meta}, self.n, self.k)

        shares: list[bytes] = []
        sealed: dict[str, bytes | bytearray] = {}
        if known is not None and known <= self.chunk_size and len(json.dumps(begin)) < 4096:
            live, chunks = await self._put_small(begin, reader, digest, report, progress, secret_shares)
            # the shares of the secret metadata went sealed with the only chunk
        else:
            live, chunks = await self._put_chunked(begin, reader, digest, report, progress)
            shares = secret_shares()
            sealed = await self._seal_shares(live, shares, report, upload_id)
        public = {"size": reader.total, "chunk_size": self.chunk_size, "chunks": chunks,
                  "link_cipher": self.link_cipher, "format": 1}

        async def commit(nd: _Node) -> Any:
            path = f"/v1/uploads/{upload_id}/commit"
            if nd.site not in sealed:
                return await nd.call("POST", path, body={"meta": public})

            async def attempt(envelope: bytes | bytearray) -> Any:
                report.link(nd.site).bytes_sent += len(envelope)
                return await nd.call("POST", path,
                                     body={"meta": public, "secret": base64.b64encode(envelope).decode()})

            return await self._resealed(nd, [shares[nd.info.x - 1]], report, self.link_cipher,
                                        sealed[nd.site], attempt)

        ok, failed = await self._each(live, commit)
        report.failed.update(failed)
        report.nodes = sorted(ok)
        report.size = reader.total
        report.seconds = time.perf_counter() - started
        if len(ok) < self.write_quorum:
            # Some nodes made it visible: readers see it where >= k did. Say so plainly.
            raise QuorumError(f"commit reached {len(ok)} of {self.n} nodes (W = {self.write_quorum}); "
                              f"the new version is {'readable' if len(ok) >= self.k else 'not readable'}: "
                              + _why(failed))
        return report

    async def _seal_small(self, nd: _Node, parts: list[Any], report: Report,
                          cipher: str = "otp") -> bytes | bytearray:
        """``parts`` sealed as one frame for node ``nd``, with key from the pool when it is small enough."""
        cost = otp.key_cost(cipher, sum(len(p) for p in parts))
        if self._ahead is not None:
            stream, spent = await self._ahead.envelope(nd.info.id, cost)
        else:
            stream, spent = await envelope_keys(self.sae, nd.info.id, cost), cost
        try:
            envelope = otp.seal_with(cipher, parts, stream)
        finally:
            stream.wipe()
        report.link(nd.site).key_bytes += spent
        return envelope

    async def _seal_shares(self, live: list[_Node], shares: list[bytes], report: Report,
                           upload_id: str) -> dict[str, bytes | bytearray]:
        """Each live node's share of the secret metadata, sealed for it, for its commit (else abort)."""
        try:
            envelopes = await asyncio.gather(*(self._seal_small(nd, [shares[nd.info.x - 1]], report,
                                                                 self.link_cipher) for nd in live))
        except BaseException:
            await self._abort(upload_id)
            raise
        return {nd.site: env for nd, env in zip(live, envelopes, strict=True)}

    async def _opening_keys(self, nd: _Node, refs: list[otp.KeyRef]) -> otp.KeyStream:
        """The keys an envelope from ``nd`` names: announced ones fetched ahead, the rest now."""
        if self._opening is not None:
            return await self._opening.stream(nd.info.id, refs)
        return await opening_keys(self.sae, nd.info.id, refs)

    async def _resealed(self, nd: _Node, parts: list[Any], report: Report, cipher: str,
                        envelope: bytes | bytearray,
                        send: Callable[[bytes | bytearray], Awaitable[Any]]) -> Any:
        """``send(envelope)``; once more with fresh key when the node cannot open key from the pool.

        A node that restarted lost the keys it fetched ahead on our
        announcement, and ETSI GS QKD 014 hands a key out once: the rest of
        the pool is useless to it, so the pool starts again.
        """
        try:
            return await send(envelope)
        except NodeError as exc:
            if self._ahead is None or exc.name != "SealError":
                raise
        self._ahead.reset(nd.info.id)
        return await send(await self._seal_small(nd, parts, report, cipher))

    async def _open_secrets(self, nd: _Node, answer: Any, field: str) -> Any:
        """A node's listing with its sealed shares of secret metadata opened into each version's meta.

        A share of chunk 0 that came in the same envelope (``inline``) is left in
        ``answer["inline_frame"]`` as (version, object ID, frame).
        """
        if not isinstance(answer, dict) or not isinstance(answer.get(field), list):
            raise NodeError(nd.site, "answered with a malformed listing")
        sealed = answer.pop("secrets", None)
        if sealed is None:
            return answer
        try:
            envelope = base64.b64decode(sealed, validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise NodeError(nd.site, "sent malformed sealed metadata") from None
        refs = otp.parse_envelope_refs(envelope)
        stream = await self._opening_keys(nd, refs)
        try:
            data = otp.open_(envelope, stream)
        finally:
            stream.wipe()
        inline = answer.pop("inline", None)
        if inline is not None:
            try:
                cut = len(data) - int(inline["bytes"])
                if not 0 <= cut < len(data):
                    raise ValueError
                answer["inline_frame"] = (int(inline["version"]), str(inline["object_id"]), data[cut:])
            except (TypeError, ValueError, KeyError):
                raise NodeError(nd.site, "sent a malformed inline share") from None
            data = data[:cut]
        for v, share in zip(answer[field], secret_meta.unpack_shares(data, len(answer[field])), strict=True):
            if share is not None and isinstance(v, dict) and isinstance(v.get("meta"), dict):
                v["meta"]["secret"] = share
        return answer

    async def _put_chunked(self, begin: dict[str, Any], reader: _Reader, digest: Any, report: Report,
                           progress: Progress | None) -> tuple[list[_Node], int]:
        """Begin everywhere, stream every chunk, prepare: the nodes that hold it all, and the chunk count."""
        upload_id, bucket = begin["upload_id"], begin["bucket"]
        ok, failed = await self._each(self._nodes, lambda nd: nd.call(
            "POST", "/v1/uploads", body={**begin, "x": nd.info.x}), bucket=bucket)
        _raise_common(failed, self.k, bucket=bucket)
        live = [nd for nd in self._nodes if nd.site in ok]
        report.failed.update(failed)
        try:
            self._need_quorum(live, "took the upload", failed)
            chunks = await self._send_chunks(live, upload_id, bytes.fromhex(begin["object_id"]),
                                             begin["version"], reader, digest, report, progress)
            live = [nd for nd in live if nd.site not in report.failed]
            self._need_quorum(live, "received every chunk", report.failed)
            ok, failed = await self._each(live, lambda nd: nd.call(
                "POST", f"/v1/uploads/{upload_id}/prepare", body={"chunks": chunks}))
            report.failed.update(failed)
            live = [nd for nd in live if nd.site in ok]
            self._need_quorum(live, "prepared", report.failed)
        except BaseException:
            await self._abort(upload_id)
            raise
        return live, chunks

    async def _put_small(self, begin: dict[str, Any], reader: _Reader, digest: Any, report: Report,
                         progress: Progress | None,
                         secret_shares: Callable[[], list[bytes]]) -> tuple[list[_Node], int]:
        """An object of at most one chunk: begin, send and prepare in one request per node.

        Each node's share of the secret metadata travels in the same sealed
        envelope, after the frame (``secret_bytes`` says how long it is).
        """
        upload_id, bucket = begin["upload_id"], begin["bucket"]
        chunk = await reader.aread() if reader.is_async else reader.read()
        if (await reader.aread() if reader.is_async else reader.read()) is not None:
            raise LocalError("the source is longer than its declared size")
        chunks = 0 if chunk is None else 1
        parts: dict[str, list[Any]] = {nd.site: [] for nd in self._nodes}
        if chunk is not None:
            digest.update(chunk)
            out = empty_rows(self.n, len(chunk))
            split_into(chunk, self.n, self.k, out)
            for nd in self._nodes:
                body = out[nd.info.x - 1]
                parts[nd.site] += [encode_header(object_id=bytes.fromhex(begin["object_id"]),
                                                 object_version=begin["version"], chunk_index=0, x=nd.info.x,
                                                 k=self.k, n=self.n, body=body), body]
        shares = secret_shares()
        for nd in self._nodes:
            parts[nd.site].append(shares[nd.info.x - 1])
        secret_bytes = len(shares[0])
        cipher = self.link_cipher  # the metadata share rides with the share, under the object's link cipher
        sealed = await asyncio.gather(*(self._seal_small(nd, parts[nd.site], report, cipher)
                                        for nd in self._nodes))
        envelopes = {nd.site: env for nd, env in zip(self._nodes, sealed, strict=True)}

        async def send(nd: _Node) -> Any:
            head = {"X-QStore-Upload": json.dumps({**begin, "x": nd.info.x, "secret_bytes": secret_bytes})}

            async def attempt(envelope: bytes | bytearray) -> Any:
                out = await nd.call("PUT", f"/v1/uploads/{upload_id}/oneshot", params={"chunks": str(chunks)},
                                    data=bytes(envelope), headers=head)
                report.link(nd.site).bytes_sent += len(envelope)
                return out

            return await self._resealed(nd, parts[nd.site], report, cipher, envelopes[nd.site], attempt)

        try:
            ok, failed = await self._each(self._nodes, send, bucket=bucket)
            _raise_common(failed, self.k, bucket=bucket)
            report.failed.update(failed)
            live = [nd for nd in self._nodes if nd.site in ok]
            self._need_quorum(live, "prepared", report.failed)
        except BaseException:
            await self._abort(upload_id)
            raise
        if progress is not None and chunk is not None:
            progress(len(chunk))
        return live, chunks

    def _need_quorum(self, live: list[_Node], what: str, failed: Mapping[str, str]) -> None:
        if len(live) < self.write_quorum:
            raise QuorumError(f"only {len(live)} of {self.n} nodes {what}, {self.write_quorum} needed: "
                              + _why(failed))

    async def _abort(self, upload_id: str) -> None:
        await self._each(self._nodes, lambda nd: nd.call("DELETE", f"/v1/uploads/{upload_id}"))

    async def _send_chunks(self, live: list[_Node], upload_id: str, object_id: bytes, version: int,
                           reader: _Reader, digest: Any, report: Report, progress: Progress | None) -> int:
        """Split, seal and send every chunk; returns the chunk count. Failed nodes land in report.failed."""
        queues = {nd.site: asyncio.Queue[bytes | None](QUEUE_DEPTH) for nd in live}

        async def sender(nd: _Node) -> None:
            q = queues[nd.site]
            path = f"/v1/uploads/{upload_id}/chunks"
            while (envelope := await q.get()) is not None:
                if nd.site in report.failed:
                    continue  # drain: the producer must never block on a dead node
                try:
                    async with asyncio.timeout(self.node_timeout_s):
                        await nd.call("PUT", path, data=envelope)
                    report.link(nd.site).bytes_sent += len(envelope)
                except (QStoreError, TimeoutError) as exc:
                    report.failed[nd.site] = "timed out" if isinstance(exc, TimeoutError) else str(exc)

        try:
            async with asyncio.TaskGroup() as tg:
                for nd in live:
                    tg.create_task(sender(nd))
                try:
                    index = await self._produce(live, queues, object_id, version, reader, digest, report,
                                                progress)
                except BaseException:
                    for q in queues.values():
                        _end_now(q)
                    raise
                for q in queues.values():
                    await q.put(None)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None  # the senders never raise: this is the producer's error
        return index

    async def _produce(self, live: list[_Node], queues: dict[str, asyncio.Queue[bytes | None]],
                       object_id: bytes, version: int, reader: _Reader, digest: Any, report: Report,
                       progress: Progress | None) -> int:
        index = 0
        rows = empty_rows(self.n, self.chunk_size)
        while True:
            chunk = await reader.aread() if reader.is_async else reader.read()
            if chunk is None:
                return index
            digest.update(chunk)
            length = len(chunk)
            out = rows[:, :length]
            split_into(chunk, self.n, self.k, out)
            targets = [nd for nd in live if nd.site not in report.failed]
            frames = [(encode_header(object_id=object_id, object_version=version, chunk_index=index,
                                     x=nd.info.x, k=self.k, n=self.n, body=out[nd.info.x - 1]),
                       out[nd.info.x - 1]) for nd in targets]
            costs = [otp.key_cost(self.link_cipher, HEADER_SIZE + length) for _ in frames]
            streams = await asyncio.gather(*(envelope_keys(self.sae, nd.info.id, cost)
                                             for nd, cost in zip(targets, costs, strict=True)))
            for nd, frame, cost, stream in zip(targets, frames, costs, streams, strict=True):
                try:
                    envelope = otp.seal_with(self.link_cipher, frame, stream)
                finally:
                    stream.wipe()
                report.link(nd.site).key_bytes += cost
                await queues[nd.site].put(envelope)
            if len([nd for nd in live if nd.site not in report.failed]) < self.write_quorum:
                raise QuorumError(f"fewer than {self.write_quorum} nodes still receiving: "
                                  + _why(report.failed))
            index += 1
            if progress is not None:
                progress(length)

    # -- versions -----------------------------------------------------------------------

    async def _candidates(self, bucket: str, key: str, report: Report | None = None, *,
                          secrets: bool = True, inline: bool = False,
                          want: tuple[int, str] | None = None) -> list[_Candidate]:
        """Versions of ``bucket/key`` committed on >= k nodes with agreeing public metadata, newest first.

        ``secrets``: with each holder's share of the secret metadata (sealed by the node, opened here).
        ``inline``: a small newest version's share comes along too, so a get needs no second trip.
        Each node names its newest :data:`VERSIONS_FIRST` versions first (a key written a million
        times must not cost a million versions per get); all of them only when a node's older ones
        could matter: no readable version among the newest, or ``want`` (version, object ID) older.
        """
        out, sure = await self._candidates_upto(bucket, key, report, secrets, inline, VERSIONS_FIRST, want)
        if not sure:
            out, _ = await self._candidates_upto(bucket, key, report, secrets, inline, None, want)
        return out

    async def _candidates_upto(self, bucket: str, key: str, report: Report | None, secrets: bool,
                               inline: bool, limit: int | None,
                               want: tuple[int, str] | None) -> tuple[list[_Candidate], bool]:
        """The candidates among each node's newest ``limit`` versions, and whether older ones cannot
        change the answer."""
        params = {"bucket": bucket, "key": key, **({"secret": "1"} if secrets else {}),
                  **({"inline": str(INLINE_SHARE)} if secrets and inline else {}),
                  **({"limit": str(limit)} if limit is not None else {})}

        async def ask(nd: _Node) -> Any:
            answer = await nd.call("GET", "/v1/versions", params=params)
            return await self._open_secrets(nd, answer, "versions") if secrets else answer

        ok, failed = await self._each(self._nodes, ask, bucket=bucket)
        if report is not None:
            report.failed.update(failed)
        _raise_common(failed, self.k, bucket=bucket)
        if len(ok) < self.k:
            raise QuorumError(f"fewer than k = {self.k} nodes answered: " + _why(failed))
        by_id: dict[tuple[int, str], _Candidate] = {}
        for site, answer in ok.items():
            for v in answer["versions"]:
                ident = (v["version"], v["object_id"])
                cand = by_id.setdefault(ident, _Candidate(*ident))
                cand.holders[site] = v
        for site, answer in ok.items():
            if "inline_frame" in answer:
                version, object_id, frame = answer["inline_frame"]
                if (version, object_id) in by_id:
                    by_id[version, object_id].inline[site] = frame
        out = []
        for cand in sorted(by_id.values(), key=lambda c: (c.version, c.object_id), reverse=True):
            votes = collections.Counter(_public(v["meta"]) + _flag(v) for v in cand.holders.values())
            public, count = votes.most_common(1)[0] if votes else ("", 0)
            if count >= self.k:
                cand.holders = {s: v for s, v in cand.holders.items()
                                if _public(v["meta"]) + _flag(v) == public}
                out.append(cand)
        # A node that left versions out left only ones older than all it named (its floor).
        floors = [min((v["version"], v["object_id"]) for v in answer["versions"])
                  for answer in ok.values() if answer.get("more") and answer["versions"]]
        if not floors:
            return out, True
        floor = max(floors)
        newest = (out[0].version, out[0].object_id) if out else None
        sure = newest is not None and newest >= floor
        if want is not None and all((c.version, c.object_id) != want for c in out):
            sure = sure and want >= floor
        return out, sure

    async def head(self, bucket: str, key: str, *, inline: bool = False) -> ObjectInfo:
        """The newest readable version's public facts and its (reconstructed) user metadata.

        ``inline``: for a :meth:`get` with ``info=`` that follows, bring a small object's shares along.
        """
        for cand in await self._candidates(bucket, key, inline=inline):
            any_v = next(iter(cand.holders.values()))
            if any_v["deleted"]:
                break
            secret = self._open_secret(cand)
            return _info(bucket, key, cand, secret)
        raise NoSuchKey(bucket, key)

    def _open_secret(self, cand: _Candidate) -> dict[str, Any]:
        """The object's secret-shared metadata (SHA-256, user metadata), decoded robustly from its holders."""
        shares = []
        for v in cand.holders.values():
            try:
                shares.append(Share(x=v["x"], data=bytes.fromhex(v["meta"].get("secret")), k=self.k))
            except (TypeError, ValueError, QStoreError):
                continue
        return secret_meta.open_doc(shares, self.k)

    # -- get ----------------------------------------------------------------------------

    async def get(self, bucket: str, key: str, sink: Any, *, progress: Progress | None = None,
                  start: int = 0, end: int | None = None, version: tuple[int, str] | None = None,
                  info: ObjectInfo | None = None) -> Report:
        """Write the newest version of ``bucket/key`` (bytes ``[start, end)`` of it) to ``sink``.

        ``sink.write`` may be a coroutine (an aiohttp response). ``version``
        (number, object ID), e.g. from :meth:`head`, reads exactly that
        version; ``info`` (from :meth:`head`) reads that version without
        asking the nodes for it again. The report names bad and slow nodes. The whole object's
        SHA-256 is checked when the whole object is read; a range is checked
        share by share (digests, and the extra share).
        """
        started = time.perf_counter()
        report = Report("get", bucket, key)
        if info is not None and info.found is not None and (info.bucket, info.key) == (bucket, key):
            cand, secret = info.found
            first = next(iter(cand.holders.values()))
        else:
            want = None if version is None else (int(version[0]), str(version[1]))
            cands = await self._candidates(bucket, key, report, inline=True, want=want)
            if version is not None:
                cands = [c for c in cands if (c.version, c.object_id) == tuple(version)]
            if not cands:
                raise NoSuchKey(bucket, key)
            cand = cands[0]
            first = next(iter(cand.holders.values()))
            if first["deleted"]:
                raise NoSuchKey(bucket, key)
            secret = self._open_secret(cand)
        meta = first["meta"]
        report.version, report.object_id = cand.version, cand.object_id
        report.link_cipher = meta.get("link_cipher", "otp")
        chunks, size, chunk_size = int(meta["chunks"]), int(meta["size"]), int(meta.get("chunk_size", 1))
        end = size if end is None else end
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size):
            raise LocalError(f"range [{start}, {end}) is not within the object's {size} bytes")
        whole = (start, end) == (0, size)
        indices = range(start // chunk_size, -(-end // chunk_size)) if end > start else range(0)
        if whole:
            indices = range(chunks)
        holders = sorted((nd for nd in self._nodes if nd.site in cand.holders),
                         key=lambda nd: self._latency.get(nd.site, 1.0))
        digest = hashlib.sha256()
        pending: collections.deque[tuple[int, asyncio.Task[bytes]]] = collections.deque()
        served: set[str] = set()
        written = 0

        async def emit_next() -> int:
            index, task = pending.popleft()
            data = memoryview(await task)
            lo, hi = max(start - index * chunk_size, 0), min(end - index * chunk_size, len(data))
            return await _emit(data[lo:hi], sink, digest if whole else None, progress)

        try:
            for index in indices:
                pending.append((index, asyncio.create_task(
                    self._fetch_chunk(bucket, key, cand, index, holders, report, served))))
                if len(pending) >= READ_WINDOW:
                    written += await emit_next()
            while pending:
                written += await emit_next()
        finally:
            for _, t in pending:
                t.cancel()
            for _, t in pending:
                with contextlib.suppress(BaseException):  # the first failure is already on its way up
                    await t
        if written != end - start:
            raise ShareCorruption(f"read {written} bytes, the range holds {end - start}")
        if whole and digest.hexdigest() != secret.get("sha256"):
            raise ShareCorruption("the object's SHA-256 does not match what was stored",
                                  tuple(sorted(cand.holders[s]["x"] for s in report.bad)))
        report.size = written
        report.nodes = sorted(served)
        report.seconds = time.perf_counter() - started
        return report

    async def get_bytes(self, bucket: str, key: str) -> bytes:
        import io

        sink = io.BytesIO()
        await self.get(bucket, key, sink)
        return sink.getvalue()

    async def _fetch_share(self, nd: _Node, bucket: str, key: str, cand: _Candidate, index: int,
                           cipher: str, report: Report) -> Share:
        params = {"bucket": bucket, "key": key, "object_id": cand.object_id, "version": str(cand.version),
                  "index": str(index), "cipher": cipher}
        frame = cand.inline.pop(nd.site, None) if index == 0 else None  # came with the version: once
        if frame is not None:
            h, body = split_frame(frame)
        else:
            async with asyncio.timeout(self.node_timeout_s):
                envelope = await nd.call("GET", "/v1/chunk", params=params, raw=True)
                refs = otp.parse_envelope_refs(envelope)
                stream = await self._opening_keys(nd, refs)
            try:
                h, body = split_frame(otp.open_(envelope, stream))
            finally:
                stream.wipe()
            use = report.link(nd.site)
            use.bytes_received += len(envelope)
            use.key_bytes += sum(r.length for r in refs)
        if not hmac.compare_digest(hashlib.sha256(body).digest(), h.digest):
            raise FrameError("share body does not match its digest")
        if (h.object_id.hex(), h.object_version, h.chunk_index, h.x, h.k) != (
                cand.object_id, cand.version, index, nd.info.x, self.k):
            raise FrameError("the node sent a share of something else")
        return Share(x=h.x, data=body, k=self.k)  # type: ignore[arg-type]  # a view: no copy

    async def _fetch_chunk(self, bucket: str, key: str, cand: _Candidate, index: int, holders: list[_Node],
                           report: Report, served: set[str]) -> bytes:
        if self._fetch_slots is None:
            self._fetch_slots = asyncio.Semaphore(FETCH_SLOTS)
        async with self._fetch_slots:
            return await self._fetch_chunk_now(bucket, key, cand, index, holders, report, served)

    async def _fetch_chunk_now(self, bucket: str, key: str, cand: _Candidate, index: int,
                               holders: list[_Node], report: Report, served: set[str]) -> bytes:
        cipher = next(iter(cand.holders.values()))["meta"].get("link_cipher", "otp")
        usable = [nd for nd in holders if nd.site not in report.bad and nd.site not in report.failed]
        want = self.k + 1 if self.verify and len(usable) > self.k else self.k
        shares: dict[str, Share] = {}
        queue = list(usable)
        while True:
            await self._collect(shares, want, queue, report, index,
                                lambda nd: self._fetch_share(nd, bucket, key, cand, index, cipher, report))
            if len(shares) < self.k:
                raise QuorumError(f"chunk {index}: only {len(shares)} good shares, k = {self.k} needed: "
                                  + _why({**report.failed, **report.bad}))
            site_of = {s.x: site for site, s in shares.items()}
            if len(shares) == self.k:
                report.verified = False
                data = interpolate(list(shares.values()))[0].tobytes()
            else:
                try:
                    decoded = decode(list(shares.values()), self.k)
                except ShareCorruption as exc:
                    for x in exc.bad:
                        report.bad[site_of[x]] = f"chunk {index}: share disagrees with the others"
                    if queue:  # one more share can outvote the bad one
                        want = len(shares) + 1
                        continue
                    raise
                for x in decoded.bad:
                    report.bad[site_of[x]] = f"chunk {index}: share disagrees with the others"
                data = decoded.data
            served.update(s for s in shares if s not in report.bad)
            return data

    async def _collect(self, shares: dict[str, Share], want: int, queue: list[_Node], report: Report,
                       index: int, fetch: Callable[[_Node], Awaitable[Share]]) -> None:
        """Fetch shares from ``queue`` (fastest first) until ``want`` are in hand or no node is left.

        A node that errs is replaced by the next one at once; one that is slow
        (no answer within ``hedge_s``) gets a rival: the next node is asked
        too, and whichever answers first is used.
        """
        pending: dict[asyncio.Task[Share], _Node] = {}

        def launch(count: int) -> None:
            for _ in range(min(count, len(queue))):
                nd = queue.pop(0)
                pending[asyncio.create_task(fetch(nd))] = nd

        launch(want - len(shares))
        try:
            while pending and len(shares) < want:
                done, _ = await asyncio.wait(pending, timeout=self.hedge_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    for nd in pending.values():
                        report.slow.add(nd.site)
                    launch(1)
                    continue
                for task in done:
                    nd = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        shares[nd.site] = task.result()
                        continue
                    if isinstance(exc, SealError | FrameError | ShareCorruption) or (
                            isinstance(exc, NodeError) and exc.name == "ShareCorruption"):
                        report.bad[nd.site] = f"chunk {index}: {exc}"
                    elif isinstance(exc, QStoreError | TimeoutError | OSError):
                        report.failed[nd.site] = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                    else:
                        raise exc
                    launch(want - len(shares) - len(pending))
        finally:
            for task in pending:  # answers no longer needed (a slow node lost the race)
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task

    # -- list / delete -----------------------------------------------------------------

    async def list(self, bucket: str, prefix: str = "", *, start_after: str = "",
                   limit: int = 1000) -> list[ObjectInfo]:
        """Objects whose newest readable version is live, in key order (public facts only)."""
        return await self._listing(bucket, prefix, start_after, limit, with_meta=False)

    async def list_meta(self, bucket: str, prefix: str = "", *, start_after: str = "",
                        limit: int = 1000) -> list[ObjectInfo]:
        """As :meth:`list`, each with its user metadata reconstructed from the nodes' shares of it.

        For listings that must show what only the secret metadata holds (the S3
        gateway's ETags); an object whose metadata shares disagree is left out.
        """
        return await self._listing(bucket, prefix, start_after, limit, with_meta=True)

    async def _listing(self, bucket: str, prefix: str, start_after: str, limit: int, *,
                       with_meta: bool) -> list[ObjectInfo]:
        params = {"bucket": bucket, "prefix": prefix, "start_after": start_after, "limit": str(limit),
                  **({"secret": "1"} if with_meta else {})}

        async def ask(nd: _Node) -> Any:
            answer = await nd.call("GET", "/v1/objects", params=params)
            return await self._open_secrets(nd, answer, "objects") if with_meta else answer

        ok, failed = await self._each(self._nodes, ask, bucket=bucket)
        _raise_common(failed, self.k, bucket=bucket)
        if len(ok) < self.k:
            raise QuorumError(f"fewer than k = {self.k} nodes answered: " + _why(failed))
        by_key: dict[str, dict[tuple[int, str], _Candidate]] = collections.defaultdict(dict)
        for site, answer in ok.items():
            for v in answer["objects"]:
                c = by_key[v["key"]].setdefault((v["version"], v["object_id"]),
                                                _Candidate(v["version"], v["object_id"]))
                c.holders[site] = v
        out = []
        for name in sorted(by_key, key=lambda s: s.encode()):
            readable = [c for c in by_key[name].values() if len(c.holders) >= self.k]
            if not readable:
                continue
            cand = max(readable, key=lambda c: (c.version, c.object_id))
            secret = None
            if with_meta:
                try:
                    secret = self._open_secret(cand)
                except ShareCorruption:
                    continue
            out.append(_info(bucket, name, cand, secret))
        return out[:limit]

    async def delete(self, bucket: str, key: str) -> Report:
        """Mark ``bucket/key`` deleted (a tombstone version on every node that answers, >= W)."""
        started = time.perf_counter()
        cands = await self._candidates(bucket, key, secrets=False)
        if not cands or next(iter(cands[0].holders.values()))["deleted"]:
            raise NoSuchKey(bucket, key)
        version, object_id = time.time_ns(), uuid.uuid4().hex
        body = {"bucket": bucket, "key": key, "object_id": object_id, "version": version, "meta": {}}
        ok, failed = await self._each(self._nodes, lambda nd: nd.call("POST", "/v1/tombstones", body=body),
                                      bucket=bucket)
        report = Report("delete", bucket, key, version=version, object_id=object_id, nodes=sorted(ok),
                        failed=failed, seconds=time.perf_counter() - started)
        if len(ok) < self.write_quorum:
            raise QuorumError(f"delete reached {len(ok)} of {self.n} nodes (W = {self.write_quorum}): "
                              + _why(failed))
        return report

    # -- repair -------------------------------------------------------------------------

    async def repair(self, target: str, *, bucket: str | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Give node ``target`` every share it lacks (or holds bad) of the newest live versions.

        Each missing share is interpolated at the target's x from k others
        (never the data itself: no share at x = 0 is ever computed), sealed for
        the target and committed there as the same version.
        """
        node = next((nd for nd in self._nodes if target in (nd.site, nd.info.id, str(nd.info.x))), None)
        if node is None:
            raise LocalError(f"no node {target!r} (nodes: {', '.join(nd.site for nd in self._nodes)})")
        buckets = [bucket] if bucket else await self.list_buckets()
        await node.call("GET", "/v1/health")
        for b in buckets:
            await node.call("PUT", f"/v1/buckets/{b}")
        await node.call("POST", "/v1/admin/scrub")
        summary: dict[str, Any] = {"node": node.site, "objects": 0, "repaired": [], "failed": {}}
        for b in buckets:
            start_after = ""
            while True:
                batch = await self.list(b, start_after=start_after, limit=1000)
                for info in batch:
                    summary["objects"] += 1
                    try:
                        if await self._repair_object(node, b, info, progress):
                            summary["repaired"].append(f"{b}/{info.key}")
                    except QStoreError as exc:
                        summary["failed"][f"{b}/{info.key}"] = str(exc)
                if len(batch) < 1000:
                    break
                start_after = batch[-1].key
        return summary

    async def _repair_object(self, node: _Node, bucket: str, info: ObjectInfo,
                             progress: Progress | None) -> bool:
        cands = await self._candidates(bucket, info.key)
        cand = next((c for c in cands if c.object_id == info.object_id and c.version == info.version), None)
        if cand is None:
            return False
        good = cand.holders.get(node.site)
        if good is not None:
            # Present: is every chunk intact? (The node's scrubber has just flagged rotten ones.)
            bad = await self._bad_chunks(node, bucket, info.key, cand)
            if not bad:
                return False
        report = Report("repair", bucket, info.key)
        others = [nd for nd in self._nodes if nd.site in cand.holders and nd.site != node.site]
        others.sort(key=lambda nd: self._latency.get(nd.site, 1.0))
        meta = {name: value for name, value in next(iter(cand.holders.values()))["meta"].items()
                if name != "secret"}  # public facts; the target's share of the secret goes sealed
        secret_shares = [Share(x=v["x"], data=bytes.fromhex(v["meta"]["secret"]), k=self.k)
                         for s, v in cand.holders.items() if s != node.site][: self.k]
        if len(secret_shares) < self.k:
            raise QuorumError("fewer than k other nodes hold this version")
        my_secret = interpolate(secret_shares, (node.info.x,))[0].tobytes()
        upload_id = uuid.uuid4().hex
        object_id = bytes.fromhex(cand.object_id)
        await node.call("POST", "/v1/uploads", body={
            "upload_id": upload_id, "bucket": bucket, "key": info.key, "object_id": cand.object_id,
            "version": cand.version, "x": node.info.x, "k": self.k, "n": self.n})
        try:
            for index in range(int(meta["chunks"])):
                shares = await self._k_shares(others, bucket, info.key, cand, index, report)
                body = interpolate(shares, (node.info.x,))[0]
                frame = [encode_header(object_id=object_id, object_version=cand.version, chunk_index=index,
                                       x=node.info.x, k=self.k, n=self.n, body=body), body]
                envelope = await self._seal_small(node, frame, report, meta.get("link_cipher", "otp"))
                await node.call("PUT", f"/v1/uploads/{upload_id}/chunks", data=envelope)
                if progress is not None:
                    progress(len(body))
            await node.call("POST", f"/v1/uploads/{upload_id}/prepare",
                            body={"chunks": int(meta["chunks"])})
            sealed = base64.b64encode(await self._seal_small(node, [my_secret], report)).decode()
            await node.call("POST", f"/v1/uploads/{upload_id}/commit", body={"meta": meta, "secret": sealed})
        except BaseException:
            await self._each([node], lambda nd: nd.call("DELETE", f"/v1/uploads/{upload_id}"))
            raise
        return True

    async def _bad_chunks(self, node: _Node, bucket: str, key: str, cand: _Candidate) -> list[int]:
        """Chunks the node cannot serve intact (its scrubber flagged them, or the frame fails)."""
        bad = []
        report = Report("check", bucket, key)
        meta = next(iter(cand.holders.values()))["meta"]
        for index in range(int(meta["chunks"])):
            try:
                await self._fetch_share(node, bucket, key, cand, index, "aes-256-gcm", report)
            except (NodeError, SealError, FrameError, ShareCorruption) as exc:
                if isinstance(exc, NodeError) and exc.node_status not in (404, 422):
                    raise
                bad.append(index)
        return bad

    async def _k_shares(self, nodes: list[_Node], bucket: str, key: str, cand: _Candidate, index: int,
                        report: Report) -> list[Share]:
        cipher = next(iter(cand.holders.values()))["meta"].get("link_cipher", "otp")
        shares: list[Share] = []
        for nd in nodes:
            if nd.site in report.failed:
                continue
            try:
                shares.append(await self._fetch_share(nd, bucket, key, cand, index, cipher, report))
            except (QStoreError, TimeoutError) as exc:
                report.failed[nd.site] = str(exc)
                continue
            if len(shares) == self.k:
                return shares
        raise QuorumError(f"chunk {index}: fewer than k = {self.k} other nodes serve it")

    # -- status -------------------------------------------------------------------------

    async def node_status(self) -> dict[str, Any]:
        ok, failed = await self._each(self._nodes, lambda nd: nd.call("GET", "/v1/status"))
        return {"ok": ok, "failed": failed}


# -- helpers --------------------------------------------------------------------------------


def _flag(v: Mapping[str, Any]) -> str:
    return "|deleted" if v.get("deleted") else ""


def _why(failed: Mapping[str, str]) -> str:
    parts = [f"{site}: {msg.removeprefix(f'node {site}: ')}" for site, msg in sorted(failed.items())]
    return "; ".join(parts) or "no node answered"


def _raise_common(failed: Mapping[str, str], k: int, *, bucket: str | None = None) -> None:
    """If the nodes agree that the bucket does not exist, say that rather than 'quorum'."""
    if bucket is not None and len(failed) >= k and all("no bucket" in m for m in failed.values()):
        raise NoSuchBucket(bucket)


def _info(bucket: str, key: str, cand: _Candidate, secret: Mapping[str, Any] | None) -> ObjectInfo:
    v = next(iter(cand.holders.values()))
    meta = v["meta"]
    return ObjectInfo(bucket=bucket, key=key, size=int(meta.get("size", 0)), version=cand.version,
                      object_id=cand.object_id, chunks=int(meta.get("chunks", 0)),
                      chunk_size=int(meta.get("chunk_size", 0)), link_cipher=meta.get("link_cipher", "otp"),
                      committed_at=float(v["committed_at"]), holders=tuple(sorted(cand.holders)),
                      user_meta=dict((secret or {}).get("meta", {})), found=(cand, secret))


def _known_size(source: Any, size: int | None) -> int | None:
    """The bytes left in ``source`` when known without reading it (None: unknown)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return memoryview(source).nbytes
    if size is not None:
        return size
    try:
        st = os.fstat(source.fileno())
        if stat.S_ISREG(st.st_mode):
            return max(st.st_size - source.tell(), 0)
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _check_user_meta(meta: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(meta or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
        raise LocalError("metadata keys and values must be strings")
    if len(json.dumps(out).encode()) > MAX_META_BYTES:
        raise LocalError(f"metadata longer than {MAX_META_BYTES} bytes")
    return out


def _end_now(q: asyncio.Queue[bytes | None]) -> None:
    """End a sender's queue at once, dropping what it had not sent (the upload is being aborted)."""
    while not q.empty():
        q.get_nowait()
    q.put_nowait(None)


async def _emit(data: bytes | memoryview, sink: Any, digest: Any, progress: Progress | None) -> int:
    if digest is not None:
        digest.update(data)
    if inspect.isawaitable(written := sink.write(data)):
        await written
    if progress is not None:
        progress(len(data))
    return len(data)


class _Reader:
    """Chunks of a bytes object or a binary file, each at most ``size`` bytes; counts the total."""

    def __init__(self, source: bytes | bytearray | memoryview | BinaryIO, size: int):
        self.size = size
        self.total = 0
        self.is_async = False
        if isinstance(source, bytes | bytearray | memoryview):
            self._mem: memoryview | None = memoryview(source).cast("B")
            self._file = None
        elif inspect.iscoroutinefunction(getattr(source, "read", None)):
            self._mem, self._file, self.is_async = None, source, True  # e.g. an aiohttp request body
            self._buf = np.empty(size, dtype=np.uint8)
        elif hasattr(source, "readinto") or hasattr(source, "read"):
            self._mem, self._file = None, source
            self._buf = np.empty(size, dtype=np.uint8)
        else:
            raise LocalError("source must be bytes or a binary file object")
        self._done = False

    async def aread(self) -> memoryview | None:
        """The next chunk of an async source (``await source.read(n)``; b"" at the end)."""
        if self._done:
            return None
        view = memoryview(self._buf)
        got = 0
        while got < self.size:
            piece = await self._file.read(self.size - got)  # type: ignore[union-attr]
            if not piece:
                self._done = True
                break
            if got + len(piece) > self.size:
                raise LocalError("source returned more bytes than asked")
            view[got : got + len(piece)] = piece
            got += len(piece)
        if not got:
            return None
        self.total += got
        return view[:got]

    def read(self) -> memoryview | None:
        if self._done:
            return None
        if self._mem is not None:
            out = self._mem[self.total : self.total + self.size]
            if len(out) < self.size:
                self._done = True
            if not len(out):
                return None
        else:
            view = memoryview(self._buf)
            got = 0
            while got < self.size:
                if hasattr(self._file, "readinto"):
                    n = self._file.readinto(view[got:])  # type: ignore[union-attr]
                else:
                    piece = self._file.read(self.size - got)  # type: ignore[union-attr]
                    n = len(piece)
                    view[got : got + n] = piece
                if not n:
                    self._done = True
                    break
                got += n
            out = view[:got]
            if not got:
                return None
        self.total += len(out)
        return out
