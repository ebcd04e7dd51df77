"""The SAE side of ETSI GS QKD 014: an async client of its KME over mutual TLS.

:class:`SAEClient` speaks the three methods (``get_status``,
``get_enc_keys``, ``get_dec_keys``) and returns keys as
:class:`qstore.otp.QKDKey`. When the KME answers 503 (the link's pool is dry,
or a key is not at this end yet) it backs off exponentially up to
``SAEConfig.wait_s`` and then raises :class:`KeySupplyExhausted`, which names
the SAE pair and the KMEs of the link that ran dry.

Requests go over :class:`qkd_sim.https_pool.HTTPSPool`, which decrypts the
KME's answers straight into a reused buffer that the Key container reader
decodes from (an SAE's cost is in the megabytes of base64 it receives).

Per peer it keeps a key buffer so that HTTP round trips do not bound
throughput: :meth:`SAEClient.sender` tops up a :class:`~qstore.otp.KeyStream`
for a slave SAE with batched ``enc_keys`` requests, and
:meth:`SAEClient.receiver` fetches the keys an envelope names with
``dec_keys`` in batches. Buffered key material lives only in those streams
(wiped on :meth:`SAEClient.close`), never on disk; logs and exceptions carry
key_IDs and counts, never key bytes.

Usage::

    async with SAEClient(config) as sae:
        stream = await sae.sender("b1").ensure(32 + len(frame))
        envelope = otp.seal(frame, stream)
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

from qkd_sim import pki
from qkd_sim.etsi014 import Error as ErrorBody
from qkd_sim.etsi014 import (
    EtsiError,
    KeyContainerReader,
    KeyIDs,
    KeyRequest,
    Status,
    canonical_key_id,
    dumps,
    is_id,
)
from qkd_sim.https_pool import BodyTooLarge, HTTPSPool, Sink, TransportError
from qstore import telemetry
from qstore._memory import keep_freed_heap
from qstore.errors import LocalError, RemoteError
from qstore.otp import KeyRef, KeyStream, QKDKey

log = logging.getLogger(__name__)

T = TypeVar("T")

_API = "/api/v1/keys"
_SMALL_BODY = 1 << 20


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """One SAE's identity, its KME and its key-buffer policy.

    ``key_size``: bits per key asked by the send buffers (None: the KME's
    default). ``batch``: at least this many keys per top-up. ``wait_s``: how
    long to keep retrying on 503 before giving up; ``backoff_s`` doubles up to
    ``backoff_max_s`` between tries. ``kme_id`` names the KME in messages
    (learnt from its status answers when None).
    """

    sae_id: str
    kme_url: str
    cert: Path
    key: Path
    ca: Path
    kme_id: str | None = None
    key_size: int | None = None
    batch: int = 16
    wait_s: float = 30.0
    backoff_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not is_id(self.sae_id):
            raise LocalError("sae_id must be 1-64 characters of [A-Za-z0-9._-]")
        if not isinstance(self.kme_url, str) or not self.kme_url.startswith("https://"):
            raise LocalError("kme_url must be an https:// URL")
        object.__setattr__(self, "kme_url", self.kme_url.rstrip("/"))
        for name in ("cert", "key", "ca"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.key_size is not None and (self.key_size <= 0 or self.key_size % 8):
            raise LocalError("key_size must be a positive multiple of 8 bits")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise LocalError("batch must be a positive integer")
        if not (self.wait_s >= 0 and 0 < self.backoff_s <= self.backoff_max_s):
            raise LocalError("need wait_s >= 0 and 0 < backoff_s <= backoff_max_s")


class KMEError(RemoteError):
    """The KME refused a request or could not be reached.

    ``kme_status`` is the KME's HTTP status (None when unreachable), ``details``
    the ETSI Error details. ``status`` (502) is what a service built on this
    client should answer its own caller.
    """

    status = 502

    def __init__(self, message: str, *, kme_status: int | None, details: Iterable[Mapping[str, Any]] = ()):
        self.kme_status = kme_status
        self.details = tuple(details)
        super().__init__(message)


class KeySupplyExhausted(KMEError):
    """A link kept answering 503 until the deadline: the operation fails cleanly (503)."""

    status = 503

    def __init__(self, *, master: str, slave: str, link: str, waited_s: float, reason: str):
        self.master = master
        self.slave = slave
        self.link = link
        self.waited_s = waited_s
        super().__init__(
            f"no QKD key for SAE {master} → SAE {slave} (link {link}) after {waited_s:.1f} s: {reason}",
            kme_status=503,
        )


class _Unavailable(Exception):
    """One 503 answer (retried by the caller)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


def _container_limit(number: int, size_bits: int) -> int:
    """Bound on a Key container body for ``number`` keys of ``size_bits``."""
    return number * (4 * math.ceil(size_bits / 24) + 256) + 4096


