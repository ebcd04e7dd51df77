"""Link key pools without I/O: both ends agree, keys are served once, rates and capacity hold."""

import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd_sim.pool import (
    MAX_KEY_BITS,
    KeyIDCodec,
    KeyIDNotYours,
    KeyIDRejected,
    KeyState,
    LinkConfig,
    LinkPool,
    PoolEmpty,
)
from qstore.errors import KeyShortage, LocalError, RemoteError

SEED = bytes(range(32))
PAIR = {"master_sae": "a1", "slave_sae": "b1"}


def ends(**kw):
    """(master end, slave end) of the direction A → B."""
    master = LinkPool(seed=SEED, master_kme="A", slave_kme="B", **kw)
    slave = LinkPool(seed=SEED, master_kme="A", slave_kme="B", **kw)
    return master, slave


def test_both_ends_derive_the_same_keys():
    master, slave = ends()
    keys = master.take(5, 256, 0.0, **PAIR)
    assert [len(k) for _, k in keys] == [32] * 5
    assert len({k for _, k in keys}) == 5
    assert slave.lookup([kid for kid, _ in keys], 0.0, **PAIR) == [k for _, k in keys]


def test_key_ids_are_v4_uuids_in_canonical_form():
    master, _ = ends()
    for kid, _ in master.take(50, 64, 0.0, **PAIR):
        u = uuid.UUID(kid)
        assert str(u) == kid and u.version == 4 and u.variant == uuid.RFC_4122


def test_directions_and_seeds_give_different_streams():
    ab = LinkPool(seed=SEED, master_kme="A", slave_kme="B")
    ba = LinkPool(seed=SEED, master_kme="B", slave_kme="A")
    other = LinkPool(seed=bytes(32), master_kme="A", slave_kme="B")
    k1 = ab.take(1, 256, 0.0, **PAIR)[0]
    k2 = ba.take(1, 256, 0.0, **PAIR)[0]
    k3 = other.take(1, 256, 0.0, **PAIR)[0]
    assert len({k1[1], k2[1], k3[1]}) == 3
    assert len({k1[0], k2[0], k3[0]}) == 3
    # a key_ID of one direction means nothing in the other
    with pytest.raises(KeyIDRejected):
        LinkPool(seed=SEED, master_kme="B", slave_kme="A").lookup([k1[0]], 0.0, **PAIR)


def test_variable_sizes_are_consecutive_ranges_and_retrieved_in_any_order():
    master, slave = ends()
    keys = [k for count, size in ((1, 8), (3, 8000), (1, 24)) for k in master.take(count, size, 0.0, **PAIR)]
    ids = [kid for kid, _ in keys]
    got = slave.lookup(ids[::-1], 0.0, **PAIR)
    assert got == [k for _, k in keys][::-1]
    assert master.delivered_bits == slave.retrieved_bits == 8 * (1 + 3000 + 3)


def test_one_mebibyte_keys():
    master, slave = ends()
    (kid, key), = master.take(1, MAX_KEY_BITS, 0.0, **PAIR)
    assert len(key) == 2**20
    assert slave.lookup([kid], 0.0, **PAIR) == [key]
    with pytest.raises(LocalError):
        master.take(1, MAX_KEY_BITS + 8, 0.0, **PAIR)


def test_second_retrieval_fails_with_400():
    master, slave = ends()
    kid = master.take(1, 256, 0.0, **PAIR)[0][0]
    slave.lookup([kid], 0.0, **PAIR)
    with pytest.raises(KeyIDRejected) as err:
        slave.lookup([kid], 0.0, **PAIR)
    assert err.value.status == 400 and "already retrieved" in str(err.value)
    assert slave.state(0, 32, 0.0) is KeyState.DELIVERED


def test_lookup_is_all_or_nothing():
    master, slave = ends()
    good, used = (kid for kid, _ in master.take(2, 256, 0.0, **PAIR))
    slave.lookup([used], 0.0, **PAIR)
    for bad in ([good, used], [good, good], [good, str(uuid.uuid4())]):
        with pytest.raises(KeyIDRejected):
            slave.lookup(bad, 0.0, **PAIR)
    assert len(slave.lookup([good], 0.0, **PAIR)) == 1  # still there after the refusals


def test_key_ids_are_bound_to_the_sae_pair():
    master, slave = ends()
    kid = master.take(1, 256, 0.0, **PAIR)[0][0]
    for pair in ({"master_sae": "a1", "slave_sae": "c1"}, {"master_sae": "a2", "slave_sae": "b1"}):
        with pytest.raises(KeyIDNotYours) as err:
            slave.lookup([kid], 0.0, **pair)
        assert err.value.status == 401
    assert slave.lookup([kid], 0.0, **PAIR)  # not consumed by the refused attempts


def test_take_is_all_or_nothing_and_refills_at_the_rate():
    master, slave = ends(rate_bps=1000.0, capacity_bits=4000.0, initial_bits=0.0, epoch=10.0)
    assert master.available_bits(10.0) == 0
    with pytest.raises(PoolEmpty) as err:
        master.take(1, 8, 10.0, **PAIR)
    assert err.value.status == 503 and isinstance(err.value, KeyShortage)
    assert master.available_bits(12.0) == 2000
    with pytest.raises(PoolEmpty):
        master.take(3, 800, 12.0, **PAIR)  # 2400 > 2000: nothing taken
    keys = master.take(2, 800, 12.0, **PAIR)
    assert master.available_bits(12.0) == pytest.approx(400)
    assert master.available_bits(100.0) == 4000  # capped at capacity
    assert len(slave.lookup([kid for kid, _ in keys], 12.0, **PAIR)) == 2


