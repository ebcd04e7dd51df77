"""A simulated KME: the ETSI GS QKD 014 REST API over mutual TLS (aiohttp shell).

Handlers only identify the caller, parse, call :class:`~qkd_sim.etsi014.KMECore`
and map errors to responses; all key logic is sans-IO in
:mod:`qkd_sim.etsi014` and :mod:`qkd_sim.pool`. The calling SAE is the
Common Name of its TLS client certificate (:func:`qkd_sim.pki.sae_id_from_peercert`);
the TLS layer already refuses certificates not issued by the cluster CA.

Routes::

    GET       /api/v1/keys/{slave_SAE_ID}/status
    GET|POST  /api/v1/keys/{slave_SAE_ID}/enc_keys    GET: ?number=&size=
    GET|POST  /api/v1/keys/{master_SAE_ID}/dec_keys   GET: ?key_ID=
    GET       /health

Errors: 400 and 503 with an ETSI Error body, 401 with none; anything
unexpected is logged and answered 503 ("Error of server side") without detail.
Pools fill lazily from the configured clock, so there is no background task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from aiohttp import web

from qkd_sim import pki
from qkd_sim.etsi014 import MAX_REQUEST_BYTES, KeyIDs, KeyRequest, KMECore, Limits, dumps
from qkd_sim.etsi014 import Error as EtsiErrorBody
from qkd_sim.pool import LinkConfig
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "saes", frozenset(self.saes))
        object.__setattr__(self, "directory", MappingProxyType(dict(self.directory)))
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


CONFIG = web.AppKey("config", KMEConfig)
CORE = web.AppKey("core", KMECore)


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


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
        if exc.status == 401:
            return web.Response(status=401)
        status = exc.status if exc.status in (400, 503) else 400 if 400 <= exc.status < 500 else 503
        return _error(status, exc)
    except web.HTTPRequestEntityTooLarge:
        return _error(400, f"request body longer than {MAX_REQUEST_BYTES} bytes")
    except web.HTTPException:
        raise
    except Exception:
        kme_id = request.app[CONFIG].kme_id
        log.exception("KME %s: internal error on %s %s", kme_id, request.method, request.path)
        return _error(503, "internal error")


def caller_of(request: web.Request) -> str | None:
    """The SAE ID in the verified TLS client certificate of this request, if any."""
    transport = request.transport
    if transport is None:
        return None
    return pki.sae_id_from_peercert(transport.get_extra_info("peercert"))


async def _status(request: web.Request) -> web.Response:
    core = request.app[CORE]
    caller = core.authorize(caller_of(request))
    status = core.status(caller, request.match_info["slave_SAE_ID"], request.app[CONFIG].clock())
    return _json(status.to_json())


async def _enc_keys(request: web.Request) -> web.Response:
    core = request.app[CORE]
    caller = core.authorize(caller_of(request))
    if request.method == "POST":
        # Every Key request parameter is optional: an empty body asks for the defaults.
        key_request = KeyRequest.from_json(await request.read() or b"{}")
    else:
        key_request = KeyRequest.from_query(request.query)
    now = request.app[CONFIG].clock()
    container = core.enc_keys(caller, request.match_info["slave_SAE_ID"], key_request, now)
    return _json(container.to_json())


async def _dec_keys(request: web.Request) -> web.Response:
    core = request.app[CORE]
    caller = core.authorize(caller_of(request))
    if request.method == "POST":
        key_ids = KeyIDs.from_json(await request.read())
    else:
        key_ids = KeyIDs.from_query(request.query)
    now = request.app[CONFIG].clock()
    container = core.dec_keys(caller, request.match_info["master_SAE_ID"], key_ids, now)
    return _json(container.to_json())


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "KME_ID": request.app[CONFIG].kme_id})


def create_app(config: KMEConfig) -> web.Application:
    """The KME's aiohttp application (TLS is the server's: see :func:`start` and :func:`serve`)."""
    app = web.Application(middlewares=[_etsi_errors], client_max_size=MAX_REQUEST_BYTES)
    app[CONFIG] = config
    app[CORE] = config.core()
    app.router.add_get("/health", _health)
    app.router.add_get("/api/v1/keys/{slave_SAE_ID}/status", _status)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/api/v1/keys/{slave_SAE_ID}/enc_keys", _enc_keys)
        app.router.add_route(method, "/api/v1/keys/{master_SAE_ID}/dec_keys", _dec_keys)
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

    async def close(self) -> None:
        await self.runner.cleanup()


async def start(config: KMEConfig) -> RunningKME:
    """Start a KME on ``config.host:config.port`` (port 0: a free one) in the running loop."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port,
                           ssl_context=pki.server_ssl_context(config.cert, config.key, config.ca))
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return RunningKME(config, runner, f"https://{host}:{port}")


def serve(config: KMEConfig) -> None:
    """Run one KME until interrupted (blocking; for a standalone process). Port 0: any free one, logged."""
    web.run_app(
        create_app(config), host=config.host, port=config.port,
        ssl_context=pki.server_ssl_context(config.cert, config.key, config.ca),
        print=lambda msg: log.info("KME %s: %s", config.kme_id, msg),
    )


def directory_of(kmes: Iterable[tuple[str, Iterable[str]]]) -> dict[str, str]:
    """SAE → KME table from (KME ID, its SAE IDs) pairs."""
    return {sae: kme for kme, saes in kmes for sae in saes}