class SAEClient:
    """An SAE's connection to its KME (use as ``async with``): keep-alive mutual-TLS connections."""

    def __init__(self, config: SAEConfig):
        self.config = config
        self._pool: HTTPSPool | None = None
        self._status: dict[str, Status] = {}
        self._senders: dict[str, SendBuffer] = {}
        self._receivers: dict[str, ReceiveBuffer] = {}

    def __repr__(self) -> str:
        return f"SAEClient({self.config.sae_id} @ {self.config.kme_url})"

    async def __aenter__(self) -> SAEClient:
        keep_freed_heap()
        if self._pool is None:
            ctx = pki.client_ssl_context(self.config.cert, self.config.key, self.config.ca)
            self._pool = HTTPSPool(self.config.kme_url, ctx)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Wipe every buffered key and close the connections."""
        for buf in [*self._senders.values(), *self._receivers.values()]:
            buf.stream.wipe()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def kme_name(self) -> str:
        return self.config.kme_id or next((s.source_KME_ID for s in self._status.values()),
                                          self.config.kme_url)

    # -- HTTP -------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, limit: int, body: object = None,
                    sink: Sink | None = None) -> bytes:
        """The body of a 200 answer (fed to ``sink`` instead, if given); the ETSI errors raised."""
        if self._pool is None:
            raise LocalError("use the SAEClient inside 'async with'")
        headers = [("Accept", "application/json")]
        data = b""
        if body is not None:
            data = dumps(body)
            headers.append(("Content-Type", "application/json"))
        rid = telemetry.request_id.get()
        if rid is not None:  # one ID follows a request through the gateway, the nodes and the KMEs
            headers.append((telemetry.REQUEST_ID_HEADER, rid))
        try:
            answer = await self._pool.request(method, path, headers=headers, body=data, limit=limit,
                                              sink=sink, other_limit=_SMALL_BODY)
        except BodyTooLarge as exc:
            raise KMEError(f"KME {self.kme_name}: {exc}", kme_status=exc.status) from None
        except TransportError as exc:
            raise KMEError(f"cannot reach KME at {self.config.kme_url}: {exc}", kme_status=None) from None
        status, payload = answer.status, answer.body
        if status == 200:
            return payload
        if status == 401:
            raise KMEError(f"KME {self.kme_name} refused SAE {self.config.sae_id} (401 Unauthorized)",
                           kme_status=401)
        try:
            err = ErrorBody.from_json(payload)
            message, details = err.message, err.details
        except EtsiError:
            message, details = f"HTTP {status}", ()
        if status == 503:
            raise _Unavailable(message)
        raise KMEError(f"KME {self.kme_name} answered {status}: {message}",
                       kme_status=status, details=details)

    def _link(self, peer: str, *, outbound: bool) -> str:
        """``KME → KME`` in the direction keys flow, as far as we know the peer's KME."""
        status = self._status.get(peer)
        if status is None:
            return f"KME {self.kme_name}"
        ends = (status.source_KME_ID, status.target_KME_ID)
        link = " → ".join(ends if outbound else ends[::-1])
        relay = (status.status_extension or {}).get("relay")
        if isinstance(relay, dict) and is_id(relay.get("next_hop_KME_ID")):
            return f"{link}, relayed via {relay['next_hop_KME_ID']}"  # the reason names the hop that failed
        return link

    async def _retrying(self, call: Callable[[], Awaitable[T]], *, master: str, slave: str,
                        peer: str, outbound: bool) -> T:
        """Run ``call()`` again on 503, backing off, until ``wait_s`` has passed."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = self.config.backoff_s
        while True:
            try:
                return await call()
            except _Unavailable as exc:
                waited = loop.time() - started
                remaining = self.config.wait_s - waited
                if remaining <= 0:
                    link = self._link(peer, outbound=outbound)
                    raise KeySupplyExhausted(master=master, slave=slave, link=link, waited_s=waited,
                                             reason=exc.message) from None
                log.info("SAE %s: KME %s has no key for %s → %s yet (%s); retrying in %.2f s",
                         self.config.sae_id, self.kme_name, master, slave, exc.message, min(delay, remaining))
                await asyncio.sleep(min(delay, remaining))
                delay = min(2 * delay, self.config.backoff_max_s)

    @staticmethod
    def _path(sae: str, method: str) -> str:
        if not is_id(sae):
            raise LocalError("an SAE ID is 1-64 characters of [A-Za-z0-9._-]")
        return f"{_API}/{quote(sae, safe='')}/{method}"

    # -- the three ETSI methods -------------------------------------------------

    async def get_status(self, slave: str) -> Status:
        """Get status for keys this SAE (master) can obtain for ``slave``. Cached for the buffers."""
        payload = await self._call("GET", self._path(slave, "status"), limit=_SMALL_BODY)
        try:
            status = Status.from_json(payload)
        except EtsiError as exc:
            raise KMEError(f"KME sent a malformed Status: {exc}", kme_status=200) from None
        self._status[slave] = status
        return status

    async def limits(self, peer: str) -> Status:
        """The KME's status for ``peer``, asked once."""
        status = self._status.get(peer)
        return status if status is not None else await self.get_status(peer)

    async def get_enc_keys(self, slave: str, number: int = 1, size: int | None = None) -> list[QKDKey]:
        """Get key: ``number`` new keys of ``size`` bits (None: the KME's default) shared with ``slave``."""
        request = KeyRequest(number=number, size=size)
        size_bits = size if size is not None else (await self.limits(slave)).key_size
        limit = _container_limit(number, size_bits)

        async def call() -> list[QKDKey]:
            reader = KeyContainerReader(limit=limit, key_bytes=size_bits // 8)
            await self._call("POST", self._path(slave, "enc_keys"), body=request.to_json(), limit=limit,
                             sink=reader.feed)
            return self._keys(reader)

        keys = await self._retrying(call, master=self.config.sae_id, slave=slave, peer=slave, outbound=True)
        if len(keys) != number or len({k.key_id for k in keys}) != number:
            raise KMEError(f"KME sent {len(keys)} distinct keys, {number} asked", kme_status=200)
        if any(8 * len(k.key) != size_bits for k in keys):
            raise KMEError(f"KME sent keys of another size than {size_bits} bits", kme_status=200)
        return keys

    async def get_dec_keys(self, master: str, key_ids: Iterable[str]) -> list[QKDKey]:
        """Get key with key IDs: the keys ``master`` obtained for this SAE, in the order asked."""
        ids = [canonical_key_id(k) for k in key_ids]
        if not ids:
            return []
        limit = _SMALL_BODY + len(ids) * _container_limit(1, 8 * 2**20)

        async def call() -> list[QKDKey]:
            reader = KeyContainerReader(limit=limit)
            await self._call("POST", self._path(master, "dec_keys"), body=KeyIDs.of(ids).to_json(),
                             limit=limit, sink=reader.feed)
            return self._keys(reader)

        keys = await self._retrying(call, master=master, slave=self.config.sae_id, peer=master,
                                    outbound=False)
        by_id = {k.key_id: k for k in keys}
        if set(by_id) != set(ids) or len(by_id) != len(ids):
            raise KMEError("KME sent other keys than the key_IDs asked", kme_status=200)
        return [by_id[k] for k in ids]

    @staticmethod
    def _keys(reader: KeyContainerReader) -> list[QKDKey]:
        try:
            container = reader.finish()
        except EtsiError as exc:
            raise KMEError(f"KME sent a malformed Key container: {exc}", kme_status=200) from None
        return [QKDKey(k.key_ID, k.key) for k in container.keys]

    # -- buffers ------------------------------------------------------------------

    def sender(self, slave: str) -> SendBuffer:
        """The send buffer of key shared with ``slave`` (this SAE as master)."""
        if slave not in self._senders:
            self._senders[slave] = SendBuffer(self, slave)
        return self._senders[slave]

    def receiver(self, master: str) -> ReceiveBuffer:
        """The receive buffer of key ``master`` shares with this SAE (as slave)."""
        if master not in self._receivers:
            self._receivers[master] = ReceiveBuffer(self, master)
        return self._receivers[master]


@dataclass(eq=False)
class _PeerBuffer:
    """Key shared with one peer SAE, and the lock that serialises fetching it."""

    client: SAEClient
    peer: str
    stream: KeyStream = field(default_factory=KeyStream)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class SendBuffer(_PeerBuffer):
    """Key for one slave SAE (the peer), topped up by batched ``enc_keys`` requests."""

    async def ensure(self, nbytes: int) -> KeyStream:
        """The stream, holding at least ``nbytes`` unused bytes (fetching what is missing)."""
        async with self._lock:
            short = nbytes - self.stream.available()
            if short > 0:
                status = await self.client.limits(self.peer)
                size = self.client.config.key_size or status.key_size
                count = max(-(-short * 8 // size), self.client.config.batch)
                while count > 0:
                    n = min(count, status.max_key_per_request)
                    for key in await self.client.get_enc_keys(self.peer, n, size):
                        self.stream.add(key)
                    count -= n
        return self.stream


class ReceiveBuffer(_PeerBuffer):
    """Key from one master SAE (the peer), fetched with ``dec_keys`` when an envelope names it."""

    async def fetch(self, refs: Iterable[KeyRef]) -> KeyStream:
        """The stream, holding every key the ``refs`` name (those not held are fetched)."""
        async with self._lock:
            missing = self.stream.missing(refs)
            if missing:
                status = await self.client.limits(self.peer)
                for i in range(0, len(missing), status.max_key_per_request):
                    batch = missing[i : i + status.max_key_per_request]
                    for key in await self.client.get_dec_keys(self.peer, batch):
                        self.stream.add(key)
        return self.stream
