"""A simulated KME: the ETSI GS QKD 014 REST API over mutual TLS (aiohttp shell).

Handlers only identify the caller, parse, call :class:`~qkd_sim.relay.RelayKME`
(a :class:`~qkd_sim.etsi014.KMECore` with trusted-node relay) and map errors
to responses; all key logic is sans-IO in :mod:`qkd_sim.etsi014`,
:mod:`qkd_sim.relay` and :mod:`qkd_sim.pool`. The calling SAE is the Common
Name of its TLS client certificate (:func:`qkd_sim.pki.sae_id_from_peercert`),
a calling KME the ``urn:qstore:kme:`` URI of its certificate
(:func:`qkd_sim.relay.kme_id_from_peercert`): KME certificates get 401 on the
SAE API, SAE certificates 401 on the relay endpoint. The TLS layer already
refuses certificates not issued by the cluster CA.

Routes::

    GET       /api/v1/keys/{slave_SAE_ID}/status
    GET|POST  /api/v1/keys/{slave_SAE_ID}/enc_keys    GET: ?number=&size=
    GET|POST  /api/v1/keys/{master_SAE_ID}/dec_keys   GET: ?key_ID=
    POST      /kme/v1/relay                           KME to KME: one relay envelope
    GET       /kme/v1/links                           read-only pool figures of each QKD link
    GET       /health
    GET       /metrics                                Prometheus text format, any cluster certificate
                                                      (names: :class:`qstore.telemetry.KMEMetrics`)

Key relay: when the slave SAE's KME is reached through others
(``KMEConfig.routes``), ``enc_keys`` answers only after the next hop (at
``KMEConfig.peers``) has answered the relay 200, so after the destination
KME stored the keys; a hop that fails gives the SAE a 503 naming it. Calls
to other KMEs go through one aiohttp session per KME (made in ``cleanup_ctx``)
that presents this KME's own certificate (a ``kind="kme"`` certificate is a
client certificate too); the answering KME must be the hop asked, by its
certificate. The caller bounds each hop with ``relay_timeout_s``.

Errors: 400 and 503 with an ETSI Error body, 401 with none; anything
unexpected is logged and answered 503 ("Error of server side") without detail.
Pools fill lazily from the configured clock, so there is no background task.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import aiohttp
from aiohttp import web

from qkd_sim import observability, pki, relay
from qkd_sim.etsi014 import (
    JSON_PIECE,
    MAX_REQUEST_BYTES,
    EtsiError,
    KeyContainer,
    KeyIDs,
    KeyRequest,
    KMECore,
    Limits,
    dumps,
)
from qkd_sim.etsi014 import Error as EtsiErrorBody
from qkd_sim.pool import LinkConfig
from qkd_sim.relay import RelayFailed, RelayKME, RelayStep
from qstore import telemetry
from qstore._memory import keep_freed_heap
from qstore.errors import LocalError, QStoreError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class KMEConfig:
    """Everything one KME process needs.

    ``saes``: IDs of the SAEs attached to this KME. ``directory``: SAE ID →
    KME ID for every SAE of the cluster (this KME's own are added).
    ``links``: this KME's QKD links (one per peer KME, both ends configured
    with the same seed and epoch). ``clock``: seconds, ``time.time`` unless a
    test or a simulation injects another; link epochs are on this clock.
    ``local_seed``: seed of the pool for pairs of SAEs both attached here
    (random when None).

    Trusted-node relay: ``routes`` maps a KME this one has no link with to
    the linked KME that is the next hop toward it
    (:func:`qkd_sim.relay.next_hops` computes it from the KME-level links);
    ``peers`` maps KME IDs to base URLs (``https://host:port``) and needs every
    next hop, and the linked KMEs that relays passing through here go on to.
    ``relay_timeout_s`` bounds each hop's call (the whole rest of the route).
    KME-to-KME calls present ``cert``, which must be a ``kind="kme"`` certificate.
    """

    kme_id: str
    saes: frozenset[str]
    directory: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    links: tuple[LinkConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    cert: Path
    key: Path
    ca: Path
    host: str = "127.0.0.1"
    port: int = 0
    clock: Clock = field(default=time.time, repr=False, compare=False)
    local_seed: bytes | None = field(default=None, repr=False)
    routes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    peers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    relay_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "saes", frozenset(self.saes))
        object.__setattr__(self, "directory", MappingProxyType(dict(self.directory)))
        object.__setattr__(self, "routes", MappingProxyType(dict(self.routes)))
        peers = {}
        for kme_id, url in dict(self.peers).items():
            if not isinstance(url, str) or not url.startswith("https://"):
                raise LocalError(f"peers[{kme_id!r}] must be an https:// URL")
            peers[kme_id] = url.rstrip("/")
        object.__setattr__(self, "peers", MappingProxyType(peers))
        for dest, hop in self.routes.items():
            if hop not in self.peers:
                raise LocalError(f"route to {dest} via {hop}: peers has no URL for {hop}")
        if not (isinstance(self.relay_timeout_s, int | float) and self.relay_timeout_s > 0):
            raise LocalError("relay_timeout_s must be > 0")
        object.__setattr__(self, "links", tuple(self.links))
        for name in ("cert", "key", "ca"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise LocalError("port must be in [0, 65535] (0: any free port)")
        if not callable(self.clock):
            raise LocalError("clock must be a callable returning seconds")
        if not all(isinstance(link, LinkConfig) for link in self.links):
            raise LocalError("links must be LinkConfig objects")

    def core(self) -> KMECore:
        """The sans-IO KME this config describes (validates IDs, links and limits)."""
        return KMECore(kme_id=self.kme_id, saes=self.saes, directory=self.directory, links=self.links,
                       limits=self.limits, local_seed=self.local_seed)

    def relay(self) -> RelayKME:
        """The sans-IO KME with trusted-node relay over :meth:`core` (validates the routes too)."""
        return RelayKME(self.core(), routes=self.routes)


CONFIG = web.AppKey("config", KMEConfig)
CORE = web.AppKey("core", KMECore)
KME = web.AppKey("kme", RelayKME)
SESSION = web.AppKey("relay_session", aiohttp.ClientSession)
PEER_SSL = web.AppKey("peer_ssl", dict[str, ssl.SSLContext])
METRICS = web.AppKey("metrics", telemetry.KMEMetrics)

T = TypeVar("T")


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


async def _keys(request: web.Request, container: KeyContainer) -> web.StreamResponse:
    """A Key container answer: the bytes of ``_json(container.to_json())``, sent as they are written.

    A large container goes out piece by piece (:meth:`KeyContainer.json_pieces`,
    with a Content-Length), so that the SAE decodes one piece while the next
    is encoded, and no whole body is ever held. The status is sent with the
    first piece: by then the request has been served (keys are handed out
    all or nothing before), so nothing but the connection can fail.
    """
    if container.key_bytes <= JSON_PIECE // 2:
        return web.Response(body=container.to_json_bytes(), content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = container.json_length()
    await response.prepare(request)
    try:
        for piece in container.json_pieces():
            await response.write(piece)
        await response.write_eof()
    except ConnectionError:  # the SAE went away; its keys are spent, as if it had read them
        log.info("KME %s: connection lost while sending keys", request.app[CONFIG].kme_id)
    return response


def _error(status: int, exc: BaseException | str) -> web.Response:
    body = EtsiErrorBody(message=exc) if isinstance(exc, str) else EtsiErrorBody.of(exc)
    return _json(body.to_json(), status)


@web.middleware
async def _etsi_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map errors to ETSI answers: 401 bare, 400/503 with an Error body."""
    try:
        return await handler(request)
    except QStoreError as exc:
        observability.note_error(request, type(exc).__name__)
        if exc.status == 401:
            return web.Response(status=401)
        status = exc.status if exc.status in (400, 503) else 400 if 400 <= exc.status < 500 else 503
        return _error(status, exc)
    except web.HTTPRequestEntityTooLarge:
        observability.note_error(request, "RequestTooLarge")
        return _error(400, f"request body longer than {MAX_REQUEST_BYTES} bytes")
    except web.HTTPException:
        raise
    except Exception:
        observability.note_error(request, "InternalError")
        kme_id = request.app[CONFIG].kme_id
        log.exception("KME %s: internal error on %s %s", kme_id, request.method, request.path)
        return _error(503, "internal error")


def _peercert(transport: asyncio.BaseTransport | None) -> object:
    return None if transport is None else transport.get_extra_info("peercert")


def caller_of(request: web.Request) -> str | None:
    """The SAE ID in the verified TLS client certificate of this request, if any."""
    return pki.sae_id_from_peercert(_peercert(request.transport))


def kme_caller_of(request: web.Request) -> str | None:
    """The KME ID in the verified TLS client certificate of this request, if any."""
    return relay.kme_id_from_peercert(_peercert(request.transport))


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit``."""
    chunks, total = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _send_relay(app: web.Application, step: RelayStep[T]) -> T:
    """POST one relay envelope to the next hop and let the step judge the answer."""
    config = app[CONFIG]
    hop = step.next_KME_ID
    try:
        base = config.peers.get(hop)
        if base is None:
            return step.unreachable(f"no URL is configured for KME {hop}")
        try:
            async with asyncio.timeout(config.relay_timeout_s):
                async with app[SESSION].post(base + relay.RELAY_PATH, data=step.envelope,
                                             ssl=app[PEER_SSL][hop],
                                             headers={"Content-Type": "application/octet-stream"}) as resp:
                    status = resp.status
                    body = await _read_limited(resp.content, relay.MAX_ANSWER_BYTES)
        except aiohttp.ClientConnectorCertificateError:
            return step.unreachable(f"the server at {base} is not KME {hop}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return step.unreachable(f"KME {hop} at {base} did not answer ({type(exc).__name__})")
        if body is None:
            return step.unreachable(f"KME {hop} sent an answer longer than {relay.MAX_ANSWER_BYTES} bytes")
        return step.finish(status, body, answered_by=hop)  # the TLS handshake checked who answered
    except RelayFailed as exc:
        log.warning("KME %s: %s", config.kme_id, exc)
        raise


def peer_ssl_context(cert: str | Path, key: str | Path, ca: str | Path, peer: str) -> ssl.SSLContext:
    """Client context for calls to KME ``peer``: presents ``cert``, and the handshake fails
    unless the server's certificate is ``peer``'s (its ``urn:qstore:kme:`` URI, not just a host name).
    """
    ctx = pki.client_ssl_context(cert, key, ca)

    class _ServerIsPeer(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            if relay.kme_id_from_peercert(self.getpeercert()) != peer:
                raise ssl.SSLCertVerificationError(f"the server is not KME {peer}")

    ctx.sslobject_class = _ServerIsPeer
    return ctx


async def _relay_session(app: web.Application) -> AsyncIterator[None]:
    """The client session for calls to other KMEs, with a TLS context per peer KME."""
    config = app[CONFIG]
    app[PEER_SSL] = {peer: peer_ssl_context(config.cert, config.key, config.ca, peer)
                     for peer in config.peers}
    async with aiohttp.ClientSession(trace_configs=[observability.propagate_request_ids()]) as session:
        app[SESSION] = session
        yield


async def _status(request: web.Request) -> web.Response:
    kme = request.app[KME]
    caller = kme.core.authorize(caller_of(request))
    status = kme.status(caller, request.match_info["slave_SAE_ID"], request.app[CONFIG].clock())
    return _json(status.to_json())


async def _enc_keys(request: web.Request) -> web.Response:
    kme = request.app[KME]
    caller = kme.core.authorize(caller_of(request))
    if request.method == "POST":
        # Every Key request parameter is optional: an empty body asks for the defaults.
        key_request = KeyRequest.from_json(await request.read() or b"{}")
    else:
        key_request = KeyRequest.from_query(request.query)
    now = request.app[CONFIG].clock()
    container = kme.enc_keys(caller, request.match_info["slave_SAE_ID"], key_request, now)
    if isinstance(container, RelayStep):
        container = await _send_relay(request.app, container)
    _delivered(request, caller, request.match_info["slave_SAE_ID"], "enc", container)
    return await _keys(request, container)


async def _dec_keys(request: web.Request) -> web.Response:
    kme = request.app[KME]
    caller = kme.core.authorize(caller_of(request))
    if request.method == "POST":
        key_ids = KeyIDs.from_json(await request.read())
    else:
        key_ids = KeyIDs.from_query(request.query)
    now = request.app[CONFIG].clock()
    container = kme.dec_keys(caller, request.match_info["master_SAE_ID"], key_ids, now)
    _delivered(request, caller, request.match_info["master_SAE_ID"], "dec", container)
    return await _keys(request, container)


def _delivered(request: web.Request, sae: str, peer_sae: str, direction: str,
               container: KeyContainer) -> None:
    """Count keys handed out (the peer SAE is a known one: the KME served the request)."""
    request.app[METRICS].delivered(sae, peer_sae, direction, keys=len(container.keys),
                                   nbytes=container.key_bytes)


async def _relay(request: web.Request) -> web.Response:
    kme = request.app[KME]
    caller = kme.authorize_kme(kme_caller_of(request))
    envelope = await _read_limited(request.content, relay.MAX_ENVELOPE_BYTES)
    if envelope is None:
        raise EtsiError(f"relay envelope longer than {relay.MAX_ENVELOPE_BYTES} bytes")
    outcome = kme.receive(caller, envelope, request.app[CONFIG].clock())
    if isinstance(outcome, RelayStep):
        outcome = await _send_relay(request.app, outcome)
    return _json(outcome)


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "KME_ID": request.app[CONFIG].kme_id})


async def _links(request: web.Request) -> web.Response:
    """Pool figures of this KME's QKD links, for `qstore cluster status`: any cluster certificate may read
    them (they are what Get status tells an SAE, for every link); bits, ``rate_bps`` null = unlimited."""
    if caller_of(request) is None and kme_caller_of(request) is None:
        return web.Response(status=401)
    core, now = request.app[CORE], request.app[CONFIG].clock()
    links = []
    for peer in sorted(core.peers):
        out, inbound = core.outbound(peer), core.inbound(peer)
        links.append({"peer_KME_ID": peer, "rate_bps": out.rate_bps if out.rate_bps < float("inf") else None,
                      "capacity_bits": int(out.capacity_bits), "available_bits": int(out.available_bits(now)),
                      "delivered_bits": out.delivered_bits, "retrieved_bits": inbound.retrieved_bits})
    return _json({"KME_ID": core.kme_id, "links": links})


def _link_values(app: web.Application) -> telemetry.Values:
    """The figures of :data:`qstore.telemetry.KME_FAMILIES`, read from the pools now."""
    core, kme, now = app[CORE], app[KME], app[CONFIG].clock()
    values: dict[str, list[tuple[tuple[str, ...], float]]] = {f.name: [] for f in telemetry.KME_FAMILIES}
    for peer in sorted(core.peers):
        out, inbound = core.outbound(peer), core.inbound(peer)
        for family, value in ((telemetry.KME_POOL_AVAILABLE, out.available_bits(now)),
                              (telemetry.KME_POOL_CAPACITY, out.capacity_bits),
                              (telemetry.KME_LINK_RATE, out.rate_bps),
                              (telemetry.KME_LINK_DELIVERED, out.delivered_bits),
                              (telemetry.KME_LINK_RETRIEVED, inbound.retrieved_bits)):
            values[family.name].append(((peer,), value))
    values[telemetry.KME_RELAY_SENT.name] = [((peer,), bits) for peer, bits in sorted(kme.spent_bits.items())]
    values[telemetry.KME_RELAY_RECEIVED.name] = [((peer,), bits)
                                                 for peer, bits in sorted(kme.received_bits.items())]
    values[telemetry.KME_RELAY_STORED.name] = [((), kme.store.stored_bits)]
    return values


def create_app(config: KMEConfig) -> web.Application:
    """The KME's aiohttp application (TLS is the server's: see :func:`start` and :func:`serve`)."""
    app = web.Application(middlewares=[_etsi_errors], client_max_size=MAX_REQUEST_BYTES)
    app[CONFIG] = config
    app[KME] = config.relay()
    app[CORE] = app[KME].core
    app[METRICS] = telemetry.KMEMetrics(config.kme_id, lambda: _link_values(app))
    observability.install(app, app[METRICS])
    app.cleanup_ctx.append(_relay_session)
    app.router.add_get("/health", _health)
    app.router.add_get("/api/v1/keys/{slave_SAE_ID}/status", _status)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/api/v1/keys/{slave_SAE_ID}/enc_keys", _enc_keys)
        app.router.add_route(method, "/api/v1/keys/{master_SAE_ID}/dec_keys", _dec_keys)
    app.router.add_post(relay.RELAY_PATH, _relay)
    app.router.add_get("/kme/v1/links", _links)
    return app


@dataclass
class RunningKME:
    """A KME listening on a socket; ``url`` is its base (``https://host:port``)."""

    config: KMEConfig
    runner: web.AppRunner
    url: str

    @property
    def core(self) -> KMECore:
        return self.runner.app[CORE]

    @property
    def relay(self) -> RelayKME:
        return self.runner.app[KME]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start(config: KMEConfig, *, sock: socket.socket | None = None) -> RunningKME:
    """Start a KME on ``config.host:config.port`` (port 0: a free one) in the running loop.

    ``sock``: listen on this bound socket instead, so that KMEs which name each
    other in ``peers`` can be given their addresses before any of them starts.
    """
    keep_freed_heap()
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        ssl_context = pki.server_ssl_context(config.cert, config.key, config.ca)
        site: web.BaseSite
        if sock is None:
            site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        else:
            site = web.SockSite(runner, sock, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return RunningKME(config, runner, f"https://{host}:{port}")


def serve(config: KMEConfig) -> None:
    """Run one KME until interrupted (blocking; for a standalone process). Port 0: any free one, logged.

    Logs go to stderr as JSON lines (:func:`qstore.telemetry.configure_json_logging`), one access line
    per request among them.
    """
    telemetry.configure_json_logging(static={"service": "kme", "instance": config.kme_id})
    keep_freed_heap()
    web.run_app(
        create_app(config), host=config.host, port=config.port,
        ssl_context=pki.server_ssl_context(config.cert, config.key, config.ca), access_log=None,
        print=lambda msg: log.info("KME %s: %s", config.kme_id, msg),
    )


def directory_of(kmes: Iterable[tuple[str, Iterable[str]]]) -> dict[str, str]:
    """SAE → KME table from (KME ID, its SAE IDs) pairs."""
    return {sae: kme for kme, saes in kmes for sae in saes}
