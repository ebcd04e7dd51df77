"""Two KMEs on 127.0.0.1 speaking ETSI GS QKD 014 over mutual TLS, with SAE clients.

Certificates come from qkd_sim.pki in a temporary directory; both KMEs share an
injected clock so that pool exhaustion and recovery are deterministic.
"""

import asyncio
import base64
import io
import json
import os
import ssl
import stat

import aiohttp
import pytest
from helpers import Clock

from qkd_sim import kme, pki
from qkd_sim.pool import LinkConfig
from qkd_sim.sae import KeySupplyExhausted, KMEError, SAEClient, SAEConfig
from qstore import otp

SEED = bytes.fromhex("5eed" * 16)
SAES_A = [f"a{i}" for i in range(1, 7)]
SAES_B = ["b1", "b2"]
DIRECTORY = {**dict.fromkeys(SAES_A, "KME_A"), **dict.fromkeys(SAES_B, "KME_B"), "c1": "KME_C"}
STATUS_FIELDS = ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                 "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                 "min_key_size", "max_SAE_ID_count"]


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(root / "ca")
    out = {name: pki.issue(ca, name, root / "certs") for name in SAES_A + SAES_B + ["stranger"]}
    for name in ("KME_A", "KME_B"):
        out[name] = pki.issue(ca, name, root / "certs", kind="kme")
    rogue_ca = pki.create_ca(root / "rogue", name="rogue-ca")
    out["rogue"] = pki.issue(rogue_ca, "a1", root / "rogue")  # claims to be a1, wrong CA
    return out


async def start_pair(ids, clock, **link):
    running = []
    for me, peer, saes in (("KME_A", "KME_B", SAES_A), ("KME_B", "KME_A", SAES_B)):
        config = kme.KMEConfig(
            kme_id=me, saes=frozenset(saes), directory=DIRECTORY,
            links=(LinkConfig(peer=peer, seed=SEED, **link),),
            cert=ids[me].cert, key=ids[me].key, ca=ids[me].ca, clock=clock,
        )
        running.append(await kme.start(config))
    return running


@pytest.fixture
async def kmes(ids):
    clock = Clock()
    a, b = await start_pair(ids, clock)
    yield a, b, clock
    await a.close()
    await b.close()


@pytest.fixture
async def dry_kmes(ids):
    """A link of 8192 bit/s and 16384 bits of capacity, empty at t = 0."""
    clock = Clock()
    a, b = await start_pair(ids, clock, rate_bps=8192.0, capacity_bits=16384.0, initial_bits=0.0)
    yield a, b, clock
    await a.close()
    await b.close()


def client(ids, name, running, **kw):
    ident = ids[name]
    return SAEClient(SAEConfig(sae_id=name, kme_url=running.url, cert=ident.cert, key=ident.key, ca=ident.ca,
                               **kw))


def raw(ids, name, *, ca=None):
    ident = ids[name]
    ctx = pki.client_ssl_context(ident.cert, ident.key, ca or ident.ca)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def call(session, method, url, **kw):
    async with session.request(method, url, **kw) as resp:
        return resp.status, await resp.read()


# -- the happy path --------------------------------------------------------------------------


async def test_status_fields(ids, kmes):
    a, _, _ = kmes
    async with raw(ids, "a1") as s:
        status, body = await call(s, "GET", f"{a.url}/api/v1/keys/b1/status")
    doc = json.loads(body)
    assert status == 200 and list(doc) == STATUS_FIELDS
    assert doc["source_KME_ID"] == "KME_A" and doc["target_KME_ID"] == "KME_B"
    assert doc["master_SAE_ID"] == "a1" and doc["slave_SAE_ID"] == "b1"
    assert doc["key_size"] == 256 and doc["max_key_size"] == 8388608 and doc["max_SAE_ID_count"] == 0
    assert doc["stored_key_count"] == doc["max_key_count"] > 0


