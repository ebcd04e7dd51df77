"""The aiohttp shell of :mod:`qstore.telemetry`, shared by the KME, the node and the S3 gateway.

It lives here, with the lowest service (the KME), so that nodes and clients
depend on qkd_sim and never the other way round.

:func:`install` gives an app a middleware (outermost) that names each request
(``X-Request-ID``: the caller's when it is a short safe token, else a new
one; sent back on every response and set in :data:`qstore.telemetry.request_id`
so that every log line of the request carries it), counts and times it by
operation, and writes one access line (logger ``qstore.access``: method, path
without its query, operation, status, duration, body bytes, the calling
SAE); and a route serving the app's registry in the Prometheus text format.
Error middlewares name what they answered with :func:`note_error`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from qkd_sim import pki, relay
from qstore import telemetry
from qstore.telemetry import REQUEST_ID_HEADER, ServiceMetrics

access_log = logging.getLogger("qstore.access")

Operation = Callable[[web.Request], str | None]
Hook = Callable[[web.Application], Awaitable[None]]
# Scrapes and probes, and the data path's requests (one per key request, share frame or MPC message:
# thousands per second under load, counted and timed in the metrics): access lines at DEBUG only.
_QUIET = frozenset({"metrics", "health", "enc_keys", "dec_keys", "relay", "put_chunk", "get_chunk",
                    "oneshot", "table_part", "mpc_message"})


@dataclass
class Telemetry:
    """An app's metrics and how its requests are named."""

    metrics: ServiceMetrics
    operation: Operation | None = None
    require_client_cert: bool = True
    before_scrape: list[Hook] = field(default_factory=list)


def propagate_request_ids() -> aiohttp.TraceConfig:
    """For a client session: every request carries the ID of the request being served, so one ID follows
    an S3 request through the gateway, the nodes and the KMEs in all their log lines."""

    async def start(session: aiohttp.ClientSession, ctx: object,
                    params: aiohttp.TraceRequestStartParams) -> None:
        rid = telemetry.request_id.get()
        if rid is not None and REQUEST_ID_HEADER not in params.headers:
            params.headers[REQUEST_ID_HEADER] = rid

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(start)
    return trace


TELEMETRY = web.AppKey("telemetry", Telemetry)
_REQUEST_ID = web.RequestKey("request_id", str)
_ERROR = web.RequestKey("error", str)


def install(app: web.Application, metrics: ServiceMetrics, *, path: str = "/metrics",
            require_client_cert: bool = True, operation: Operation | None = None,
            before_scrape: Hook | None = None) -> None:
    """Request IDs, request metrics and access lines for ``app``, and ``GET path`` serving its metrics.

    ``require_client_cert``: /metrics answers 401 unless the TLS peer showed a
    certificate (the server's context already refused any not of the cluster's
    CA). ``operation``: names a request (None: the route's name, else its
    handler's without a leading underscore). ``before_scrape``: awaited before
    each scrape (figures that take a thread to read).
    """
    app[TELEMETRY] = Telemetry(metrics, operation, require_client_cert,
                               [before_scrape] if before_scrape is not None else [])
    app.middlewares.insert(0, _observe)
    app.on_response_prepare.append(_stamp)
    app.router.add_get(path, _metrics, name="metrics")


def note_error(request: web.Request, name: str) -> None:
    """What the request was answered with, for ``qstore_<s>_errors_total{error}`` (a class or S3 code)."""
    request[_ERROR] = name


def current_request_id(request: web.Request) -> str | None:
    return request.get(_REQUEST_ID)


def operation_of(request: web.Request) -> str:
    """The route's name, else its handler's (``_enc_keys`` → ``enc_keys``); ``unmatched`` without a route."""
    tel = request.app.get(TELEMETRY)
    if tel is not None and tel.operation is not None:
        named = tel.operation(request)
        if named:
            return named
    info = request.match_info
    if getattr(info, "http_exception", None) is not None:
        return "unmatched"
    route = info.route
    if route.name:
        return route.name
    return getattr(route.handler, "__name__", "unknown").lstrip("_") or "unknown"


def _caller(request: web.Request) -> str | None:
    transport = request.transport
    cert = None if transport is None else transport.get_extra_info("peercert")
    return pki.sae_id_from_peercert(cert) or relay.kme_id_from_peercert(cert)


def _sent(request: web.Request, response: web.StreamResponse | None, status: int) -> int:
    if response is None or request.method == "HEAD" or status in (204, 304) or status < 200:
        return 0
    if response.content_length is not None:
        return response.content_length
    return response.body_length if response.prepared else 0


@web.middleware
async def _observe(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    tel = request.app[TELEMETRY]
    rid = telemetry.request_id_for(request.headers.get(REQUEST_ID_HEADER))
    request[_REQUEST_ID] = rid
    token = telemetry.request_id.set(rid)
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    status, error = 500, None
    tel.metrics.http.in_progress.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status, error = exc.status, type(exc).__name__
        raise
    except asyncio.CancelledError:
        status, error = 499, "ClientClosedRequest"  # the client went away (nginx's 499)
        raise
    except Exception as exc:
        error = type(exc).__name__
        raise
    finally:
        try:
            seconds = time.perf_counter() - started
            operation = operation_of(request)
            received = request.content.total_bytes
            sent = _sent(request, response, status)
            tel.metrics.http.observe(operation=operation, method=request.method, status=status,
                                     seconds=seconds, received=received, sent=sent,
                                     error=request.get(_ERROR) or error)
            level = logging.DEBUG if operation in _QUIET and status < 400 else logging.INFO
            if access_log.isEnabledFor(level):  # (the caller's certificate is parsed only then)
                access_log.log(level, "%s %s %d %.1f ms", request.method, operation, status, 1000 * seconds,
                               extra={"method": request.method, "path": request.path, "operation": operation,
                                      "status": status, "duration_ms": round(1000 * seconds, 3),
                                      "bytes_in": received, "bytes_out": sent, "sae": _caller(request)})
        finally:
            tel.metrics.http.in_progress.dec()
            telemetry.request_id.reset(token)


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(_REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


async def _metrics(request: web.Request) -> web.Response:
    tel = request.app[TELEMETRY]
    if tel.require_client_cert:
        transport = request.transport
        if transport is None or not transport.get_extra_info("peercert"):
            return web.Response(status=401)
    for hook in tel.before_scrape:
        await hook(request.app)
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(tel.metrics.registry), headers={"Content-Type": content_type})
