"""Metrics and JSON logs of the KME, the node and the S3 gateway, scraped from real servers on 127.0.0.1.

One in-process cluster (three sites, k = 2, every service a real aiohttp
server; the KMEs and nodes speak mutual TLS) and an S3 gateway in the same
loop, driven by an ETSI SAE client, the QStore client library and boto3
(in a worker thread). Every figure is checked as the difference of two
scrapes, by the amount the requests moved it; every log line is JSON; no
key material, signature, secret key or Authorization value is in any of them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import logging
import os
import re
import ssl

import aiohttp
import boto3
import pytest
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import ClientError
from prometheus_client import generate_latest

from client.s3 import gateway
from client.s3 import users as s3users
from client.storage import QStore
from nodes import service
from qkd_sim import pki
from qkd_sim.sae import KMEError, SAEClient, SAEConfig
from qstore import telemetry
from qstore.cluster import CLIENT_SAE, kme_id, node_sae_id
from qstore.telemetry import Figures
from tests.storage_cluster import start_cluster

SERVICE_LOGGERS = ("qkd_sim", "nodes", "client", "qstore", "aiohttp")


# -- the sans-IO parts ------------------------------------------------------------------------------


def test_request_ids_honour_short_safe_tokens_only():
    assert telemetry.request_id_for("trace-42.a_b") == "trace-42.a_b"
    for bad in (None, "", "a b", "x" * 65, "id\nforged line", "-leading", "ü"):
        rid = telemetry.request_id_for(bad)
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert telemetry.request_id_for(None, rng=lambda n: bytes(n)) == "0" * 16


def test_utc_timestamps_agree_with_datetime():
    for t in (0.0, 0.999, 951782400.5, 1709210096.123, 4102444800.0, -86400.25, 253402300799.0):
        want = datetime.datetime.fromtimestamp(t, datetime.UTC)
        assert telemetry.utc_timestamp(t) == want.strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{want.microsecond // 1000:03d}Z"


def test_json_lines_mask_secrets_and_carry_the_request_id():
    out = io.StringIO()
    log = logging.getLogger("qstore.test_metrics.formatter")
    handler = telemetry.json_log_handler(out, static={"service": "test"})
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    signature = "ab12" * 16
    token = telemetry.request_id.set("req-1")
    try:
        log.info("auth %s", "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/s3/"
                 f"aws4_request, SignedHeaders=host, Signature={signature}",
                 extra={"secret_key": "hunter2hunter2", "key": b"\x01" * 32, "material": "zz", "count": 3,
                        "obj": object(), "url": f"/b/k?X-Amz-Signature={signature}", "nested": {"seed": "x"}})
        log.debug("keys %s and %r, %d of them", b"\x02" * 16, bytearray(b"\x03" * 8), 2)
        try:
            raise ValueError('body {"key": "QUJDREVGR0hJSktMTU5PUA==", "key_ID": "1234"}')
        except ValueError:
            log.exception("failed")
    finally:
        telemetry.request_id.reset(token)
        log.removeHandler(handler)
    first, middle, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert middle["message"] == "keys <16 bytes> and '<8 bytes>', 2 of them"
    assert first["request_id"] == second["request_id"] == "req-1"
    assert first["service"] == "test" and first["level"] == "INFO" and first["logger"] == log.name
    assert first["time"].endswith("Z") and first["count"] == 3 and first["obj"] == "<object>"
    assert first["secret_key"] == first["key"] == first["material"] == "[redacted]"
    assert first["nested"] == {"seed": "[redacted]"}
    assert "[redacted]" in first["message"] and "[redacted]" in first["url"]
    assert "QUJDREVG" not in second["exc"] and '"key_ID": "1234"' in second["exc"]
    text = out.getvalue()
    assert signature not in text and "hunter2" not in text and "AWS4-HMAC" not in text


def test_standalone_services_log_json_only():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        telemetry.configure_json_logging(stream=out, static={"service": "kme", "instance": "kme.a"})
        logging.getLogger("qkd_sim.kme").info("KME %s: %s", "kme.a", "listening")
        logging.getLogger("qkd_sim.kme").debug("not at INFO")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["message"] == "KME kme.a: listening" and line["request_id"] is None
    assert (line["service"], line["instance"], line["level"]) == ("kme", "kme.a", "INFO")


def test_s3_operations_as_the_gateway_dispatches_them():
    op = gateway.s3_operation
    assert op("GET", "/", {}, {}) == "ListBuckets"
    assert op("PUT", "/b", {}, {}) == "CreateBucket"
    assert op("PUT", "/b", {"acl": ""}, {}) == "Unsupported"
    assert op("GET", "/b", {"list-type": "2"}, {}) == "ListObjectsV2"
    assert op("GET", "/b", {}, {}) == "ListObjects"
    assert op("GET", "/b", {"uploads": ""}, {}) == "ListMultipartUploads"
    assert op("POST", "/b", {"delete": ""}, {}) == "DeleteObjects"
    assert op("PUT", "/b/k", {}, {}) == "PutObject"
    assert op("PUT", "/b/k", {}, {"x-amz-copy-source": "/a/b"}) == "CopyObject"
    assert op("PUT", "/b/k", {"uploadId": "u", "partNumber": "1"}, {}) == "UploadPart"
    assert op("GET", "/b/k", {}, {}) == "GetObject"
    assert op("HEAD", "/b/k", {}, {}) == "HeadObject"
    assert op("GET", "/b/k", {"uploadId": "u"}, {}) == "ListParts"
    assert op("GET", "/b/k", {"tagging": ""}, {}) == "Unsupported"
    assert op("DELETE", "/b/k", {}, {}) == "DeleteObject"
    assert op("DELETE", "/b/k", {"uploadId": "u"}, {}) == "AbortMultipartUpload"
    assert op("POST", "/b/k", {"uploads": ""}, {}) == "CreateMultipartUpload"
    assert op("POST", "/b/k", {"uploadId": "u"}, {}) == "CompleteMultipartUpload"
    assert op("PATCH", "/b/k", {}, {}) == "Unknown"


def test_node_mpc_figures():
    m = telemetry.NodeMetrics("node.x", lambda: {telemetry.NODE_KEY.name: [(("node.y", "out"), 96.0)]})
    m.query_done(ok=True, key_spent=5000, rounds=7, bytes_sent=1 << 20, seconds=0.3)
    m.query_done(ok=False, key_spent=0, rounds=0, bytes_sent=0, seconds=0.01)
    f = Figures(generate_latest(m.registry).decode())
    assert f.value("qstore_node_mpc_queries_total", status="ok") == 1
    assert f.value("qstore_node_mpc_queries_total", status="failed") == 1
    assert f.value("qstore_node_mpc_query_key_bytes_sum") == 5000
    assert f.value("qstore_node_mpc_query_key_bytes_bucket", le="4096.0") == 1  # the failed one, 0 bytes
    assert f.value("qstore_node_mpc_rounds_total") == 7
    assert f.value("qstore_node_key_bytes_total", peer_sae="node.y", direction="out") == 96
    assert f.value("qstore_service_info", service="node", instance="node.x") == 1


# -- real servers -----------------------------------------------------------------------------------


@pytest.fixture
def captured():
    """Every log line of the services' loggers, as the standalone services write them (JSON)."""
    out = io.StringIO()
    handler = telemetry.json_log_handler(out)
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in SERVICE_LOGGERS}
    root.addHandler(handler)
    for name in SERVICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def scrape(http: aiohttp.ClientSession, url: str) -> Figures:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Figures(await resp.text())


