"""The QKD network as a cluster file describes it: sites, links, key pools, relay routes.

Sans-IO: loading a config, turning each link's physics into a secure key
rate, finding relay routes and stepping key pools along a simulated clock
are pure computations. The KME processes (:mod:`qkd_sim.kme`) and the
`qstore qkd simulate` command build on them.

Cluster file (TOML, ``deploy/*.toml``)::

    [cluster]
    name = "tokyo"
    k = 3                      # file threshold (used by the storage layer)

    [[sites]]
    name = "otemachi"
    host = "127.0.0.1"         # where the site's processes run
    node = true                # runs a storage node (default); false: a client site, KME only
    kme_port = 0               # fixed ports of its KME and node; 0: the launcher picks free ones
    node_port = 0
    saes = ["hospital-a"]      # extra SAEs (data owners, analysts) attached to this site's KME

    [[links]]
    a = "koganei"
    b = "otemachi"
    length_km = 45
    protocol = "decoy-bb84"    # a name from qkd_sim.models.PROTOCOLS
    hardware = "gys"           # a preset of qkd_sim.models.PRESETS
    loss_db_per_km = 0.3       # optional: overrides the preset's fiber loss
    capacity_bits = 1e9        # pool size at each end (default 2^33 bits = 1 GiB)
    # or, instead of physics: rate = "unlimited" / rate_bps = 1e6

Every site runs a KME; the n sites with ``node = true`` run a storage node
each, whose Shamir x coordinates are 1..n in the order of the file; k <= n.
Unknown keys are refused, naming the table and entry they are in.

Trusted-node relay: two sites without a direct link get key through a
chain of links; every hop spends its own link's key (one-time pad hop by
hop, as on the Tokyo QKD Network), so a route's throughput is the minimum
of its links' free rates. :func:`Network.route` finds the widest path (the
route whose weakest link is strongest), breaking ties by fewer hops.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qstore.cluster import check_catalog_schema, check_catalog_url
from qstore.errors import LocalError

DEFAULT_CAPACITY_BITS = float(2**33)
UNLIMITED = math.inf


class ConfigError(LocalError):
    """A cluster file that cannot be used, with the place that is wrong."""


_SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, kw_only=True)
class NodeStorage:
    """Where a site's node keeps committed shares: its own disk (default) or a bucket of an object store at
    the site (MinIO, Ceph RGW, AWS). No credentials here: cluster files travel (ConfigMaps, every host);
    the node takes them from its environment (``AWS_ACCESS_KEY_ID``..., boto3's usual chain)."""

    backend: str = "local"
    endpoint: str | None = None  # e.g. "http://minio.north:9000"; none: AWS
    bucket: str | None = None
    prefix: str | None = None  # none: "<node SAE ID>/", so a site's nodes may share a bucket
    region: str | None = None
    # The node's catalog: SQLite on its disk (none) or PostgreSQL for large nodes, password-free URL
    catalog: str | None = None  # e.g. "postgresql://qstore@db.north/qstore"
    catalog_schema: str | None = None  # none: "qstore_<node SAE ID>"

    def __post_init__(self) -> None:
        if self.catalog is not None:
            try:
                check_catalog_url(self.catalog)
            except LocalError as exc:
                raise ConfigError(f"storage {exc}") from None
        if self.catalog_schema is not None:
            try:
                check_catalog_schema(self.catalog_schema)
            except LocalError:
                raise ConfigError("storage catalog_schema: lower-case letters, digits and _ "
                                  "(at most 63)") from None
        if self.backend not in ("local", "s3"):
            raise ConfigError(f"storage backend must be \"local\" or \"s3\", not {self.backend!r}")
        for name in ("endpoint", "bucket", "prefix", "region"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or not value.isprintable()):
                raise ConfigError(f"storage {name} must be a non-empty string")
            if value is not None and self.backend == "local":
                raise ConfigError(f"storage {name} is for backend \"s3\" (the backend is \"local\")")
        if self.backend == "s3" and self.bucket is None:
            raise ConfigError("storage backend \"s3\" needs a bucket")
        if self.endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.endpoint):
            raise ConfigError(f"storage endpoint {self.endpoint!r} must be an http:// or https:// URL")

    def to_json(self) -> dict[str, str] | None:
        """As ``cluster.json`` gives it to the node; None for the default (local disk, SQLite)."""
        if self == NodeStorage():
            return None
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class Site:
    """A place: one KME, and a storage node unless ``node`` is false (a client site)."""

    name: str
    host: str = "127.0.0.1"
    node: bool = True
    kme_port: int = 0  # 0: the launcher picks a free port
    node_port: int = 0
    saes: tuple[str, ...] = ()  # extra SAE IDs at this site (organisations: data owners, analysts)
    storage: NodeStorage = field(default_factory=NodeStorage)  # the node's share data: [sites.storage]

    def __post_init__(self) -> None:
        if not isinstance(self.storage, NodeStorage):
            raise ConfigError(f"site {self.name}: storage must be a table ([sites.storage])")
        if isinstance(self.saes, list):
            object.__setattr__(self, "saes", tuple(self.saes))
        ok = isinstance(self.saes, tuple) and all(isinstance(s, str) and _SAE_ID.fullmatch(s)
                                                  for s in self.saes)
        if not ok or len(set(self.saes)) != len(self.saes):
            raise ConfigError(f"site {self.name}: saes must be distinct SAE IDs (letters, digits, . - _)")
        if (not isinstance(self.name, str) or not self.name
                or not self.name.replace("-", "").replace("_", "").isalnum() or not self.name.isascii()):
            raise ConfigError(f"site name {self.name!r}: use letters, digits, '-' and '_'")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"site {self.name}: host must be a non-empty string")
        if not isinstance(self.node, bool):
            raise ConfigError(f"site {self.name}: node must be true or false")
        if not self.node and self.storage != NodeStorage():
            raise ConfigError(f"site {self.name}: storage is for a node's shares, and the site has no node")
        for name in ("kme_port", "node_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise ConfigError(f"site {self.name}: {name} must be an integer in [0, 65535] (0: any free)")


@dataclass(frozen=True, kw_only=True)
class Link:
    """A QKD link between two sites: physics (length, protocol, hardware) or a fixed rate."""

    a: str
    b: str
    length_km: float = 0.0
    protocol: str | None = None
    hardware: str | None = None
    loss_db_per_km: float | None = None
    rate_bps: float | None = None  # fixed rate; math.inf = unlimited
    capacity_bits: float = DEFAULT_CAPACITY_BITS

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ConfigError(f"link {self.a}-{self.b}: a link joins two different sites")
        if self.rate_bps is None and self.protocol is None:
            raise ConfigError(f"link {self.name}: give either protocol (+ length_km) or rate/rate_bps")
        if self.rate_bps is not None and not self.rate_bps >= 0:
            raise ConfigError(f"link {self.name}: rate_bps must be >= 0")
        if not self.length_km >= 0:
            raise ConfigError(f"link {self.name}: length_km must be >= 0")
        if not self.capacity_bits > 0:
            raise ConfigError(f"link {self.name}: capacity_bits must be > 0")

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    def joins(self, site: str) -> str | None:
        """The other end when ``site`` is one end, else None."""
        return self.b if site == self.a else self.a if site == self.b else None


RateFunction = Callable[[Link], float]


def physical_rate(link: Link) -> float:
    """Secure key rate in bits/s of a link from :mod:`qkd_sim.models` (or its fixed rate)."""
    if link.rate_bps is not None:
        return link.rate_bps
    from qkd_sim import models

    hardware = models.PRESETS[link.hardware or "gys"]
    if link.loss_db_per_km is not None:
        hardware = replace(hardware, fiber_loss_db_per_km=link.loss_db_per_km)
    return float(models.key_rate_bps(link.protocol, link.length_km, hardware))


@dataclass(frozen=True)
class Network:
    """Sites and links, with a key rate for every link."""

    name: str
    k: int
    sites: tuple[Site, ...]
    links: tuple[Link, ...]
    rates: dict[str, float] = field(repr=False)
    gateway_port: int | None = None  # [cluster] gateway_port: where the S3 gateway listens, for every host

    @classmethod
    def build(
        cls, name: str, k: int, sites: Iterable[Site], links: Iterable[Link],
        rate: RateFunction = physical_rate,
    ) -> Network:
        sites, links = tuple(sites), tuple(links)
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ConfigError("two sites have the same name")
        seen = set()
        for link in links:
            for end in (link.a, link.b):
                if end not in names:
                    raise ConfigError(f"link {link.name}: unknown site {end!r}")
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise ConfigError(f"link {link.name}: the two sites are already linked")
            seen.add(pair)
        return cls(name=name, k=k, sites=sites, links=links, rates={lk.name: rate(lk) for lk in links})

    @property
    def node_sites(self) -> tuple[Site, ...]:
        """The sites that run a storage node, in file order (node i has x = i + 1)."""
        return tuple(s for s in self.sites if s.node)

    @property
    def n(self) -> int:
        """Number of storage nodes."""
        return len(self.node_sites)

    @property
    def client_site(self) -> Site:
        """Where clients and the gateway attach: the first site without a node, else the first site."""
        return next((s for s in self.sites if not s.node), self.sites[0])

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        names = ", ".join(s.name for s in self.sites)
        raise ConfigError(f"cluster {self.name} has no site {name!r} (sites: {names})")

    @classmethod
    def from_toml(cls, path: str | Path, rate: RateFunction = physical_rate) -> Network:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_dict(doc, rate, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict, rate: RateFunction = physical_rate, source: str = "config") -> Network:
        cluster = doc.get("cluster", {})
        if not isinstance(cluster, dict):
            raise ConfigError(f"{source}: [cluster] must be a table")
        _known(cluster, {"name", "k", "gateway_port"}, f"{source}: [cluster]")
        try:
            sites = [_site(entry, _where(source, "sites", i, entry))
                     for i, entry in enumerate(_entries(doc, "sites", source))]
            links = [_link(entry, _where(source, "links", i, entry))
                     for i, entry in enumerate(_entries(doc, "links", source))]
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if not sites:
            raise ConfigError(f"{source}: no [[sites]]")
        k = cluster.get("k", 3)
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 255:
            raise ConfigError(f"{source}: [cluster] k must be an integer from 2 to 255")
        net = cls.build(str(cluster.get("name", Path(source).stem)), k, sites, links, rate)
        taken: dict[tuple[str, int], str] = {}
        for site in net.sites:
            ports = (("kme_port", site.kme_port), ("node_port", site.node_port if site.node else 0))
            for what, port in ports:
                if port:
                    other = taken.setdefault((site.host, port), f"{site.name}.{what}")
                    if other != f"{site.name}.{what}":
                        raise ConfigError(f"{source}: site {site.name}: {what} {port} is already {other}")
        gateway_port = cluster.get("gateway_port")
        if gateway_port is not None:
            if type(gateway_port) is not int or not 0 < gateway_port < 65536:
                raise ConfigError(f"{source}: [cluster] gateway_port must be an integer from 1 to 65535")
            other = taken.get((net.client_site.host, gateway_port))
            if other is not None:
                raise ConfigError(f"{source}: [cluster] gateway_port {gateway_port} is already {other}")
            net = replace(net, gateway_port=gateway_port)
        if net.n < k:
            raise ConfigError(f"{source}: [cluster] k = {k} needs at least {k} sites with a node "
                              f"(node = true), there are {net.n}")
        return net

    def link(self, a: str, b: str) -> Link | None:
        return next((lk for lk in self.links if {lk.a, lk.b} == {a, b}), None)

    def neighbours(self, site: str) -> list[tuple[str, Link]]:
        return [(other, lk) for lk in self.links if (other := lk.joins(site)) is not None]

    def route(self, src: str, dst: str) -> list[str]:
        """Widest path from src to dst (list of sites), fewest hops among equals.

        Raises ConfigError when no chain of links joins them.
        """
        for site in (src, dst):
            if site not in {s.name for s in self.sites}:
                raise ConfigError(f"unknown site {site!r} (sites: {', '.join(s.name for s in self.sites)})")
        if src == dst:
            return [src]
        best: dict[str, tuple[float, int]] = {src: (math.inf, 0)}
        prev: dict[str, str] = {}
        heap = [(-math.inf, 0, src)]
        while heap:
            neg_width, hops, site = heapq.heappop(heap)
            if (-neg_width, hops) != best.get(site):
                continue
            for other, lk in self.neighbours(site):
                cand = (min(-neg_width, self.rates[lk.name]), hops + 1)
                old = best.get(other)
                if old is None or cand[0] > old[0] or (cand[0] == old[0] and cand[1] < old[1]):
                    best[other] = cand
                    prev[other] = site
                    heapq.heappush(heap, (-cand[0], cand[1], other))
        if dst not in best:
            raise ConfigError(f"no chain of QKD links joins {src} and {dst}")
        path = [dst]
        while path[-1] != src:
            path.append(prev[path[-1]])
        return path[::-1]

    def route_rate(self, path: list[str]) -> float:
        """Key rate (bits/s) a relay route can carry: its weakest hop."""
        hops = (self.link(a, b) for a, b in itertools.pairwise(path))
        return min((self.rates[hop.name] for hop in hops if hop is not None), default=math.inf)


def _entries(doc: dict, table: str, source: str) -> list[dict]:
    entries = doc.get(table, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: {table} must be an array of tables ([[{table}]])")
    return entries


def _where(source: str, table: str, index: int, entry: dict) -> str:
    """Names an array-of-tables entry in messages: its number, and its name or ends when it has them."""
    label = entry.get("name") if table == "sites" else f"{entry.get('a')}-{entry.get('b')}"
    return f"{source}: [[{table}]] #{index + 1} ({label})"


def _known(entry: dict, allowed: type | set[str], where: str) -> dict:
    if isinstance(allowed, type):
        allowed = set(allowed.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = set(entry) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(allowed))})")
    return entry