async def test_enc_keys_then_dec_keys_give_identical_keys(ids, kmes):
    a, b, _ = kmes
    async with client(ids, "a1", a) as a1, client(ids, "b1", b) as b1:
        sent = await a1.get_enc_keys("b1", 3, 512)
        got = await b1.get_dec_keys("a1", [k.key_id for k in sent][::-1])
        assert got == sent[::-1]
        assert all(len(k.key) == 64 for k in sent)
        back = await b1.get_enc_keys("a1", 2)  # the other direction, default size
        assert await a1.get_dec_keys("b1", [k.key_id for k in back]) == back
        assert not {k.key for k in back} & {k.key for k in sent}


async def test_get_forms_of_enc_and_dec_keys(ids, kmes):
    a, b, _ = kmes
    async with raw(ids, "a1") as sa, raw(ids, "b1") as sb:
        status, body = await call(sa, "GET", f"{a.url}/api/v1/keys/b1/enc_keys",
                                  params={"number": "2", "size": "64"})
        keys = json.loads(body)["keys"]
        assert status == 200 and len(keys) == 2 and list(keys[0]) == ["key_ID", "key"]
        status, body = await call(sb, "GET", f"{b.url}/api/v1/keys/a1/dec_keys",
                                  params={"key_ID": keys[1]["key_ID"]})
        assert status == 200 and json.loads(body) == {"keys": [keys[1]]}


async def test_empty_post_body_asks_for_one_key_of_the_default_size(ids, kmes):
    a, _, _ = kmes
    async with raw(ids, "a1") as s:
        status, body = await call(s, "POST", f"{a.url}/api/v1/keys/b1/enc_keys")
    (key,) = json.loads(body)["keys"]
    assert status == 200 and len(base64.b64decode(key["key"])) == 32


async def test_send_and_receive_buffers_seal_and_open(ids, kmes):
    a, b, _ = kmes
    frame = os.urandom(10_000)
    async with client(ids, "a1", a, key_size=8 * 1024, batch=4) as a1, client(ids, "b1", b) as b1:
        envelope = otp.seal(frame, await a1.sender("b1").ensure(32 + len(frame)))
        refs = otp.parse_envelope_refs(envelope)
        assert otp.open_(envelope, await b1.receiver("a1").fetch(refs)) == frame
        assert a1.sender("b1").stream.available() == 10 * 1024 - 32 - len(frame)  # ceil(10032 / 1024) keys


async def test_one_mebibyte_keys(ids, kmes):
    a, b, _ = kmes
    async with client(ids, "a1", a) as a1, client(ids, "b1", b) as b1:
        sent = await a1.get_enc_keys("b1", 2, 8388608)
        assert [len(k.key) for k in sent] == [2**20] * 2
        assert await b1.get_dec_keys("a1", [k.key_id for k in sent]) == sent


async def test_large_key_containers_are_streamed_as_standard_json(ids, kmes):
    """Sent in pieces with a Content-Length, the body is the standard JSON, base64 as RFC 4648."""
    a, b, _ = kmes
    async with raw(ids, "a1") as a1, raw(ids, "b1") as b1:
        request = {"number": 3, "size": 8 * 700_001}
        async with a1.post(f"{a.url}/api/v1/keys/b1/enc_keys", json=request) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            body = await resp.read()
            assert resp.content_length == len(body) and "Transfer-Encoding" not in resp.headers
        sent = json.loads(body)["keys"]
        assert [len(base64.b64decode(k["key"], validate=True)) for k in sent] == [700_001] * 3
        status, got = await call(b1, "POST", f"{b.url}/api/v1/keys/a1/dec_keys",
                                 json={"key_IDs": [{"key_ID": k["key_ID"]} for k in sent]})
        assert status == 200 and json.loads(got)["keys"] == sent