def test_unlimited_rate_stays_full():
    master, _ = ends(rate_bps=math.inf, capacity_bits=8000.0, initial_bits=0.0)
    assert master.available_bits(-5.0) == 8000  # full whatever the clock says
    for _ in range(50):
        master.take(1, 8000, 0.0, **PAIR)
    with pytest.raises(PoolEmpty):
        master.take(1, 8008, 0.0, **PAIR)  # but never more than its capacity


def test_slave_end_does_not_serve_what_cannot_be_generated_yet():
    master, slave = ends(rate_bps=800.0, capacity_bits=8000.0, initial_bits=0.0, epoch=0.0)
    keys = master.take(1, 800, 1.0, **PAIR)
    with pytest.raises(PoolEmpty) as err:  # the slave's clock lags: key "in transit"
        slave.lookup([keys[0][0]], 0.5, **PAIR)
    assert err.value.status == 503
    assert slave.lookup([keys[0][0]], 1.0, **PAIR)


def test_slave_end_expires_keys_beyond_its_capacity_and_stays_small():
    master, slave = ends(capacity_bits=8 * 1000)
    first = master.take(1, 80, 0.0, **PAIR)[0][0]
    later = [kid for _ in range(20) for kid, _ in master.take(10, 80, 0.0, **PAIR)]
    slave.lookup(later[::2], 0.0, **PAIR)  # gaps everywhere
    with pytest.raises(KeyIDRejected, match="expired"):
        slave.lookup([first], 0.0, **PAIR)
    assert len(slave._retrieved.starts) <= 1000 // 10 + 1  # only the window keeps intervals


def test_in_order_retrieval_keeps_one_interval():
    master, slave = ends()
    for _ in range(200):
        slave.lookup([kid for kid, _ in master.take(3, 64, 0.0, **PAIR)], 0.0, **PAIR)
    assert len(slave._retrieved.starts) == 1


def test_bad_parameters_are_local_errors():
    with pytest.raises(LocalError):
        LinkPool(seed=b"short", master_kme="A", slave_kme="B")
    with pytest.raises(LocalError):
        LinkPool(seed=SEED, master_kme="A", slave_kme="B", rate_bps=-1)
    with pytest.raises(LocalError):
        LinkConfig(peer="B", seed=SEED, capacity_bits=0)
    master, _ = ends()
    for count, size in ((0, 8), (1, 7), (1, 0), (True, 8)):
        with pytest.raises(LocalError):
            master.take(count, size, 0.0, **PAIR)


def test_link_config_gives_matching_pools_at_both_kmes():
    link_a = LinkConfig(peer="B", seed=SEED, rate_bps=1e6, capacity_bits=1e6)
    link_b = LinkConfig(peer="A", seed=SEED, rate_bps=1e6, capacity_bits=1e6)
    out_a, in_a = link_a.pools("A")
    out_b, in_b = link_b.pools("B")
    assert out_a.available_bits(0.0) == 1e6  # starts full by default
    ab = out_a.take(2, 256, 0.0, **PAIR)
    ba = out_b.take(2, 256, 0.0, master_sae="b1", slave_sae="a1")
    assert in_b.lookup([k for k, _ in ab], 0.0, **PAIR) == [v for _, v in ab]
    assert in_a.lookup([k for k, _ in ba], 0.0, master_sae="b1", slave_sae="a1") == [v for _, v in ba]
    assert repr(SEED) not in repr(link_a) and "seed" not in repr(link_a)


@given(start=st.integers(0, 2**54 - 2**20 - 1), size=st.integers(1, 2**20), tag=st.integers(0, 2**32 - 1))
def test_codec_roundtrip(start, size, tag):
    codec = KeyIDCodec(b"k" * 32, b"t" * 32)
    assert codec.decode(codec.encode(start, size, tag)) == (start, size, tag)


@given(st.uuids(version=4) | st.uuids() | st.text(max_size=40))
def test_random_key_ids_are_refused_as_remote_errors(key_id):
    _, slave = ends()
    key_id = str(key_id)
    with pytest.raises((KeyIDRejected, KeyIDNotYours)) as err:  # 401 for one guess in 2^16
        slave.lookup([key_id], 1.0, **PAIR)
    assert isinstance(err.value, RemoteError)


def reference_stream(master_kme, slave_kme, start, length):
    """Bytes ``start .. start + length`` of a direction's stream, as the module docstring defines it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = b"stream\x00" + master_kme.encode() + b"\x00" + slave_kme.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"qkd_sim.pool v1", info=info).derive(SEED)
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(start + length))[start:]


@pytest.mark.parametrize("requests", [  # (count, size in bytes) per take
    [(5, 1), (1, 2), (1, 13), (2, 17)],
    [(1, 100_003), (1, 5), (1, 1 << 20), (1, 7)],
    [(40, 1024), (1, 70_001), (3, 20_000)],
])
def test_keys_are_the_documented_stream_at_any_offset(requests):
    """Large keys are made in place by our AES kernel, runs of small ones by OpenSSL: the same stream."""
    master, slave = ends()
    taken = []
    for count, size in requests:
        taken += master.take(count, 8 * size, 0.0, **PAIR)
    keys = [key for _, key in taken]
    assert b"".join(keys) == reference_stream("A", "B", 0, sum(c * s for c, s in requests))
    assert slave.lookup([kid for kid, _ in taken], 0.0, **PAIR) == keys
    assert all(type(k) is bytes for k in keys)
