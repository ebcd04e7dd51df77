"""Key fetched ahead for small envelopes: small puts (QStore key_ahead, as the S3 gateway runs it) and the
shares nodes serve need no KME round trip each, and every key still seals exactly one envelope."""

from __future__ import annotations

import os

import aiohttp

from client.storage import QStore
from qkd_sim import pki
from qstore.cluster import CLIENT_SAE
from qstore.telemetry import Figures
from tests.storage_cluster import start_cluster


async def enc_requests(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        figures = Figures(await resp.text())
    return figures.value("qstore_kme_requests_total", operation="enc_keys", status="200")


async def test_small_puts_and_gets_take_keys_fetched_ahead(tmp_path):
    cluster = await start_cluster(tmp_path / "cluster", n=3, k=2)
    me = cluster.ids[CLIENT_SAE]
    tls = aiohttp.TCPConnector(ssl=pki.client_ssl_context(me.cert, me.key, me.ca))
    client_kme = cluster.kmes["client"].url
    node_kmes = [cluster.kmes[s].url for s in cluster.sites]
    objects = {f"o{i}": os.urandom(4096 + 37 * i) for i in range(12)}
    try:
        async with aiohttp.ClientSession(connector=tls) as http, \
                QStore(cluster.state, key_ahead=True) as qs:
            await qs.create_bucket("small")
            before = await enc_requests(http, client_kme)
            spent = []
            for name, body in objects.items():
                report = await qs.put("small", name, body)
                spent += [use.key_bytes for use in report.links.values()]
            puts = await enc_requests(http, client_kme) - before
            # one refill per node now and then, not one request per share
            assert puts < len(objects) * len(cluster.sites) / 2, puts
            # whole 1 KiB keys: the rest of an envelope's last key is never used for another
            assert all(b % 1024 == 0 for b in spent[len(cluster.sites):]), spent

            served_before = [await enc_requests(http, u) for u in node_kmes]
            for name, body in objects.items():
                assert await qs.get_bytes("small", name) == body
            served = sum([await enc_requests(http, u) for u in node_kmes]) - sum(served_before)
            assert served < len(objects) * 2, served  # k + 1 = 3 shares per get, from pools
        async with QStore(cluster.state) as plain:  # a short-lived client (the CLI) fetches per envelope
            report = await plain.put("small", "plain", b"x" * 5000)
            [cost] = {use.key_bytes for use in report.links.values()}
            assert cost > 5000 and cost % 1024  # key cut to the envelope's size
            assert await plain.get_bytes("small", "plain") == b"x" * 5000
    finally:
        await cluster.close()