async def test_concurrent_callers_never_share_a_key(ids, kmes):
    a, b, _ = kmes
    clients = [client(ids, name, a) for name in SAES_A]
    for c in clients:
        await c.__aenter__()
    try:
        jobs = [c.get_enc_keys(slave, 8, 128) for c in clients for slave in SAES_B for _ in range(4)]
        batches = await asyncio.gather(*jobs)
        keys = [k for batch in batches for k in batch]
        assert len(keys) == len(SAES_A) * len(SAES_B) * 4 * 8
        assert len({k.key_id for k in keys}) == len(keys)
        assert len({k.key for k in keys}) == len(keys)
        async with client(ids, "b1", b) as b1, client(ids, "b2", b) as b2:  # each slave gets exactly its keys
            slaves = {"b1": b1, "b2": b2}
            for i, batch in enumerate(batches):
                master, slave = SAES_A[i // 8], SAES_B[i // 4 % 2]
                assert await slaves[slave].get_dec_keys(master, [k.key_id for k in batch]) == batch
    finally:
        for c in clients:
            await c.close()


async def test_health(ids, kmes):
    a, _, _ = kmes
    async with raw(ids, "a1") as s:
        status, body = await call(s, "GET", f"{a.url}/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "KME_ID": "KME_A"}


# -- refusals ------------------------------------------------------------------------------


async def test_second_dec_keys_is_400(ids, kmes):
    a, b, _ = kmes
    async with client(ids, "a1", a) as a1, raw(ids, "b1") as sb:
        (key,) = await a1.get_enc_keys("b1")
        body = {"key_IDs": [{"key_ID": key.key_id}]}
        url = f"{b.url}/api/v1/keys/a1/dec_keys"
        assert (await call(sb, "POST", url, json=body))[0] == 200
        status, payload = await call(sb, "POST", url, json=body)
    assert status == 400
    err = json.loads(payload)
    assert "already retrieved" in err["message"] and err["details"] == [{"key_ID": key.key_id}]


async def test_dec_keys_by_another_sae_is_401_without_body(ids, kmes):
    a, b, _ = kmes
    async with client(ids, "a1", a) as a1, raw(ids, "b2") as sb2, client(ids, "b1", b) as b1:
        (key,) = await a1.get_enc_keys("b1")
        status, payload = await call(sb2, "POST", f"{b.url}/api/v1/keys/a1/dec_keys",
                                     json={"key_IDs": [{"key_ID": key.key_id}]})
        assert (status, payload) == (401, b"")
        assert await b1.get_dec_keys("a1", [key.key_id]) == [key]  # the real slave still gets it


async def test_client_certificate_of_another_ca_fails_the_handshake(ids, kmes):
    a, _, _ = kmes
    async with raw(ids, "rogue", ca=ids["a1"].ca) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await call(s, "GET", f"{a.url}/api/v1/keys/b1/status")
    ctx = ssl.create_default_context(cafile=str(ids["a1"].ca))  # no client certificate at all
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await call(s, "GET", f"{a.url}/api/v1/keys/b1/status")


@pytest.mark.parametrize("who", ["stranger", "KME_B", "b1"])
async def test_our_ca_but_not_an_sae_of_this_kme_is_401_without_body(ids, kmes, who):
    a, _, _ = kmes
    async with raw(ids, who) as s:
        for method, path, kw in (("GET", "b1/status", {}), ("POST", "b1/enc_keys", {"json": {}}),
                                 ("POST", "b1/enc_keys", {"data": b"garbage"}),
                                 ("GET", "a1/dec_keys", {"params": {"key_ID": "x"}})):
            assert await call(s, method, f"{a.url}/api/v1/keys/{path}", **kw) == (401, b"")


@pytest.mark.parametrize(("body", "words"), [
    ({"number": 1, "size": 100}, "multiple of 8"),
    ({"number": 129}, "max_key_per_request"),
    ({"number": 1, "extension_mandatory": [{"abc_route_type": "direct"}]}, "extension_mandatory"),
    ({"number": 1, "additional_slave_SAE_IDs": ["b2"]}, "multicast"),
    ({"number": 1, "size": 8388616}, "outside"),
    ({"number": "1"}, "number"),
])
async def test_bad_enc_keys_requests_are_400_with_message_and_details(ids, kmes, body, words):
    a, _, _ = kmes
    async with raw(ids, "a1") as s:
        status, payload = await call(s, "POST", f"{a.url}/api/v1/keys/b1/enc_keys", json=body)
    err = json.loads(payload)
    assert status == 400 and words in err["message"]
    if words != "number":
        assert isinstance(err["details"], list) and err["details"]


@pytest.mark.parametrize(("method", "path", "kw"), [
    ("POST", "b1/enc_keys", {"data": b"{not json"}),
    ("GET", "b1/enc_keys", {"params": {"number": "two"}}),
    ("GET", "a1/dec_keys", {"params": {"key_ID": "not-a-uuid"}}),
    ("POST", "a1/dec_keys", {"json": {"key_IDs": [{"key_ID": "550e8400-e29b-41d4-a716-446655440000"}]}}),
    ("POST", "c1/enc_keys", {"json": {}}),
    ("POST", "nobody/enc_keys", {"json": {}}),
    ("POST", "a1/enc_keys", {"data": io.BytesIO(b"x" * (2 << 20))}),
])
async def test_other_bad_requests_are_400(ids, kmes, method, path, kw):
    _, b, _ = kmes
    async with raw(ids, "b1") as s:
        status, payload = await call(s, method, f"{b.url}/api/v1/keys/{path}", **kw)
    assert status == 400 and json.loads(payload)["message"]


async def test_no_direct_link_is_named(ids, kmes):
    a, _, _ = kmes
    async with client(ids, "a1", a) as a1:
        with pytest.raises(KMEError, match="no direct QKD link between KME KME_A and KME KME_C") as err:
            await a1.get_enc_keys("c1")
    assert err.value.kme_status == 400


# -- running dry -----------------------------------------------------------------------------


async def test_exhaustion_is_503_then_recovers_when_the_clock_advances(ids, dry_kmes):
    a, _, clock = dry_kmes
    url = f"{a.url}/api/v1/keys/b1/enc_keys"
    async with raw(ids, "a1") as s:
        status, payload = await call(s, "POST", url, json={"number": 4})
        assert status == 503 and "not enough key" in json.loads(payload)["message"]
        clock.t = 1.0  # 8192 bits generated
        status, payload = await call(s, "POST", url, json={"number": 33})  # 8448 bits: still too many
        assert status == 503
        status, payload = await call(s, "POST", url, json={"number": 32})
        assert status == 200 and len(json.loads(payload)["keys"]) == 32
        status, _ = await call(s, "POST", url, json={"number": 1})
        assert status == 503
        status, payload = await call(s, "GET", f"{a.url}/api/v1/keys/b1/status")
        assert json.loads(payload)["stored_key_count"] == 0


async def test_sae_gives_up_naming_the_link(ids, dry_kmes):
    a, _, _ = dry_kmes
    async with client(ids, "a1", a, wait_s=0.3, backoff_s=0.02) as a1:
        await a1.get_status("b1")
        with pytest.raises(KeySupplyExhausted) as err:
            await a1.get_enc_keys("b1", 2)
    message = str(err.value)
    assert "SAE a1 → SAE b1" in message and "KME_A → KME_B" in message
    assert err.value.status == 503 and err.value.waited_s >= 0.3


async def test_sae_backs_off_until_the_link_refills(ids, dry_kmes):
    a, b, clock = dry_kmes
    async with client(ids, "a1", a, wait_s=10.0, backoff_s=0.02) as a1, client(ids, "b1", b) as b1:
        async def refill():
            await asyncio.sleep(0.15)
            clock.t = 2.0
        task = asyncio.create_task(refill())
        keys = await a1.get_enc_keys("b1", 8)
        await task
        assert await b1.get_dec_keys("a1", [k.key_id for k in keys]) == keys


# -- the PKI --------------------------------------------------------------------------------


def test_key_files_are_private_and_ids_come_from_certificates(ids):
    for ident in ids.values():
        assert stat.S_IMODE(ident.key.stat().st_mode) == 0o600
    ca_key = ids["a1"].ca.with_name("ca.key")
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    good = {"subject": ((("commonName", "a1"),),), "subjectAltName": (("URI", "urn:qstore:sae:a1"),)}
    assert pki.sae_id_from_peercert(good) == "a1"
    assert pki.sae_id_from_peercert({**good, "subjectAltName": (("URI", "urn:qstore:sae:a2"),)}) is None
    assert pki.sae_id_from_peercert({**good, "subjectAltName": (("URI", "urn:qstore:kme:a1"),)}) is None
    assert pki.sae_id_from_peercert({"subject": ((("commonName", "a1"),), (("commonName", "a2"),))}) is None
    assert pki.sae_id_from_peercert(None) is None
