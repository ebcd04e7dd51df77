"""From a cluster file to the config of each KME process (sans-IO).

`qstore cluster up` and `qstore kme serve` share these functions, so that
the launcher and every KME agree on who is attached where and on what each
link is: which SAEs belong to which KME, the KME-level links with their
rates, epochs and seeds, the relay routes and the peer URLs. Nothing here
reads a file or opens a socket; :mod:`client.cluster` does that.

IDs (:mod:`qstore.cluster`): site ``s`` runs KME ``kme.s``; its storage node
(when ``node = true``) is SAE ``node.s``; the client and the S3 gateway are
SAEs ``client`` and ``gateway`` at the client site
(:attr:`qkd_sim.network.Network.client_site`).

Link seeds are the simulated QKD links' shared secrets: a link's two KMEs
must get the same seed and epoch (the time its pools began to fill), and a
seed must never be used by two runs of a cluster, since each run hands out
its key streams from the start again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qkd_sim import relay
from qkd_sim.kme import KMEConfig
from qkd_sim.network import ConfigError, Network
from qkd_sim.pool import DEFAULT_CAPACITY_BITS, LinkConfig
from qstore.cluster import CLIENT_SAE, GATEWAY_SAE, kme_id, node_sae_id

SEED_BYTES = 32


def sae_sites(net: Network) -> dict[str, str]:
    """SAE ID → site of every SAE: one per node, the client, the gateway, each site's ``saes``."""
    out = {node_sae_id(site.name): site.name for site in net.node_sites}
    out[CLIENT_SAE] = out[GATEWAY_SAE] = net.client_site.name
    for site in net.sites:
        for sae in site.saes:
            if sae in out:
                raise ConfigError(f"site {site.name}: SAE ID {sae!r} is already taken")
            out[sae] = site.name
    return out


def node_xs(net: Network) -> dict[str, int]:
    """Site → Shamir x coordinate of its node: 1..n in the order of the cluster file."""
    return {site.name: x for x, site in enumerate(net.node_sites, start=1)}


def _pair(a: str, b: str) -> frozenset[str]:
    return frozenset((a, b))


@dataclass(frozen=True, kw_only=True)
class LinkState:
    """One QKD link as both of its KMEs must see it (the ``links`` section of ``cluster.json``).

    ``rate_bps`` None is unlimited; ``initial_bits`` None means the pools are
    full at ``epoch`` (as for a link that has been running a while).
    """

    a: str
    b: str
    rate_bps: float | None
    epoch: float
    capacity_bits: float = DEFAULT_CAPACITY_BITS
    initial_bits: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "rate_bps": self.rate_bps, "capacity_bits": self.capacity_bits,
                "initial_bits": self.initial_bits, "epoch": self.epoch}

    @classmethod
    def from_json(cls, doc: object, where: str) -> LinkState:
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: a link must be a JSON object")
        try:
            return cls(a=str(doc["a"]), b=str(doc["b"]), rate_bps=_number(doc.get("rate_bps"), where),
                       epoch=float(doc["epoch"]),
                       capacity_bits=float(doc.get("capacity_bits", DEFAULT_CAPACITY_BITS)),
                       initial_bits=_number(doc.get("initial_bits"), where))
        except KeyError as exc:
            raise ConfigError(f"{where}: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: epoch and capacity_bits must be numbers") from None

    @property
    def rate(self) -> float:
        """bits/s, math.inf for unlimited."""
        return math.inf if self.rate_bps is None else self.rate_bps


