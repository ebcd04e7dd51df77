"""Trusted-node key relay: KME_A and KME_C share no link, KME_B sits between them.

First the protocol without sockets (payload codec, routing, one relay driven
through three in-memory KMEs), then three real KMEs on 127.0.0.1 over mutual
TLS with certificates from qkd_sim.pki, sharing an injected clock.
"""

import base64
import contextlib
import json
import os
import socket
import uuid

import aiohttp
import pytest
from helpers import Clock
from hypothesis import given
from hypothesis import strategies as st

from qkd_sim import kme, pki, relay
from qkd_sim.etsi014 import KeyContainer, KeyIDs, KeyRequest, KMECore, Unauthorized, dumps
from qkd_sim.pool import LinkConfig
from qkd_sim.relay import RELAY_PATH, RelayError, RelayFailed, RelayKME, RelayPayload, RelayStep
from qkd_sim.sae import KeySupplyExhausted, SAEClient, SAEConfig
from qstore import otp
from qstore.errors import SealError

SEED_AB = bytes.fromhex("ab" * 32)
SEED_BC = bytes.fromhex("bc" * 32)
KMES = ("KME_A", "KME_B", "KME_C")
SAES = {"KME_A": ["a1", "a2"], "KME_B": ["b1"], "KME_C": ["c1", "c2"]}
DIRECTORY = {sae: k for k, saes in SAES.items() for sae in saes}
KME_LINKS = [("KME_A", "KME_B"), ("KME_B", "KME_C")]


def links_of(me, **bc):
    """This KME's LinkConfigs: A–B unlimited, B–C with the given pool parameters."""
    out = []
    if me in ("KME_A", "KME_B"):
        out.append(LinkConfig(peer="KME_B" if me == "KME_A" else "KME_A", seed=SEED_AB))
    if me in ("KME_B", "KME_C"):
        out.append(LinkConfig(peer="KME_C" if me == "KME_B" else "KME_B", seed=SEED_BC, **bc))
    return out


def cost_bits(count, size, master="a1", slave="c1", source="KME_A", target="KME_C"):
    """Link key one hop spends to relay ``count`` keys of ``size`` bits: MAC key + pad of the payload."""
    return 8 * (otp.OTK_SIZE + RelayPayload.encoded_size(size, count, source, target, master, slave))


# -- without sockets --------------------------------------------------------------------------


def test_routes_come_from_the_kme_links():
    assert relay.next_hops("KME_A", KME_LINKS) == {"KME_C": "KME_B"}
    assert relay.next_hops("KME_B", KME_LINKS) == {}
    assert relay.next_hops("KME_C", KME_LINKS) == {"KME_A": "KME_B"}
    ring = [("A", "B", 100.0), ("B", "D", 100.0), ("A", "C", 1.0), ("C", "D", 1.0), ("D", "E", 5.0)]
    assert relay.next_hops("A", ring) == {"D": "B", "E": "B"}  # the widest path, not the first found
    with pytest.raises(ValueError, match="linked"):
        RelayKME(core_of("KME_A"), routes={"KME_B": "KME_B"})
    with pytest.raises(ValueError, match="no QKD link"):
        RelayKME(core_of("KME_A"), routes={"KME_C": "KME_X"})


def test_kme_identity_comes_from_the_kme_uri_only():
    kme_cert = {"subject": ((("commonName", "KME_B"),),),
                "subjectAltName": (("URI", "urn:qstore:kme:KME_B"), ("IP Address", "127.0.0.1"))}
    assert relay.kme_id_from_peercert(kme_cert) == "KME_B"
    sae_cert = {"subject": ((("commonName", "KME_B"),),),
                "subjectAltName": (("URI", "urn:qstore:sae:KME_B"),)}
    assert relay.kme_id_from_peercert(sae_cert) is None
    assert relay.kme_id_from_peercert({"subject": ((("commonName", "KME_B"),),)}) is None
    other = {**kme_cert, "subjectAltName": (("URI", "urn:qstore:kme:KME_C"),)}
    assert relay.kme_id_from_peercert(other) is None
    both = {**kme_cert, "subjectAltName": (("URI", "urn:qstore:kme:KME_B"), ("URI", "urn:qstore:sae:x"))}
    assert relay.kme_id_from_peercert(both) is None
    assert relay.kme_id_from_peercert(None) is None
    assert pki.sae_id_from_peercert(kme_cert) is None  # and a KME certificate is no SAE