_CREDENTIALS = {"access_key", "secret_key", "access_key_id", "secret_access_key", "aws_access_key_id",
                "aws_secret_access_key", "session_token", "password"}


def _storage(entry: object, where: str) -> NodeStorage:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: storage must be a table ([sites.storage])")
    secret = _CREDENTIALS & set(entry)
    if secret:
        raise ConfigError(f"{where}: [sites.storage] {', '.join(sorted(secret))}: credentials do not "
                          "belong in the cluster file; give the node AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY in its environment (or a profile or instance role)")
    _known(entry, NodeStorage, f"{where}: [sites.storage]")
    try:
        return NodeStorage(**entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _site(entry: dict, where: str) -> Site:
    _known(entry, Site, where)
    if "storage" in entry:
        entry = {**entry, "storage": _storage(entry["storage"], where)}
    try:
        return Site(**entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _link(entry: dict, where: str) -> Link:
    entry = dict(entry)
    rate = entry.pop("rate", None)
    if rate is not None:
        if rate != "unlimited":
            raise ConfigError(f"{where}: link rate must be \"unlimited\" (or use rate_bps)")
        entry["rate_bps"] = UNLIMITED
    _known(entry, Link, where)
    try:
        return Link(**entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class PoolTrace:
    """Pool levels (bits) per link at each simulated time step."""

    times_s: tuple[float, ...]
    levels: dict[str, tuple[float, ...]]
    starved: dict[str, float]  # link -> seconds during which demand was not met


def simulate(
    net: Network,
    hours: float,
    *,
    step_s: float = 60.0,
    demand_bps: dict[str, float] | None = None,
    start_full: bool = False,
) -> PoolTrace:
    """Step every link's pool along a simulated clock: fill at the link's rate up
    to its capacity, drain by the demand on that link (bits/s).

    Demand for a pair of sites without a direct link is charged to every hop of
    its relay route. Returns the level of every pool at every step.
    """
    if not hours > 0 or not step_s > 0:
        raise ConfigError("hours and step must be positive")
    load = {lk.name: 0.0 for lk in net.links}
    for pair, bps in (demand_bps or {}).items():
        a, _, b = pair.partition("-")
        path = net.route(a, b)
        for x, y in itertools.pairwise(path):
            load[net.link(x, y).name] += bps  # type: ignore[union-attr]
    steps = max(1, round(hours * 3600 / step_s))
    level = {lk.name: (lk.capacity_bits if start_full else 0.0) for lk in net.links}
    starved = {name: 0.0 for name in level}
    times, levels = [0.0], {name: [v] for name, v in level.items()}
    for i in range(1, steps + 1):
        for lk in net.links:
            rate = net.rates[lk.name]
            filled = level[lk.name] + (rate * step_s if math.isfinite(rate) else lk.capacity_bits)
            need = load[lk.name] * step_s
            if need > filled:
                starved[lk.name] += step_s * (1 - filled / need) if need else 0.0
            level[lk.name] = min(lk.capacity_bits, max(0.0, filled - need))
            levels[lk.name].append(level[lk.name])
        times.append(i * step_s)
    return PoolTrace(tuple(times), {k: tuple(v) for k, v in levels.items()}, starved)


def mesh_toml(name: str, k: int, storage_sites: Iterable[str], *, client_site: str = "client",
              client_saes: Iterable[str] = ()) -> str:
    """The text of a cluster file: storage sites and a client site, every pair joined by an unlimited link.

    For tests and benchmarks on one machine, where key supply must not be what is measured.
    """
    stores = list(storage_sites)
    text = [f'[cluster]\nname = "{name}"\nk = {k}\n']
    text += [f'[[sites]]\nname = "{s}"\n' for s in stores]
    saes = ", ".join(f'"{s}"' for s in client_saes)
    text.append(f'[[sites]]\nname = "{client_site}"\nnode = false\n' + (f"saes = [{saes}]\n" if saes else ""))
    names = stores + [client_site]
    text += [f'[[links]]\na = "{a}"\nb = "{b}"\nrate = "unlimited"\n'
             for i, a in enumerate(names) for b in names[i + 1:]]
    return "\n".join(text)
