"""The running cluster as its state file records it: which process of which site listens where.

`qstore cluster up` writes ``cluster.json`` into the state directory (default
``./.qstore``; ``--state DIR`` or ``$QSTORE_HOME`` choose another) beside the
CA and the certificates; every other command, the node processes and the S3
gateway find the cluster through it. Paths in the file are absolute, so other
tools (the AWS CLI, curl with the SAE certificates) can use them as they are.

Shape (``format`` 1; unknown keys are kept out, missing ones are an error)::

    {"format": 1, "name": "local", "config": "/abs/deploy/local.toml",
     "k": 3, "n": 5, "ca": "/abs/.qstore/ca/ca.pem",
     "kmes":  [{"id": "kme.site1", "site": "site1", "url": "https://127.0.0.1:40001",
                "pid": 4242, "log": "/abs/.qstore/logs/kme.site1.log",
                "metrics_url": "https://127.0.0.1:40001/metrics"}, ...],
     "nodes": [{"id": "node.site1", "site": "site1", "x": 1, "url": "https://127.0.0.1:40011",
                "pid": 4243, "data": "/abs/.qstore/nodes/site1", "log": "...",
                "metrics_url": "https://127.0.0.1:40011/metrics"}, ...],
     "saes":  [{"id": "node.site1", "site": "site1", "kme": "kme.site1",
                "cert": "/abs/.qstore/certs/node.site1.pem", "key": "..."},
               {"id": "client", ...}, {"id": "gateway", ...}],
     "links": [{"a": "site1", "b": "site2", "rate_bps": null, "capacity_bits": 8589934592,
                "initial_bits": null, "epoch": 1795000000.0}, ...],
     "started_at": 1795000000.0}

``pid`` is null for a process that runs on another host (`qstore cluster up
--only SITE` lists the other sites' processes with their URLs from the
cluster file); ``log`` and ``data`` are null there too. ``metrics_url`` is
where a process serves its Prometheus metrics; files written before it
existed have none (read as None).

``nodes`` lists the nodes that were started (none with ``--no-nodes``);
``n`` counts every node site of the cluster file all the same. ``links`` and
``started_at`` are sections of :attr:`ClusterState.extra` written by the
launcher (:class:`qkd_sim.deploy.LinkState`): both KMEs of a link read its
rate and epoch there, so that they agree (``rate_bps`` null: unlimited,
``initial_bits`` null: the pools are full at ``epoch``).

Link seeds (the simulated QKD links' shared secrets) are not in this file:
they sit in ``secrets.json`` (mode 0600) and only KME processes read them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qstore.errors import LocalError

FORMAT = 1
STATE_FILE = "cluster.json"
SECRETS_FILE = "secrets.json"
DEFAULT_STATE = ".qstore"
ENV_HOME = "QSTORE_HOME"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ClusterStateError(LocalError):
    """No usable cluster state: not started, stopped, or a damaged file."""


def node_sae_id(site: str) -> str:
    """The SAE ID of the storage node of ``site``."""
    return f"node.{site}"


def kme_id(site: str) -> str:
    """The KME ID of ``site``."""
    return f"kme.{site}"


CLIENT_SAE = "client"
GATEWAY_SAE = "gateway"


def state_dir(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where the cluster state lives: ``--state``, else ``$QSTORE_HOME``, else ``./.qstore``."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).absolute()
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).absolute()
    return Path(DEFAULT_STATE).absolute()


_PG_URL = re.compile(r"postgres(ql)?://\S+")


def check_catalog_url(url: object) -> str:
    """A node catalog's PostgreSQL URL, without a password in it (libpq takes that from PGPASSWORD or
    ~/.pgpass: cluster files and cluster.json are copied around and must hold no secret)."""
    if not isinstance(url, str) or not _PG_URL.fullmatch(url):
        raise LocalError("catalog must be a postgresql://USER@HOST[:PORT]/DATABASE URL")
    rest, _, query = url.split("://", 1)[1].partition("?")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    if ":" in userinfo or any(p.split("=", 1)[0].lower() == "password" for p in query.split("&")):
        raise LocalError("catalog URL: no password in it (give the node PGPASSWORD or a ~/.pgpass file)")
    return url


_PG_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_catalog_schema(schema: object) -> str:
    """A node catalog's PostgreSQL schema name: safe to quote into SQL, at most PostgreSQL's 63 bytes."""
    if not isinstance(schema, str) or not _PG_SCHEMA.fullmatch(schema):
        raise LocalError(f"catalog schema {schema!r}: lower-case letters, digits and _ (at most 63)")
    return schema


def _check_url(url: object, where: str) -> str:
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ClusterStateError(f"{where}: url must be an http(s):// URL")
    return url.rstrip("/")


@dataclass(frozen=True, kw_only=True)
class KMEInfo:
    id: str
    site: str
    url: str
    pid: int | None = None  # None: not started from this state directory (another host's)
    log: Path | None = None
    metrics_url: str | None = None  # None in files written before metrics existed


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    id: str  # the node's SAE ID
    site: str
    x: int  # Shamir x coordinate of its shares
    url: str
    pid: int | None = None
    data: Path | None = None
    log: Path | None = None
    metrics_url: str | None = None
    storage: dict[str, str] | None = None  # None: shares on local disk; else [sites.storage] of the config


@dataclass(frozen=True, kw_only=True)
class SAEInfo:
    id: str
    site: str
    kme: str  # KME ID
    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class ClusterState:
    """What ``cluster.json`` says; ``directory`` is where it was read from (or will be written)."""

    directory: Path
    name: str
    k: int
    n: int
    ca: Path
    config: Path | None = None
    kmes: tuple[KMEInfo, ...] = ()
    nodes: tuple[NodeInfo, ...] = ()
    saes: tuple[SAEInfo, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections other layers add (e.g. "gateway")

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.n, int) and 2 <= self.k <= self.n <= 255):
            raise ClusterStateError("need integers 2 <= k <= n <= 255")
        xs = [node.x for node in self.nodes]
        if len(set(xs)) != len(xs) or not all(1 <= x <= 255 for x in xs):
            raise ClusterStateError("node x coordinates must be distinct, in 1..255")
        for item in (*self.kmes, *self.nodes, *self.saes):
            if not _ID.fullmatch(item.id):
                raise ClusterStateError(f"bad process ID {item.id!r}")

    # -- lookups ------------------------------------------------------------------

    def sae(self, sae_id: str) -> SAEInfo:
        for sae in self.saes:
            if sae.id == sae_id:
                return sae
        raise ClusterStateError(f"cluster {self.name} has no SAE {sae_id!r}")

    def kme(self, kme: str) -> KMEInfo:
        """A KME by ID or by site name."""
        for info in self.kmes:
            if kme in (info.id, info.site):
                return info
        raise ClusterStateError(f"cluster {self.name} has no KME {kme!r}")

    def kme_url_of(self, sae_id: str) -> str:
        """The URL of the KME an SAE is attached to."""
        return self.kme(self.sae(sae_id).kme).url

    def node(self, node: str) -> NodeInfo:
        """A node by SAE ID, site name or x coordinate (as text)."""
        for info in self.nodes:
            if node in (info.id, info.site, str(info.x)):
                return info
        names = ", ".join(info.site for info in self.nodes)
        raise ClusterStateError(f"cluster {self.name} has no node {node!r} (nodes: {names})")

    # -- file -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    def to_json(self) -> dict[str, Any]:
        def plain(obj: object) -> dict[str, Any]:
            return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}  # type: ignore[call-overload]

        doc: dict[str, Any] = dict(self.extra)
        doc.update({
            "format": FORMAT, "name": self.name, "k": self.k, "n": self.n, "ca": str(self.ca),
            "config": str(self.config) if self.config else None,
            "kmes": [plain(x) for x in self.kmes],
            "nodes": [plain(x) for x in self.nodes],
            "saes": [plain(x) for x in self.saes],
        })
        return doc

    def save(self) -> None:
        """Write ``cluster.json`` atomically (a reader sees the old file or the new one, never half)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = json.dumps(self.to_json(), indent=2).encode()
        mode = 0o600 if "gateway" in self.extra else 0o644  # the gateway's secret key is in it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ClusterState:
        """Read ``cluster.json`` in ``directory``; a clear error when there is none."""
        directory = Path(directory).absolute()
        path = directory / STATE_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ClusterStateError(
                f"no cluster state in {directory} (start one with `qstore cluster up`, "
                f"or point --state / ${ENV_HOME} at its state directory)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ClusterStateError(f"{path}: unreadable cluster state ({type(exc).__name__})") from None
        return cls.from_json(doc, directory, source=str(path))

    @classmethod
    def from_json(cls, doc: object, directory: Path, *, source: str = STATE_FILE) -> ClusterState:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ClusterStateError(f"{source}: not a format-{FORMAT} cluster state")

        def items(name: str, kind: type) -> tuple[Any, ...]:
            raw = doc.get(name, [])
            if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
                raise ClusterStateError(f"{source}: {name} must be a list of objects")
            out = []
            names = {f.name: f for f in fields(kind)}
            for i, entry in enumerate(raw):
                kw = {}
                for key, value in entry.items():
                    if key not in names:
                        continue
                    if value is not None and key in ("log", "data", "cert", "key"):
                        value = Path(value)
                    kw[key] = value
                try:
                    item = kind(**kw)
                except TypeError as exc:
                    raise ClusterStateError(f"{source}: {name}[{i}]: {exc}") from None
                if hasattr(item, "url"):
                    _check_url(item.url, f"{source}: {name}[{i}]")
                storage = getattr(item, "storage", None)
                if storage is not None and not (isinstance(storage, dict) and all(
                        isinstance(k, str) and isinstance(v, str) for k, v in storage.items())):
                    raise ClusterStateError(f"{source}: {name}[{i}]: storage must be an object of strings")
                if getattr(item, "metrics_url", None) is not None:
                    _check_url(item.metrics_url, f"{source}: {name}[{i}]: metrics_url")
                out.append(item)
            return tuple(out)

        known = {"format", "name", "k", "n", "ca", "config", "kmes", "nodes", "saes"}
        try:
            return cls(
                directory=directory, name=str(doc["name"]), k=doc["k"], n=doc["n"], ca=Path(doc["ca"]),
                config=Path(doc["config"]) if doc.get("config") else None,
                kmes=items("kmes", KMEInfo), nodes=items("nodes", NodeInfo), saes=items("saes", SAEInfo),
                extra={key: value for key, value in doc.items() if key not in known},
            )
        except KeyError as exc:
            raise ClusterStateError(f"{source}: missing {exc.args[0]!r}") from None