def sample_payload(count=3, size=64, hops=0):
    return RelayPayload(source_KME_ID="KME_A", target_KME_ID="KME_C", master_SAE_ID="a1", slave_SAE_ID="c1",
                        size=size, key_IDs=tuple(str(uuid.uuid4()) for _ in range(count)),
                        material=os.urandom(count * size // 8), hops=hops)


def test_payload_roundtrip_and_size():
    p = sample_payload()
    data = p.encode()
    assert RelayPayload.decode(data) == p
    assert len(data) == RelayPayload.encoded_size(64, 3, "KME_A", "KME_C", "a1", "c1")
    assert len(p.forwarded().encode()) == len(data) and p.forwarded().hops == 1
    assert "material" not in repr(p) and p.material.hex() not in repr(p)
    with pytest.raises(RelayError, match="more than"):
        sample_payload(hops=relay.MAX_HOPS - 1).forwarded()


@given(st.binary(max_size=300))
def test_payload_decoder_raises_only_relay_error(data):
    for candidate in (data, sample_payload(count=2, size=8).encode()[: len(data)] + data[:3]):
        with contextlib.suppress(RelayError):
            RelayPayload.decode(candidate)


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_flipped_payload_bits_are_caught_by_the_decoder_or_decode(pos, bit):
    data = bytearray(sample_payload(count=2, size=16).encode())
    data[pos % len(data)] ^= 1 << bit
    with contextlib.suppress(RelayError):
        RelayPayload.decode(bytes(data))


def core_of(me, **bc):
    return KMECore(kme_id=me, saes=SAES[me], directory=DIRECTORY, links=links_of(me, **bc))


def relays(**bc):
    return {me: RelayKME(core_of(me, **bc), routes=relay.next_hops(me, KME_LINKS)) for me in KMES}


def test_one_relay_in_memory():
    k = relays()
    step = k["KME_A"].enc_keys("a1", "c1", KeyRequest(number=2, size=128), 0.0)
    assert isinstance(step, RelayStep) and (step.from_KME_ID, step.next_KME_ID) == ("KME_A", "KME_B")
    forward = k["KME_B"].receive("KME_A", step.envelope, 0.0)
    assert isinstance(forward, RelayStep) and forward.next_KME_ID == "KME_C"
    ack = k["KME_C"].receive("KME_B", forward.envelope, 0.0)
    assert ack == {"target_KME_ID": "KME_C", "key_count": 2}
    assert forward.finish(200, dumps(ack), answered_by="KME_C") == ack
    keys = step.finish(200, dumps(ack), answered_by="KME_B")
    assert isinstance(keys, KeyContainer) and [len(key.key) for key in keys.keys] == [16, 16]
    assert all(uuid.UUID(key.key_ID).version == 4 for key in keys.keys)
    ids = KeyIDs.of(key.key_ID for key in keys.keys)
    with pytest.raises(Unauthorized):
        k["KME_C"].dec_keys("c2", "a1", ids, 0.0)
    assert k["KME_C"].dec_keys("c1", "a1", ids, 0.0) == keys
    spent = cost_bits(2, 128)
    assert k["KME_A"].spent_bits == {"KME_B": spent} and k["KME_B"].spent_bits == {"KME_C": spent}
    assert k["KME_B"].received_bits == {"KME_A": spent} and k["KME_C"].received_bits == {"KME_B": spent}
    # the same envelope again: its link key is spent, so it is refused and stores nothing
    with pytest.raises(SealError):
        k["KME_C"].receive("KME_B", forward.envelope, 0.0)
    assert len(k["KME_C"].store) == 0


def test_a_step_names_the_hop_that_failed():
    k = relays()
    step = k["KME_A"].enc_keys("a1", "c1", KeyRequest(), 0.0)
    later = RelayFailed.at(source="KME_A", target="KME_C", hop_from="KME_B", hop_to="KME_C", reason="dry")
    body = dumps({"message": str(later), "details": list(later.details)})
    with pytest.raises(RelayFailed, match="failed at hop KME_B → KME_C: dry") as err:
        step.finish(503, body, answered_by="KME_B")
    assert (err.value.hop_from, err.value.hop_to) == ("KME_B", "KME_C")
    with pytest.raises(RelayFailed, match="failed at hop KME_A → KME_B: KME_B answered 400: bad"):
        step.finish(400, dumps({"message": "bad"}), answered_by="KME_B")
    with pytest.raises(RelayFailed, match="answered by KME_C, not KME_B"):
        step.finish(200, b"{}", answered_by="KME_C")
    with pytest.raises(RelayFailed, match="KME_A → KME_B: gone"):
        step.unreachable("gone")


def test_relayed_status_counts_what_the_first_hop_can_carry():
    k = relays()
    status = k["KME_A"].status("a1", "c1", 0.0)
    assert (status.source_KME_ID, status.target_KME_ID) == ("KME_A", "KME_C")
    assert status.stored_key_count == status.max_key_count == 100_000
    assert status.status_extension == {"relay": {"next_hop_KME_ID": "KME_B",
                                                 "max_relay_bytes": relay.MAX_RELAY_BYTES}}
    assert status.max_key_per_request == 128 and status.max_key_size < 8 * relay.MAX_RELAY_BYTES
    dry = relays(rate_bps=8192.0, capacity_bits=16384.0, initial_bits=0.0)["KME_C"]
    assert dry.status("c1", "a1", 0.0).stored_key_count == 0
    per_key, fixed = 8 * (16 + 32), cost_bits(0, 8, "c1", "a1", "KME_C", "KME_A")
    assert dry.status("c1", "a1", 1.0).stored_key_count == (8192 - fixed) // per_key
    assert dry.status("c1", "a1", 1.0).max_key_count == (16384 - fixed) // per_key


# -- three KMEs over mutual TLS ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(root / "ca")
    out = {sae: pki.issue(ca, sae, root / "certs") for sae in DIRECTORY}
    for name in KMES:
        out[name] = pki.issue(ca, name, root / "certs", kind="kme")
    return out


async def start_three(ids, clock, *, misdirect=False, **bc):
    socks = {}
    for name in KMES:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks[name] = sock
    urls = {name: f"https://127.0.0.1:{sock.getsockname()[1]}" for name, sock in socks.items()}
    running = {}
    try:
        for me in KMES:
            peers = {k: u for k, u in urls.items() if k != me}
            if misdirect and me == "KME_A":
                peers["KME_B"] = urls["KME_C"]  # a wrong address: C answers where B should
            config = kme.KMEConfig(
                kme_id=me, saes=frozenset(SAES[me]), directory=DIRECTORY, links=tuple(links_of(me, **bc)),
                routes=relay.next_hops(me, KME_LINKS), peers=peers,
                cert=ids[me].cert, key=ids[me].key, ca=ids[me].ca, clock=clock, relay_timeout_s=5.0,
            )
            running[me] = await kme.start(config, sock=socks[me])
    except BaseException:
        for r in running.values():
            await r.close()
        for sock in socks.values():
            sock.close()
        raise
    return running


@pytest.fixture
async def three(ids):
    clock = Clock()
    running = await start_three(ids, clock)
    yield running, clock
    for r in running.values():
        await r.close()


@pytest.fixture
async def dry_three(ids):
    """B–C at 8192 bit/s, 16384 bits of capacity, empty at t = 0; A–B unlimited."""
    clock = Clock()
    running = await start_three(ids, clock, rate_bps=8192.0, capacity_bits=16384.0, initial_bits=0.0)
    yield running, clock
    for r in running.values():
        await r.close()


def client(ids, name, running, **kw):
    ident = ids[name]
    return SAEClient(SAEConfig(sae_id=name, kme_url=running.url, cert=ident.cert, key=ident.key, ca=ident.ca,
                               **kw))


def raw(ids, name):
    ident = ids[name]
    ctx = pki.client_ssl_context(ident.cert, ident.key, ident.ca)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def call(session, method, url, **kw):
    async with session.request(method, url, **kw) as resp:
        return resp.status, await resp.read()


def link_bits(running):
    """Key each end of each link direction has given out / taken in."""
    a, b, c = (running[k].core for k in KMES)
    return {"A→B sent": a.outbound("KME_B").delivered_bits, "A→B opened": b.inbound("KME_A").retrieved_bits,
            "B→C sent": b.outbound("KME_C").delivered_bits, "B→C opened": c.inbound("KME_B").retrieved_bits,
            "B→A sent": b.outbound("KME_A").delivered_bits, "C→B sent": c.outbound("KME_B").delivered_bits}


async def test_a1_gets_keys_for_c1_relayed_through_b(ids, three):
    running, _ = three
    a, b, c = (running[k] for k in KMES)
    async with client(ids, "a1", a) as a1, client(ids, "c1", c) as c1, raw(ids, "c2") as s2, \
            raw(ids, "c1") as s1:
        status = await a1.get_status("c1")
        assert status.target_KME_ID == "KME_C" and status.stored_key_count > 0
        assert status.status_extension["relay"]["next_hop_KME_ID"] == "KME_B"
        sent = await a1.get_enc_keys("c1", 3, 512)
        assert [len(k.key) for k in sent] == [64] * 3 and len(c.relay.store) == 3
        body = {"key_IDs": [{"key_ID": k.key_id} for k in sent]}
        assert await call(s2, "POST", f"{c.url}/api/v1/keys/a1/dec_keys", json=body) == (401, b"")
        assert await c1.get_dec_keys("a1", [k.key_id for k in sent]) == sent
        status, payload = await call(s1, "POST", f"{c.url}/api/v1/keys/a1/dec_keys", json=body)
        assert status == 400 and "already retrieved" in json.loads(payload)["message"]
    spent = cost_bits(3, 512)
    assert 0 < spent - 3 * 512 <= 8 * (32 + 64 + 3 * 16)  # MAC key, header and key_IDs
    assert link_bits(running) == {"A→B sent": spent, "A→B opened": spent, "B→C sent": spent,
                                  "B→C opened": spent, "B→A sent": 0, "C→B sent": 0}
    assert a.relay.spent_bits == {"KME_B": spent} and b.relay.spent_bits == {"KME_C": spent}
    assert len(a.relay.store) == len(b.relay.store) == len(c.relay.store) == 0


async def test_relay_runs_the_other_way_too_and_direct_pairs_stay_direct(ids, three):
    running, _ = three
    a, b, c = (running[k] for k in KMES)
    async with client(ids, "c1", c) as c1, client(ids, "a2", a) as a2, client(ids, "b1", b) as b1:
        sent = await c1.get_enc_keys("a2", 2)
        assert await a2.get_dec_keys("c1", [k.key_id for k in sent]) == sent
        direct = await a2.get_enc_keys("b1", 1)
        assert await b1.get_dec_keys("a2", [direct[0].key_id]) == direct
    bits = link_bits(running)
    assert bits["C→B sent"] == bits["B→A sent"] == cost_bits(2, 256, "c1", "a2", "KME_C", "KME_A")
    assert bits["A→B sent"] == 256 and b.relay.spent_bits == {"KME_A": bits["B→A sent"]}


async def test_a_dry_hop_is_503_at_the_origin_naming_it_and_nothing_is_delivered(ids, dry_three):
    running, clock = dry_three
    a, b, c = (running[k] for k in KMES)
    url = f"{a.url}/api/v1/keys/c1/enc_keys"
    async with raw(ids, "a1") as s:
        status, payload = await call(s, "POST", url, json={"number": 2})
        err = json.loads(payload)
        assert status == 503 and "keys" not in err
        assert "key relay KME_A → KME_C failed at hop KME_B → KME_C" in err["message"]
        assert "not enough key on link KME_B → KME_C" in err["message"]
        hop = err["details"][0]
        assert (hop["hop_from_KME_ID"], hop["hop_to_KME_ID"]) == ("KME_B", "KME_C")
        assert len(c.relay.store) == 0 and c.relay.received_bits == {}
        assert link_bits(running)["B→C sent"] == link_bits(running)["B→C opened"] == 0
        wasted = a.relay.spent_bits["KME_B"]  # the first hop was spent before the second failed
        assert wasted == cost_bits(2, 256) == b.relay.received_bits["KME_A"]
        clock.t = 1.0  # the B–C link has made 8192 bits
        status, payload = await call(s, "POST", url, json={"number": 2})
        assert status == 200
        keys = json.loads(payload)["keys"]
    async with client(ids, "c1", c) as c1:
        got = await c1.get_dec_keys("a1", [k["key_ID"] for k in keys])
    assert [k.key for k in got] == [base64.b64decode(k["key"]) for k in keys]
    async with client(ids, "a1", a, wait_s=0.2, backoff_s=0.05) as a1:
        with pytest.raises(KeySupplyExhausted, match="KME_A → KME_C, relayed via KME_B") as err:
            await a1.get_enc_keys("c1", 32)
    assert "failed at hop KME_B → KME_C" in str(err.value)


async def test_certificates_of_the_wrong_kind_are_401(ids, three):
    running, _ = three
    a, b, _ = (running[k] for k in KMES)
    async with raw(ids, "a1") as sae, raw(ids, "b1") as local_sae:
        assert await call(sae, "POST", f"{b.url}{RELAY_PATH}", data=b"x" * 100) == (401, b"")
        assert await call(local_sae, "POST", f"{b.url}{RELAY_PATH}", data=b"x") == (401, b"")
    async with raw(ids, "KME_C") as not_a_neighbour:
        assert await call(not_a_neighbour, "POST", f"{a.url}{RELAY_PATH}", data=b"x") == (401, b"")
    async with raw(ids, "KME_A") as kme_cert:
        assert await call(kme_cert, "GET", f"{a.url}/api/v1/keys/c1/status") == (401, b"")
        assert await call(kme_cert, "POST", f"{a.url}/api/v1/keys/c1/enc_keys", json={}) == (401, b"")
    assert link_bits(running)["A→B opened"] == 0


@pytest.mark.parametrize("where", ["ciphertext", "tag", "key reference"])
async def test_a_tampered_envelope_is_rejected_and_stores_nothing(ids, three, where):
    running, clock = three
    a, b, c = (running[k] for k in KMES)
    position = {"ciphertext": -20, "tag": -1, "key reference": 7 + 17}[where]

    def flipped(envelope):
        data = bytearray(envelope)
        data[position] ^= 0x10
        return bytes(data)

    # first hop: A's envelope to B, with one bit flipped on the way
    step = a.relay.enc_keys("a1", "c1", KeyRequest(number=2), clock())
    async with raw(ids, "KME_A") as as_a:
        status, payload = await call(as_a, "POST", f"{b.url}{RELAY_PATH}", data=flipped(step.envelope))
        assert status == 400 and json.loads(payload)["message"] == "relay envelope rejected"
        assert b.relay.spent_bits == {} and len(c.relay.store) == 0
        # A tag tried once burns its link key (one guess per one-time key), so the genuine envelope
        # is refused too; an altered reference named no key of this link, and burnt none.
        status, _ = await call(as_a, "POST", f"{b.url}{RELAY_PATH}", data=step.envelope)
        assert status == (200 if where == "key reference" else 400)
        assert len(c.relay.store) == (2 if where == "key reference" else 0)

    # last hop: B's envelope to C
    payload_ = sample_payload(count=1, size=256)
    outbound = b.core.outbound("KME_C")
    async with raw(ids, "KME_B") as as_b:
        bad = flipped(relay.seal_for_link(payload_.encode(), outbound, clock()))
        status, _ = await call(as_b, "POST", f"{c.url}{RELAY_PATH}", data=bad)
        stored = len(c.relay.store)
        assert status == 400 and stored in (0, 2)
        good = relay.seal_for_link(payload_.encode(), outbound, clock())  # control: intact, fresh key
        assert (await call(as_b, "POST", f"{c.url}{RELAY_PATH}", data=good))[0] == 200
    assert len(c.relay.store) == stored + 1
    async with client(ids, "c1", c) as c1:
        (key,) = await c1.get_dec_keys("a1", payload_.key_IDs)
    assert key.key == payload_.material



async def test_the_next_hop_must_be_the_kme_its_certificate_names(ids):
    clock = Clock()
    running = await start_three(ids, clock, misdirect=True)
    try:
        a, _, c = (running[k] for k in KMES)
        async with raw(ids, "a1") as s:
            status, payload = await call(s, "POST", f"{a.url}/api/v1/keys/c1/enc_keys", json={})
        message = json.loads(payload)["message"]
        assert status == 503 and "failed at hop KME_A → KME_B" in message and "is not KME KME_B" in message
        assert len(c.relay.store) == 0 and c.relay.received_bits == {}
    finally:
        for r in running.values():
            await r.close()
