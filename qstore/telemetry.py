"""What the services tell their operators: Prometheus metrics and JSON log lines (no I/O).

Every KME, storage node and S3 gateway keeps its metrics in a registry of its
own (several services share a process in tests) and serves them in the
Prometheus text format: ``GET /metrics`` on the KME and the node (mutual TLS:
any certificate of the cluster's CA), ``GET /-/metrics`` on the gateway (no
S3 signature; ``-`` cannot start a bucket name). The names are this module's
constants; :class:`Figures` reads a scrape back (``qstore cluster status``).

Request metrics, the same for every service (``<s>`` = ``kme``, ``node``, ``s3``)::

    qstore_<s>_requests_total{operation, method, status}
    qstore_<s>_errors_total{operation, error}          status >= 400; error = what the
                                                       service mapped (ETSI/S3 error, class name)
    qstore_<s>_request_duration_seconds{operation}     histogram, handler start to last byte
    qstore_<s>_received_bytes_total{operation}         request body bytes read
    qstore_<s>_sent_bytes_total{operation}             response body bytes (Content-Length)
    qstore_<s>_requests_in_progress
    qstore_service_info{service, instance}             1

``operation``: the handler's name (KME: ``enc_keys``, ``dec_keys``, ``status``,
``relay``, ...; node: ``put_chunk``, ``get_chunk``, ``commit``, ``mpc_query``,
...), the S3 operation on the gateway (``PutObject``, ``GetObject``, ...),
``unmatched`` for a path no route serves. The service-specific families are
listed with :class:`KMEMetrics`, :class:`NodeMetrics` and :class:`GatewayMetrics`.

Logs: :func:`configure_json_logging` makes every line one JSON object (time,
level, logger, message, request_id, the record's safe extras). Nothing here
logs secrets, and the formatter is a second line of defence: extras named
like secrets or holding bytes are never written, and key fields, signatures
and Authorization values are masked in messages and tracebacks
(:func:`scrub`). Request IDs live in a context variable that each service's
request middleware sets (:data:`request_id`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

# -- request IDs -----------------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("qstore_request_id", default=None)
"""The ID of the request being served in this context (None outside requests)."""


def request_id_for(incoming: str | None, *, rng: Callable[[int], bytes] = os.urandom) -> str:
    """The ID of a request: the caller's ``X-Request-ID`` when it is a short safe token, else a new one."""
    if incoming is not None and _SAFE_ID.fullmatch(incoming):
        return incoming
    return rng(8).hex()


# -- JSON log lines --------------------------------------------------------------------------------

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "request_id", "taskName"}
_SECRET_NAME = re.compile(r"secret|passw|authoriz|signature|credential|token|cookie|seed|material|share"
                          r"|^keys?$|^key_?bytes$|^otk", re.IGNORECASE)
_MASKS = (
    # an Authorization header or field, whatever follows on its line
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\n\"']+"), r"\1[redacted]"),
    # SigV4 signatures, in headers and presigned URLs
    (re.compile(r"(?i)((?:x-amz-)?signature\s*[=:]\s*)[0-9a-f]{16,}"), r"\1[redacted]"),
    # ETSI key containers and the like: "key": "<base64>"
    (re.compile(r"(?i)([\"'](?:key|secret_key|secret|aws_secret_access_key|seed)[\"']\s*:\s*)"
                r"(?:b?[\"'][^\"']*[\"']|[^\s,}]+)"), r'\1"[redacted]"'),
    # key=value forms of secrets
    (re.compile(r"(?i)\b((?:aws_)?secret(?:_access)?_key\s*=\s*)\S+"), r"\1[redacted]"),
)
MAX_FIELD_CHARS = 2000


def scrub(text: str) -> str:
    """``text`` with anything shaped like a secret (Authorization, signatures, key fields) masked."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def _safe(name: str, value: object, depth: int = 0) -> object:
    """A JSON-able rendering of an extra that cannot carry key material."""
    if _SECRET_NAME.search(name):
        return "[redacted]"
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return scrub(value[:MAX_FIELD_CHARS])
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # never the bytes themselves
    if depth < 2 and isinstance(value, Mapping):
        return {str(k): _safe(str(k), v, depth + 1) for k, v in list(value.items())[:64]}
    if depth < 2 and isinstance(value, list | tuple | set | frozenset):
        return [_safe("", v, depth + 1) for v in list(value)[:64]]
    return f"<{type(value).__name__}>"  # an object's str() may hold anything


def _message(record: logging.LogRecord) -> str:
    """The record's message, with any bytes among its arguments shown as their length only."""
    args = record.args
    if not args:
        return str(record.msg)
    if isinstance(args, Mapping):
        return str(record.msg) % {k: _bytes_hidden(v) for k, v in args.items()}
    return str(record.msg) % tuple(_bytes_hidden(a) for a in args)


def _bytes_hidden(value: object) -> object:
    return f"<{len(value)} bytes>" if isinstance(value, bytes | bytearray | memoryview) else value


def _civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of ``days`` since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm)."""
    z = days + 719468
    era, doe = divmod(z, 146097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def utc_timestamp(seconds: float) -> str:
    """RFC 3339 UTC time with milliseconds, e.g. ``2024-05-01T12:00:00.250Z``."""
    ms = math.floor(seconds * 1000)
    secs, ms = divmod(ms, 1000)
    days, rest = divmod(secs, 86400)
    year, month, day = _civil(days)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{ms:03d}Z"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the ID of the request being served (:data:`request_id`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, then safe extras.

    ``static``: fields every line carries (the service and its instance).
    Extras are the ``extra=`` fields of the log call; those named like
    secrets, and bytes, are never written (:func:`_safe`); messages and
    tracebacks are :func:`scrub`-bed.
    """

    def __init__(self, *, static: Mapping[str, str] | None = None):
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_timestamp(record.created), "level": record.levelname, "logger": record.name,
            "message": scrub(_message(record)),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            **self._static,
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and not name.startswith("_") and name not in line:
                line[name] = _safe(name, value)
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = scrub(record.exc_text)
        if record.stack_info:
            line["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def json_log_handler(stream: IO[str] | None = None, *, static: Mapping[str, str] | None = None
                     ) -> logging.Handler:
    """A handler writing JSON lines to ``stream`` (stderr), each with its request's ID."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(static=static))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_json_logging(*, level: int = logging.INFO, stream: IO[str] | None = None,
                           static: Mapping[str, str] | None = None) -> logging.Handler:
    """Make the root logger write JSON lines only (for a service run as its own process)."""
    handler = json_log_handler(stream, static=static)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler


# -- metrics ---------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
KEY_BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(13))  # 1 KiB .. 16 GiB
ROUNDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

SERVICE_INFO = "qstore_service_info"


@dataclass(frozen=True)
class Family:
    """A metric family whose values are read when scraped (see :class:`Snapshot`)."""

    name: str  # counters end in _total
    doc: str
    labels: tuple[str, ...] = ()

    @property
    def counter(self) -> bool:
        return self.name.endswith("_total")


Values = Mapping[str, Iterable[tuple[Sequence[str], float]]]


class Snapshot:
    """A collector that reads current figures when scraped: ``read()`` maps family name → (labels, value)."""

    def __init__(self, families: Sequence[Family], read: Callable[[], Values]):
        self._families = tuple(families)
        self._read = read

    def _empty(self, family: Family) -> Metric:
        kind = CounterMetricFamily if family.counter else GaugeMetricFamily
        return kind(family.name, family.doc, labels=family.labels)

    def describe(self) -> Iterator[Metric]:
        return (self._empty(f) for f in self._families)

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for family in self._families:
            metric = self._empty(family)
            for labels, value in values.get(family.name, ()):
                metric.add_metric(list(labels), float(value))
            yield metric


class HttpMetrics:
    """Requests, errors, latency and body bytes of one service, by operation (see the module docstring)."""

    def __init__(self, service: str, registry: CollectorRegistry):
        p = f"qstore_{service}"
        self.requests = Counter(f"{p}_requests", "Requests answered, by operation, method and HTTP status",
                                ["operation", "method", "status"], registry=registry)
        self.errors = Counter(f"{p}_errors", "Requests answered with a status of 400 or more (or not at "
                              "all), by operation and error name", ["operation", "error"], registry=registry)
        self.latency = Histogram(f"{p}_request_duration_seconds", "Time from the request's arrival at the "
                                 "handler to its last byte written", ["operation"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.received = Counter(f"{p}_received_bytes", "Request body bytes read", ["operation"],
                                registry=registry)
        self.sent = Counter(f"{p}_sent_bytes", "Response body bytes sent", ["operation"], registry=registry)
        self.in_progress = Gauge(f"{p}_requests_in_progress", "Requests being served", registry=registry)

    def observe(self, *, operation: str, method: str, status: int, seconds: float, received: int, sent: int,
                error: str | None) -> None:
        self.requests.labels(operation, method, str(status)).inc()
        self.latency.labels(operation).observe(seconds)
        if received:
            self.received.labels(operation).inc(received)
        if sent:
            self.sent.labels(operation).inc(sent)
        if status >= 400:
            self.errors.labels(operation, error or f"HTTP{status}").inc()


class ServiceMetrics:
    """A service's own registry with its request metrics and its ``qstore_service_info``."""

    service = ""

    def __init__(self, instance: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.http = HttpMetrics(self.service, self.registry)
        Info("qstore_service", "What this process is", registry=self.registry).info(
            {"service": self.service, "instance": instance})


# KME: figures of its links and relays, read from the pools when scraped
KME_POOL_AVAILABLE = Family("qstore_kme_key_pool_available_bits",
                            "Key stored at this end of the link toward the peer KME, not yet handed out",
                            ("peer_kme",))
KME_POOL_CAPACITY = Family("qstore_kme_key_pool_capacity_bits", "Most key the link's pool holds",
                           ("peer_kme",))
KME_LINK_RATE = Family("qstore_kme_link_rate_bits_per_second",
                       "Secure key rate of the link (+Inf: unlimited)", ("peer_kme",))
KME_LINK_DELIVERED = Family("qstore_kme_link_delivered_bits_total",
                            "Key of the link toward the peer KME handed out here (to master SAEs and "
                            "to relays sent)", ("peer_kme",))
KME_LINK_RETRIEVED = Family("qstore_kme_link_retrieved_bits_total",
                            "Key of the link from the peer KME served here (to slave SAEs and to "
                            "relays opened)", ("peer_kme",))
KME_RELAY_SENT = Family("qstore_kme_relay_sent_bits_total",
                        "Link key spent sending relay envelopes, by next-hop KME", ("peer_kme",))
KME_RELAY_RECEIVED = Family("qstore_kme_relay_received_bits_total",
                            "Link key spent opening relay envelopes, by previous-hop KME", ("peer_kme",))
KME_RELAY_STORED = Family("qstore_kme_relay_stored_bits", "Relayed key waiting for its slave SAE here")
KME_FAMILIES = (KME_POOL_AVAILABLE, KME_POOL_CAPACITY, KME_LINK_RATE, KME_LINK_DELIVERED, KME_LINK_RETRIEVED,
                KME_RELAY_SENT, KME_RELAY_RECEIVED, KME_RELAY_STORED)


class KMEMetrics(ServiceMetrics):
    """A KME's metrics: requests (``qstore_kme_*``), key handed to SAEs, and :data:`KME_FAMILIES`.

    ``qstore_kme_key_delivered_bytes_total{sae, peer_sae, direction}`` and
    ``qstore_kme_keys_delivered_total{...}``: key bytes and keys handed to
    ``sae``; ``direction`` ``enc`` (``sae`` is the master, by enc_keys) or
    ``dec`` (``sae`` is the slave, by dec_keys); ``peer_sae`` is the other
    end of the pair. ``links`` returns the :data:`KME_FAMILIES` values.
    """

    service = "kme"

    def __init__(self, instance: str, links: Callable[[], Values]):
        super().__init__(instance)
        self.key_delivered = Counter("qstore_kme_key_delivered_bytes", "Key bytes handed to SAEs",
                                     ["sae", "peer_sae", "direction"], registry=self.registry)
        self.keys_delivered = Counter("qstore_kme_keys_delivered", "Keys handed to SAEs",
                                      ["sae", "peer_sae", "direction"], registry=self.registry)
        self.registry.register(Snapshot(KME_FAMILIES, links))  # type: ignore[arg-type]

    def delivered(self, sae: str, peer_sae: str, direction: str, *, keys: int, nbytes: int) -> None:
        self.keys_delivered.labels(sae, peer_sae, direction).inc(keys)
        self.key_delivered.labels(sae, peer_sae, direction).inc(nbytes)


# node: key and link traffic per peer SAE, read from the node's counters when scraped
NODE_KEY = Family("qstore_node_key_bytes_total", "QKD key spent on links with the peer SAE; direction in: "
                  "opening what it sent, out: sealing for it", ("peer_sae", "direction"))
NODE_LINK = Family("qstore_node_link_bytes_total", "Sealed envelope bytes exchanged with the peer SAE",
                   ("peer_sae", "direction"))
NODE_FAMILIES = (NODE_KEY, NODE_LINK)
NODE_STORE_FIGURES = ("buckets", "objects", "versions", "stored_bytes", "staging_uploads", "staging_bytes",
                      "bad_chunks")


class NodeMetrics(ServiceMetrics):
    """A storage node's metrics: requests (``qstore_node_*``), its store, key per peer, MPC queries.

    Store (gauges, set from the store's figures at each scrape):
    ``qstore_node_buckets``, ``qstore_node_objects`` (live objects),
    ``qstore_node_versions``, ``qstore_node_stored_bytes`` (share bytes of
    every version held), ``qstore_node_staging_uploads``,
    ``qstore_node_staging_bytes``, ``qstore_node_bad_chunks``.
    Per peer: :data:`NODE_FAMILIES` (``peers`` returns them).
    MPC: ``qstore_node_mpc_queries_total{status}`` (``ok`` / ``failed``),
    ``qstore_node_mpc_query_key_bytes`` (histogram of QKD key spent by this
    node per query, the result's sealing included), ``qstore_node_mpc_rounds_total``,
    ``qstore_node_mpc_query_rounds`` (histogram), ``qstore_node_mpc_sent_bytes_total``,
    ``qstore_node_mpc_query_duration_seconds`` (histogram).
    """

    service = "node"

    def __init__(self, instance: str, peers: Callable[[], Values]):
        super().__init__(instance)
        r = self.registry
        self.store = {name: Gauge(f"qstore_node_{name}", f"Store figure {name}", registry=r)
                      for name in NODE_STORE_FIGURES}
        self.registry.register(Snapshot(NODE_FAMILIES, peers))  # type: ignore[arg-type]
        self.mpc_queries = Counter("qstore_node_mpc_queries", "MPC queries run here, by outcome", ["status"],
                                   registry=r)
        self.mpc_key = Histogram("qstore_node_mpc_query_key_bytes", "QKD key this node spent per query",
                                 buckets=KEY_BYTES_BUCKETS, registry=r)
        self.mpc_rounds = Counter("qstore_node_mpc_rounds", "Communication rounds of MPC queries", registry=r)
        self.mpc_query_rounds = Histogram("qstore_node_mpc_query_rounds", "Communication rounds per query",
                                          buckets=ROUNDS_BUCKETS, registry=r)
        self.mpc_sent = Counter("qstore_node_mpc_sent_bytes", "Payload bytes sent to peer nodes in queries",
                                registry=r)
        self.mpc_seconds = Histogram("qstore_node_mpc_query_duration_seconds",
                                     "Time of a query's protocol run", buckets=LATENCY_BUCKETS, registry=r)

    def set_store(self, figures: Mapping[str, int]) -> None:
        for name, gauge in self.store.items():
            if name in figures:
                gauge.set(figures[name])

    def query_done(self, *, ok: bool, key_spent: int, rounds: int, bytes_sent: int, seconds: float) -> None:
        self.mpc_queries.labels("ok" if ok else "failed").inc()
        self.mpc_key.observe(key_spent)
        self.mpc_rounds.inc(rounds)
        self.mpc_query_rounds.observe(rounds)
        self.mpc_sent.inc(bytes_sent)
        self.mpc_seconds.observe(seconds)


class GatewayMetrics(ServiceMetrics):
    """The S3 gateway's metrics: requests by S3 operation (``qstore_s3_*``, see the module docstring)."""

    service = "s3"


# -- reading a scrape back -------------------------------------------------------------------------


class Figures:
    """The samples of one scrape (text format), for ``qstore cluster status`` and tests."""

    def __init__(self, text: str):
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0.0 when none)."""
        return sum(v for n, got, v in self.samples
                   if n == name and all(got.get(k) == want for k, want in labels.items()))

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name``: (labels, value)."""
        return [(got, v) for n, got, v in self.samples if n == name]