class Delta:
    """Figures of a service before and after some requests."""

    def __init__(self, before: Figures, after: Figures):
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


async def test_kme_node_and_gateway_metrics_and_logs(tmp_path, captured):
    cluster = await start_cluster(tmp_path / "cluster", n=3, k=2)
    me = cluster.ids[CLIENT_SAE]
    tls = aiohttp.TCPConnector(ssl=pki.client_ssl_context(me.cert, me.key, me.ca))
    secrets: list[str] = []
    runner = None
    try:
        async with aiohttp.ClientSession(connector=tls) as http:
            # -- KME: enc_keys at the client's KME, dec_keys at site1's ------------------------------
            kme_c, kme_1 = cluster.kmes["client"].url, cluster.kmes["site1"].url
            before_c = await scrape(http, kme_c + "/metrics")
            before_1 = await scrape(http, kme_1 + "/metrics")
            node1 = cluster.ids[node_sae_id("site1")]
            async with SAEClient(SAEConfig(sae_id=CLIENT_SAE, kme_url=kme_c, cert=me.cert, key=me.key,
                                           ca=me.ca)) as master, \
                    SAEClient(SAEConfig(sae_id=node1.name, kme_url=kme_1, cert=node1.cert, key=node1.key,
                                        ca=node1.ca)) as slave:
                sent = await master.get_enc_keys(node_sae_id("site1"), 3, 512)
                got = await slave.get_dec_keys(CLIENT_SAE, [k.key_id for k in sent])
                assert [k.key for k in got] == [k.key for k in sent]
                with pytest.raises(KMEError):  # a key is handed out once
                    await slave.get_dec_keys(CLIENT_SAE, [sent[0].key_id])
            for k in sent:
                secrets += [k.key.hex(), base64.b64encode(k.key).decode()]
            c = Delta(before_c, await scrape(http, kme_c + "/metrics"))
            one = Delta(before_1, await scrape(http, kme_1 + "/metrics"))
            pair = {"sae": CLIENT_SAE, "peer_sae": node_sae_id("site1")}
            assert c("qstore_kme_key_delivered_bytes_total", **pair, direction="enc") == 3 * 64
            assert c("qstore_kme_keys_delivered_total", **pair, direction="enc") == 3
            assert one("qstore_kme_key_delivered_bytes_total", sae=node_sae_id("site1"), peer_sae=CLIENT_SAE,
                       direction="dec") == 3 * 64
            assert c("qstore_kme_link_delivered_bits_total", peer_kme=kme_id("site1")) == 3 * 512
            assert one("qstore_kme_link_retrieved_bits_total", peer_kme=kme_id("client")) == 3 * 512
            assert c.after.value("qstore_kme_key_pool_capacity_bits", peer_kme=kme_id("site1")) == 2**33
            rate = c.after.value("qstore_kme_link_rate_bits_per_second", peer_kme=kme_id("site1"))
            assert rate == float("inf")
            assert c.after.value("qstore_kme_key_pool_available_bits", peer_kme=kme_id("site2")) == 2**33
            assert c("qstore_kme_requests_total", operation="enc_keys", status="200") == 1
            assert c("qstore_kme_request_duration_seconds_count", operation="enc_keys") == 1
            assert c("qstore_kme_sent_bytes_total", operation="enc_keys") > 3 * 88  # base64 of each key
            assert one("qstore_kme_requests_total", operation="dec_keys", status="400") == 1
            assert one("qstore_kme_errors_total", operation="dec_keys", error="KeyIDRejected") == 1
            assert c.after.value("qstore_service_info", service="kme", instance=kme_id("client")) == 1

            # request IDs: honoured when safe, else replaced; in the header and in the log lines
            async with http.get(kme_c + f"/api/v1/keys/{node_sae_id('site1')}/status",
                                headers={"X-Request-ID": "probe-7"}) as resp:
                assert resp.status == 200 and resp.headers["X-Request-ID"] == "probe-7"
            async with http.get(kme_c + "/nowhere", headers={"X-Request-ID": "bad id"}) as resp:
                assert resp.status == 404 and re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-ID"])
                unmatched = resp.headers["X-Request-ID"]

            # -- node: a put and a get through QStore --------------------------------------------------
            before = {s: await scrape(http, cluster.urls[s] + "/metrics") for s in cluster.sites}
            data = os.urandom(100_000)
            async with QStore(cluster.state, chunk_size=64 << 10) as qs:
                await qs.create_bucket("metrics-1")
                await qs.put("metrics-1", "obj", data)
                assert await qs.get_bytes("metrics-1", "obj") == data
            reads = 0
            for s in cluster.sites:
                d = Delta(before[s], await scrape(http, cluster.urls[s] + "/metrics"))
                store = cluster.nodes[s].store.stats()
                assert d.after.value("qstore_node_objects") == store["objects"] == 1
                assert d.after.value("qstore_node_buckets") == 1
                assert d.after.value("qstore_node_stored_bytes") == store["stored_bytes"] >= len(data)
                assert d("qstore_node_requests_total", operation="commit", status="200") == 1
                reads += d("qstore_node_requests_total", operation="get_chunk", status="200")
                stats = cluster.nodes[s].runner.app[service.STATS][CLIENT_SAE]
                assert d("qstore_node_key_bytes_total", peer_sae=CLIENT_SAE, direction="in") == \
                    stats["key_in"] >= len(data)
                assert d("qstore_node_key_bytes_total", peer_sae=CLIENT_SAE, direction="out") == \
                    stats["key_out"]
                assert d("qstore_node_link_bytes_total", peer_sae=CLIENT_SAE, direction="in") == \
                    stats["bytes_in"]
                assert d("qstore_node_received_bytes_total") >= len(data)
            assert reads >= 2 * cluster.k  # two chunks from at least k nodes
            secrets += [data[:48].hex(), base64.b64encode(data[:48]).decode()]

            # /metrics needs a certificate of the cluster's CA
            bare = aiohttp.TCPConnector(ssl=_no_client_cert(me.ca))
            async with aiohttp.ClientSession(connector=bare) as stranger:
                with pytest.raises(aiohttp.ClientError):
                    async with stranger.get(cluster.urls["site1"] + "/metrics") as resp:
                        await resp.read()

            # -- gateway: boto3 PUT and GET, a presigned GET, a missing key --------------------------
            cluster.state.save()
            user = s3users.new_user("admin")
            secrets.append(user.secret_key)
            config = gateway.GatewayConfig(state_dir=cluster.root, users=s3users.Users([user]),
                                           sae_id=CLIENT_SAE)
            app = gateway.create_app(config)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=user.access_key,
                              aws_secret_access_key=user.secret_key, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 0}, s3={"addressing_style": "path"},
                                            signature_version="s3v4"))
            authorizations: list[str] = []
            s3.meta.events.register("before-send.s3", lambda request, **_: authorizations.append(
                request.headers.get("Authorization", b"")))
            async with aiohttp.ClientSession() as plain:
                before_gw = await scrape(plain, url + gateway.METRICS_PATH)
                body = os.urandom(50_000)
                await asyncio.to_thread(s3.create_bucket, Bucket="gw-1")
                put = await asyncio.to_thread(s3.put_object, Bucket="gw-1", Key="dir/k", Body=body)
                got = await asyncio.to_thread(s3.get_object, Bucket="gw-1", Key="dir/k")
                assert await asyncio.to_thread(got["Body"].read) == body
                presigned = s3.generate_presigned_url("get_object", Params={"Bucket": "gw-1", "Key": "dir/k"})
                async with plain.get(presigned) as resp:
                    assert resp.status == 200 and await resp.read() == body
                with pytest.raises(ClientError) as missing:
                    await asyncio.to_thread(s3.get_object, Bucket="gw-1", Key="nope")
                gw = Delta(before_gw, await scrape(plain, url + gateway.METRICS_PATH))
            put_id = put["ResponseMetadata"]["HTTPHeaders"]["x-request-id"]
            meta = missing.value.response["ResponseMetadata"]  # S3's request ID is the same
            assert meta["HTTPHeaders"]["x-request-id"] == meta["RequestId"] == \
                meta["HTTPHeaders"]["x-amz-request-id"]
            assert gw("qstore_s3_requests_total", operation="CreateBucket", status="200") == 1
            assert gw("qstore_s3_requests_total", operation="PutObject", status="200") == 1
            assert gw("qstore_s3_requests_total", operation="PutObject") == 1
            assert gw("qstore_s3_requests_total", operation="GetObject", status="200") == 2
            assert gw("qstore_s3_requests_total", operation="GetObject", status="404") == 1
            assert gw("qstore_s3_errors_total", operation="GetObject", error="NoSuchKey") == 1
            assert gw("qstore_s3_request_duration_seconds_count", operation="PutObject") == 1
            # two bodies, and the NoSuchKey error document
            sent = gw("qstore_s3_sent_bytes_total", operation="GetObject")
            assert 2 * len(body) < sent < 2 * len(body) + 1024
            assert len(body) <= gw("qstore_s3_received_bytes_total", operation="PutObject") < len(body) + 4096
            assert gw.after.value("qstore_service_info", service="s3", instance=CLIENT_SAE) == 1
            secrets += [a.decode() if isinstance(a, bytes) else a for a in authorizations if a]
            secrets += [m.group(1) for a in secrets[-len(authorizations):]
                        for m in [re.search(r"Signature=([0-9a-f]{64})", a)] if m]
            secrets.append(re.search(r"X-Amz-Signature=([0-9a-f]{64})", presigned).group(1))
            secrets += [body[:48].hex(), base64.b64encode(body[:48]).decode()]
    finally:
        if runner is not None:
            await runner.cleanup()
        await cluster.close()

    # -- the log lines -----------------------------------------------------------------------------
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    by_id: dict[str, list[dict]] = {}
    for line in lines:
        by_id.setdefault(line["request_id"], []).append(line)
    probe = [line for line in by_id["probe-7"] if line["logger"] == "qstore.access"]
    assert probe and probe[0]["operation"] == "status" and probe[0]["status"] == 200
    assert probe[0]["sae"] == CLIENT_SAE and "?" not in probe[0]["path"]
    assert by_id[unmatched][0]["operation"] == "unmatched"
    # the PutObject's ID followed it downstream, into the nodes' and the KMEs' log lines
    put_lines = [line for line in by_id[put_id] if line["logger"] == "qstore.access"]
    assert [line["operation"] for line in put_lines].count("PutObject") == 1
    ops = {line["operation"] for line in put_lines}
    # the gateway's client asks its KME for keys; the nodes store the (small, one-shot) share and ask theirs
    assert {"PutObject", "enc_keys", "oneshot", "dec_keys"} <= ops, ops
    text = captured.getvalue()
    assert len(secrets) > 10
    leaked = [s for s in secrets if s in text]
    assert not leaked
    if os.environ.get("QSTORE_SHOW_LOGS"):
        print(text)


def _no_client_cert(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx
