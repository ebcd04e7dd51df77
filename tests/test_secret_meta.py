"""Secret metadata: shared k-of-n and packed for sealing (qstore.secret_meta), held by a node until commit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.pending import PendingSecrets
from qstore import secret_meta
from qstore.errors import ShareCorruption
from qstore.sharing import Share

docs = st.fixed_dictionaries({
    "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "meta": st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=100), max_size=8),
})


@given(docs, st.integers(2, 5), st.data())
def test_any_k_shares_open_the_document(doc, k, data):
    n = data.draw(st.integers(k, 7))
    shares = secret_meta.share_doc(doc, n, k)
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % secret_meta.PAD == 0
    xs = data.draw(st.lists(st.integers(1, n), min_size=k, max_size=n, unique=True))
    assert secret_meta.open_doc([Share(x=x, data=shares[x - 1], k=k) for x in xs], k) == doc


def test_fewer_than_k_or_disagreeing_shares_are_refused():
    shares = secret_meta.share_doc({"sha256": "0" * 64, "meta": {"a": "b"}}, 5, 3)
    with pytest.raises(ShareCorruption):
        secret_meta.open_doc([Share(x=1, data=shares[0], k=3), Share(x=2, data=shares[1], k=3)], 3)
    bad = bytes(b ^ 0xFF for b in shares[0])
    with pytest.raises(ShareCorruption):  # two wrong of five: beyond what the decoder corrects
        secret_meta.open_doc([Share(x=1, data=bad, k=3), Share(x=2, data=bytes(len(bad)), k=3)]
                             + [Share(x=x, data=shares[x - 1], k=3) for x in (3, 4, 5)], 3)


def test_one_wrong_share_of_five_is_corrected():
    doc = {"sha256": "f" * 64, "meta": {"patient": "Jane Doe"}}
    shares = secret_meta.share_doc(doc, 5, 3)
    wrong = [Share(x=1, data=bytes(len(shares[0])), k=3)] + [Share(x=x, data=shares[x - 1], k=3)
                                                             for x in range(2, 6)]
    assert secret_meta.open_doc(wrong, 3) == doc


def test_a_document_above_the_limit_is_refused():
    with pytest.raises(ValueError):
        secret_meta.share_doc({"meta": {"x": "y" * secret_meta.MAX_SHARE_BYTES}}, 5, 3)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=200).map(bytes.hex)), max_size=20))
def test_packed_shares_round_trip(shares):
    assert secret_meta.unpack_shares(secret_meta.pack_shares(shares), len(shares)) == shares


@pytest.mark.parametrize(("data", "count"), [
    (b"", 1), (b"\x00", 1), (b"\x00\x02a", 1), (b"\x00\x01a", 2), (b"\x00\x01ab", 1),
    (b"\xff\xff", 0), (b"\x40\x00" + bytes(0x4000), 1),
])
def test_malformed_packed_shares_are_refused(data, count):
    with pytest.raises(ShareCorruption):
        secret_meta.unpack_shares(data, count)


def test_packed_shares_cost_their_size():
    shares = [bytes(range(128)).hex(), None, "00"]
    packed = secret_meta.pack_shares(shares)
    assert len(packed) == 2 + 128 + 2 + 2 + 1  # not the hex text's 256 + 2 bytes
    assert secret_meta.unpack_shares(packed, 3) == shares


def test_pending_shares_are_bounded_in_number_and_age():
    now = [0.0]
    pending = PendingSecrets(10.0, max_entries=3, clock=lambda: now[0])
    for i in range(4):
        pending.put(f"u{i}", bytes([i]))
    assert len(pending) == 3 and pending.get("u0") is None and pending.get("u3") == b"\x03"
    now[0] = 11.0
    assert pending.get("u1") is None  # too old to commit with
    pending.put("u9", b"\x09")
    assert len(pending) == 1 and pending.get("u9") == b"\x09"
    pending.drop("u9")
    pending.drop("unknown")
    assert len(pending) == 0