def _number(value: object, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{where}: rate_bps and initial_bits must be numbers or null")
    return float(value)


def link_states(net: Network, epoch: float) -> list[LinkState]:
    """Every link of ``net`` with its rate (from the link model) and a common epoch."""
    out = []
    for link in net.links:
        rate = net.rates[link.name]
        out.append(LinkState(a=link.a, b=link.b, rate_bps=None if math.isinf(rate) else rate,
                             epoch=epoch, capacity_bits=link.capacity_bits))
    return out


@dataclass(frozen=True)
class Seeds:
    """The secrets of one cluster run: a seed per link, and a local-pool seed per KME. Never shown."""

    links: Mapping[frozenset[str], bytes] = field(repr=False)
    local: Mapping[str, bytes] = field(repr=False)  # site -> seed

    def __post_init__(self) -> None:
        object.__setattr__(self, "links", MappingProxyType(dict(self.links)))
        object.__setattr__(self, "local", MappingProxyType(dict(self.local)))

    def __repr__(self) -> str:
        return f"Seeds(<{len(self.links)} link seeds, {len(self.local)} local seeds hidden>)"

    @classmethod
    def new(cls, net: Network, randbytes: Callable[[int], bytes] = os.urandom) -> Seeds:
        """Fresh random seeds for every link and every KME of ``net``."""
        return cls({_pair(lk.a, lk.b): randbytes(SEED_BYTES) for lk in net.links},
                   {site.name: randbytes(SEED_BYTES) for site in net.sites})

    def link(self, a: str, b: str) -> bytes:
        try:
            return self.links[_pair(a, b)]
        except KeyError:
            raise ConfigError(f"no seed for link {a}-{b}: the secrets are another cluster file's") from None

    def to_json(self) -> dict[str, Any]:
        return {"links": [{"a": a, "b": b, "seed": seed.hex()}
                          for (a, b), seed in ((sorted(pair), s) for pair, s in self.links.items())],
                "local": {site: seed.hex() for site, seed in self.local.items()}}

    @classmethod
    def from_json(cls, doc: object, where: str = "secrets") -> Seeds:
        try:
            links = {_pair(str(e["a"]), str(e["b"])): bytes.fromhex(e["seed"]) for e in doc["links"]}  # type: ignore[index]
            local = {str(site): bytes.fromhex(seed) for site, seed in doc["local"].items()}  # type: ignore[index]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"{where}: not a qstore secrets file") from None
        return cls(links, local)


def routes(site: str, links: Iterable[LinkState]) -> dict[str, str]:
    """Relay routes of ``site``'s KME: KME ID → next-hop KME ID (:func:`qkd_sim.relay.next_hops`).

    Routed over site names, then named by KME: sites and KMEs are one to one.
    """
    hops = relay.next_hops(site, [(lk.a, lk.b, lk.rate) for lk in links])
    return {kme_id(dest): kme_id(hop) for dest, hop in hops.items()}


def kme_config(
    net: Network,
    site: str,
    *,
    links: Iterable[LinkState],
    seeds: Seeds,
    kme_urls: Mapping[str, str],
    cert: Path,
    key: Path,
    ca: Path,
    port: int = 0,
    **overrides: Any,
) -> KMEConfig:
    """The config of ``site``'s KME in a cluster run.

    ``links``: every link of the run (from ``cluster.json``; each must be a
    link of ``net``), ``kme_urls``: KME ID → base URL of every other KME (its
    relay peers). ``overrides`` go to :class:`~qkd_sim.kme.KMEConfig` as they are
    (``clock=``, ``limits=``, ...).
    """
    me = net.site(site)
    links = list(links)
    known = {_pair(lk.a, lk.b) for lk in net.links}
    by_pair = {}
    for lk in links:
        if _pair(lk.a, lk.b) not in known:
            raise ConfigError(f"the cluster state has a link {lk.a}-{lk.b} that {net.name}'s file has not: "
                              "was the cluster started from another file?")
        by_pair[_pair(lk.a, lk.b)] = lk
    mine = []
    for link in net.links:
        other = link.joins(site)
        if other is None:
            continue
        state = by_pair.get(_pair(link.a, link.b))
        if state is None:
            raise ConfigError(f"the cluster state has no link {link.name}: was the cluster started from "
                              "another file?")
        mine.append(LinkConfig(peer=kme_id(other), seed=seeds.link(link.a, link.b), rate_bps=state.rate,
                               capacity_bits=state.capacity_bits, initial_bits=state.initial_bits,
                               epoch=state.epoch))
    sites = sae_sites(net)
    me_id = kme_id(site)
    peers = {k: url for k, url in kme_urls.items() if k != me_id}
    return KMEConfig(
        kme_id=me_id,
        saes=frozenset(sae for sae, s in sites.items() if s == site),
        directory={sae: kme_id(s) for sae, s in sites.items()},
        links=tuple(mine),
        cert=cert, key=key, ca=ca, host=me.host, port=port,
        local_seed=seeds.local.get(site),
        routes=routes(site, by_pair.values()),
        peers=peers,
        **overrides,
    )
