"""An in-process cluster for storage tests: real KMEs and nodes (aiohttp over mutual TLS on 127.0.0.1).

One event loop holds them all, so tests can reach into a node's store to
damage it, stop a node, or drain a link. The process-level tests
(``qstore cluster up``) live in test_storage_processes.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from nodes import service
from qkd_sim import kme, pki
from qkd_sim.pool import LinkConfig
from qstore.cluster import CLIENT_SAE, ClusterState, KMEInfo, NodeInfo, SAEInfo, kme_id, node_sae_id


@dataclass
class Cluster:
    root: Path
    k: int
    sites: list[str]
    ids: dict[str, pki.Identity]
    kmes: dict[str, kme.RunningKME] = field(default_factory=dict)
    nodes: dict[str, service.RunningNode] = field(default_factory=dict)
    node_configs: dict[str, service.NodeConfig] = field(default_factory=dict)

    @property
    def state(self) -> ClusterState:
        kmes = tuple(KMEInfo(id=kme_id(s), site=s, url=r.url) for s, r in self.kmes.items())
        nodes = tuple(NodeInfo(id=node_sae_id(s), site=s, x=i + 1, url=self.urls[s],
                               data=self.root / "nodes" / s) for i, s in enumerate(self.sites))
        saes = [SAEInfo(id=node_sae_id(s), site=s, kme=kme_id(s), cert=self.ids[node_sae_id(s)].cert,
                        key=self.ids[node_sae_id(s)].key) for s in self.sites]
        me = self.ids[CLIENT_SAE]
        saes.append(SAEInfo(id=CLIENT_SAE, site="client", kme=kme_id("client"), cert=me.cert, key=me.key))
        return ClusterState(directory=self.root, name="test", k=self.k, n=len(self.sites),
                            ca=self.ids[CLIENT_SAE].ca, kmes=kmes, nodes=nodes, saes=tuple(saes))

    urls: dict[str, str] = field(default_factory=dict)

    async def start_node(self, site: str) -> None:
        """Start (or restart, on the same port) the node of ``site``."""
        self.nodes[site] = await service.start(self.node_configs[site])
        self.urls[site] = self.nodes[site].url
        port = int(self.urls[site].rsplit(":", 1)[1])
        self.node_configs[site] = replace(self.node_configs[site], port=port)

    async def stop_node(self, site: str) -> None:
        await self.nodes.pop(site).close()

    async def close(self) -> None:
        for site in list(self.nodes):
            await self.stop_node(site)
        for r in self.kmes.values():
            await r.close()


async def start_cluster(root: Path, *, n: int = 5, k: int = 3, link_rate: float = float("inf"),
                        capacity_bits: float = float(2**33), clock=None, key_wait_s: float = 10.0,
                        **node_kw) -> Cluster:
    sites = [f"site{i}" for i in range(1, n + 1)]
    ca = pki.create_ca(root / "ca")
    ids = {CLIENT_SAE: pki.issue(ca, CLIENT_SAE, root / "certs")}
    for s in sites:
        ids[node_sae_id(s)] = pki.issue(ca, node_sae_id(s), root / "certs", kind="node")
    for s in ["client", *sites]:
        ids[kme_id(s)] = pki.issue(ca, kme_id(s), root / "certs", kind="kme")
    directory = {CLIENT_SAE: kme_id("client"), **{node_sae_id(s): kme_id(s) for s in sites}}
    seeds = {s: os.urandom(32) for s in sites}
    extra = {} if clock is None else {"clock": clock}
    cluster = Cluster(root=root, k=k, sites=sites, ids=ids)
    try:
        pool = {"rate_bps": link_rate, "capacity_bits": capacity_bits}
        links = tuple(LinkConfig(peer=kme_id(s), seed=seeds[s], **pool) for s in sites)
        ident = ids[kme_id("client")]
        cluster.kmes["client"] = await kme.start(kme.KMEConfig(
            kme_id=kme_id("client"), saes=frozenset({CLIENT_SAE}), directory=directory, links=links,
            cert=ident.cert, key=ident.key, ca=ident.ca, **extra))
        for s in sites:
            ident = ids[kme_id(s)]
            link = LinkConfig(peer=kme_id("client"), seed=seeds[s], **pool)
            cluster.kmes[s] = await kme.start(kme.KMEConfig(
                kme_id=kme_id(s), saes=frozenset({node_sae_id(s)}), directory=directory, links=(link,),
                cert=ident.cert, key=ident.key, ca=ident.ca, **extra))
        for i, s in enumerate(sites):
            ident = ids[node_sae_id(s)]
            cluster.node_configs[s] = service.NodeConfig(
                site=s, sae_id=node_sae_id(s), x=i + 1, data_dir=root / "nodes" / s, cert=ident.cert,
                key=ident.key, ca=ident.ca, kme_url=cluster.kmes[s].url, key_wait_s=key_wait_s, **node_kw)
            await cluster.start_node(s)
    except BaseException:
        await cluster.close()
        raise
    return cluster


def three_sites_toml(name: str, storage: dict[str, dict[str, str]]) -> str:
    """A cluster file of storage sites north, south and east (k = 2) and a client site desk, joined by
    unlimited links; ``storage`` gives some sites a ``[sites.storage]`` table."""
    text = f'[cluster]\nname = "{name}"\nk = 2\n'
    for site in ("north", "south", "east"):
        text += f'[[sites]]\nname = "{site}"\n'
        if site in storage:
            text += "[sites.storage]\n" + "".join(f'{k} = "{v}"\n' for k, v in storage[site].items())
    text += '[[sites]]\nname = "desk"\nnode = false\n'
    pairs = [("desk", "north"), ("desk", "south"), ("desk", "east"), ("north", "south"), ("south", "east")]
    return text + "".join(f'[[links]]\na = "{a}"\nb = "{b}"\nrate = "unlimited"\n' for a, b in pairs)


def put_get(state: ClusterState, data: bytes) -> bytes:
    """Store ``data`` as study/obj through a cluster's processes and read it back (64 KiB chunks)."""
    import asyncio

    from client.storage import QStore

    async def round_trip() -> bytes:
        async with QStore(state, chunk_size=64 << 10) as qs:
            await qs.create_bucket("study")
            await qs.put("study", "obj", data)
            return await qs.get_bytes("study", "obj")

    return asyncio.run(round_trip())
