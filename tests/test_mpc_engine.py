"""The MPC engine: contexts, rounds driven in memory, and the wire form of a round's vectors."""

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import field
from qstore.errors import LocalError
from qstore.mpc import shamir
from qstore.mpc.engine import (
    Context,
    EngineError,
    Exchange,
    ProtocolError,
    decode_payload,
    encode_payload,
    expect,
    run_local,
)


def _vec(shape):
    return field.random(shape)


# ---------------------------------------------------------------- context


def test_context_validates():
    ctx = Context(me=2, parties=(1, 2, 3), t=1)
    assert ctx.n == 3 and ctx.peers == (1, 3)
    with pytest.raises(LocalError):
        Context(me=4, parties=(1, 2, 3), t=1)
    with pytest.raises(LocalError):
        Context(me=1, parties=(1, 2), t=1)  # n < 2t+1
    with pytest.raises(LocalError):
        Context(me=1, parties=(2, 1, 3), t=1)
    with pytest.raises(LocalError):
        Context(me=1, parties=(1, 1, 3), t=1)
    with pytest.raises(LocalError):
        Context(me=0, parties=(0, 1, 2), t=1)


def test_exchange_helpers():
    ctx = Context(me=1, parties=(1, 2, 3), t=1)
    a = _vec((2,))
    ex = Exchange.broadcast(ctx, [a])
    assert set(ex.out) == {2, 3} and ex.out[2][0] is a
    ex = Exchange.send_all(ctx, lambda peer: [field.from_int(peer, (1,))])
    assert field.to_ints(ex.out[3][0]) == [3]


def test_expect_checks_counts_and_shapes():
    ctx = Context(me=1, parties=(1, 2, 3), t=1)
    good = {2: [_vec((3,))], 3: [_vec((3,))]}
    assert expect(ctx, good, [(3,)]) == good
    with pytest.raises(EngineError):
        expect(ctx, {2: [_vec((3,))]}, [(3,)])
    with pytest.raises(EngineError):
        expect(ctx, {2: [_vec((3,))], 3: [_vec((4,))]}, [(3,)])
    with pytest.raises(EngineError):
        expect(ctx, {2: [_vec((3,))], 3: []}, [(3,)])
    with pytest.raises(EngineError):
        expect(ctx, {2: [_vec((3,))], 3: [np.zeros((3, 2), dtype=np.int64)]}, [(3,)])
    assert expect(ctx, {2: [_vec(())], 3: []}, lambda p: [()] if p == 2 else [])


# ---------------------------------------------------------------- wire form


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@given(st.lists(shapes, max_size=4))
def test_payload_round_trip(shape_list):
    vecs = [field.random(s) for s in shape_list]
    if vecs and vecs[0].size:
        vecs[0].reshape(-1, 2)[0] = field.from_int(field.P - 1)  # the largest element
    data = encode_payload(vecs)
    n = sum(v.size // 2 for v in vecs)
    assert len(data) == 4 + sum(1 + 4 * len(s) for s in shape_list) + 16 * n
    back = decode_payload(data, max_elements=n)
    assert len(back) == len(vecs)
    for v, w in zip(vecs, back):
        assert v.shape == w.shape and np.array_equal(v, w)
        w[...] = 0  # decoded vectors are writable, independent copies
    if n:
        with pytest.raises(EngineError):
            decode_payload(data, max_elements=n - 1)


def test_payload_rejects_garbage_explicitly():
    good = encode_payload([_vec((3,)), _vec((2, 2))])
    assert len(decode_payload(good, 100)) == 2
    for bad in (
        b"",
        b"\x01\x00",
        good[:-1],
        good + b"\x00",
        struct.pack("<I", 2**32 - 1) + good[4:],
        struct.pack("<I", 1) + bytes([9]) + bytes(64),  # too many axes
        struct.pack("<I", 1) + bytes([1]) + struct.pack("<I", 2**31),  # shape without data
    ):
        with pytest.raises(EngineError):
            decode_payload(bad, 10**6)
    # an unreduced element: p itself
    raw = bytearray(encode_payload([field.zeros(1)]))
    raw[-16:] = (field.P).to_bytes(16, "little")
    with pytest.raises(EngineError):
        decode_payload(bytes(raw), 10)
    with pytest.raises(EngineError):
        decode_payload("text", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_payload([np.zeros((2, 2), dtype=np.int64)])


@given(st.binary(max_size=300), st.integers(0, 64))
def test_decode_fuzz_raises_only_engine_error(data, max_elements):
    try:
        vecs = decode_payload(data, max_elements)
    except EngineError:
        return
    assert sum(v.size // 2 for v in vecs) <= max_elements
    assert encode_payload(vecs) == data


@given(st.data())
def test_decode_fuzz_mutated_payloads(data):
    vecs = [field.random(s) for s in data.draw(st.lists(shapes, min_size=1, max_size=3))]
    raw = bytearray(encode_payload(vecs))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=20))
    try:
        out = decode_payload(bytes(raw), 64)
    except EngineError:
        return
    assert encode_payload(out) == bytes(raw)


# ---------------------------------------------------------------- run_local


def _sum_of_inputs(ctx, value):
    """Toy protocol: share my input, add the shares, open the sum (2 rounds)."""
    mine = shamir.share(field.from_int(value, (1,)), ctx.parties, ctx.t)
    inbox = yield Exchange.send_all(ctx, lambda peer: [mine[peer]])
    inbox = expect(ctx, inbox, [(1,)])
    s = field.lincomb([1] * ctx.n, [mine[ctx.me]] + [inbox[p][0] for p in ctx.peers])
    inbox = yield Exchange.broadcast(ctx, [s])
    inbox = expect(ctx, inbox, [(1,)])
    return field.to_ints(shamir.reconstruct({ctx.me: s} | {p: v[0] for p, v in inbox.items()}))[0]


@pytest.mark.parametrize("wire", [True, False])
def test_run_local_drives_every_party_and_records_views(wire):
    parties = (1, 2, 3, 4, 5)
    views = {}
    progs = {x: _sum_of_inputs(Context(me=x, parties=parties, t=2), 10 * x) for x in parties}
    out = run_local(progs, views=views, wire=wire)
    assert out == dict.fromkeys(parties, 150)
    assert set(views) == set(parties)
    for x in parties:
        assert len(views[x]) == 2
        assert set(views[x][0]) == set(parties) - {x}


def test_run_local_detects_different_round_counts():
    def prog(ctx, rounds):
        for _ in range(rounds):
            yield Exchange.broadcast(ctx, [])
        return rounds

    parties = (1, 2, 3)
    progs = {x: prog(Context(me=x, parties=parties, t=1), 2 if x < 3 else 3) for x in parties}
    with pytest.raises(ProtocolError):
        run_local(progs)
    progs = {x: prog(Context(me=x, parties=parties, t=1), 0) for x in parties}
    assert run_local(progs) == {1: 0, 2: 0, 3: 0}


def test_run_local_refuses_malformed_exchanges():
    def prog(ctx):
        yield Exchange({ctx.peers[0]: []})

    parties = (1, 2, 3)
    with pytest.raises(LocalError):
        run_local({x: prog(Context(me=x, parties=parties, t=1)) for x in parties})

    def not_an_exchange(ctx):
        yield {p: [] for p in ctx.peers}

    with pytest.raises(LocalError):
        run_local({x: not_an_exchange(Context(me=x, parties=parties, t=1)) for x in parties})
