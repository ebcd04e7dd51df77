"""One-time pad sealing: round trips, forgeries, key accounting and fuzzing."""

from __future__ import annotations

import contextlib
import os
import struct
import tracemalloc
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qstore.errors import KeyMaterialError, KeyReuse, KeyShortage, LocalError, SealError
from qstore.otp import (
    MAGIC,
    MAX_REFS,
    OTK_SIZE,
    TAG_SIZE,
    KeyRef,
    KeyStream,
    QKDKey,
    open_,
    parse_envelope_refs,
    seal,
)


def make_keys(count: int, size: int) -> list[QKDKey]:
    return [QKDKey(str(uuid.uuid4()), os.urandom(size)) for _ in range(count)]


def pair(count: int = 4, size: int = 4096) -> tuple[KeyStream, KeyStream]:
    """Sender and receiver streams holding the same keys, as a KME pair would deliver them."""
    keys = make_keys(count, size)
    return KeyStream(keys), KeyStream(keys)


def header_len(envelope: bytes) -> int:
    (nrefs,) = struct.unpack_from(">H", envelope, 5)
    return 7 + 24 * nrefs + 4


def flip(data: bytes, pos: int, mask: int = 1) -> bytes:
    buf = bytearray(data)
    buf[pos] ^= mask
    return bytes(buf)


# --- keys and refs -------------------------------------------------------------------------------


def test_key_ids_are_validated_and_canonical() -> None:
    u = uuid.uuid4()
    assert QKDKey(str(u).upper(), b"k").key_id == str(u)
    assert KeyRef(str(u).upper(), 0, 1).key_id == str(u)
    for bad in ("not-a-uuid", u.hex, "{" + str(u) + "}", "", 5):
        with pytest.raises(LocalError):
            QKDKey(bad, b"k")  # type: ignore[arg-type]
    with pytest.raises(LocalError):
        QKDKey(str(u), b"")
    with pytest.raises(LocalError):
        KeyRef(str(u), -1, 1)
    with pytest.raises(LocalError):
        KeyRef(str(u), 0, 0)


def test_reprs_hold_no_key_material() -> None:
    key = QKDKey(str(uuid.uuid4()), b"TOPSECRETKEYBYTES")
    stream = KeyStream([key])
    assert "TOPSECRET" not in repr(key)
    assert "TOPSECRET" not in repr(stream)
    assert key.key_id in repr(key)


def test_take_hands_out_each_byte_once() -> None:
    keys = make_keys(5, 1000)
    stream = KeyStream(keys)
    by_id = {k.key_id: k.key for k in keys}
    seen: dict[str, set[int]] = {}
    sizes = [0, 1, 7, 333, 999, 1000, 1, 250, 409]
    for n in sizes:
        refs, material = stream.take(n)
        assert len(material) == n == sum(r.length for r in refs)
        # The material is exactly the named bytes of the named keys.
        assert bytes(material) == b"".join(by_id[r.key_id][r.offset : r.offset + r.length] for r in refs)
        for r in refs:
            span = set(range(r.offset, r.offset + r.length))
            assert not span & seen.setdefault(r.key_id, set())
            seen[r.key_id] |= span
    assert stream.available() == 5000 - sum(sizes)
    assert sum(len(s) for s in seen.values()) == sum(sizes)


def test_take_spans_several_keys_in_order() -> None:
    keys = make_keys(3, 10)
    stream = KeyStream(keys)
    refs, material = stream.take(25)
    assert [(r.key_id, r.offset, r.length) for r in refs] == [
        (keys[0].key_id, 0, 10),
        (keys[1].key_id, 0, 10),
        (keys[2].key_id, 0, 5),
    ]
    assert bytes(material) == keys[0].key + keys[1].key + keys[2].key[:5]
    assert keys[0].key_id not in stream  # fully used keys are dropped
    assert keys[2].key_id in stream


def test_shortage_takes_nothing() -> None:
    stream = KeyStream(make_keys(2, 50))
    stream.take(30)
    with pytest.raises(KeyShortage):
        stream.take(71)
    assert stream.available() == 70
    refs, _ = stream.take(70)
    assert sum(r.length for r in refs) == 70
    with pytest.raises(KeyShortage):
        stream.take(1)


def test_max_refs_takes_nothing() -> None:
    stream = KeyStream(make_keys(4, 8))
    with pytest.raises(KeyMaterialError):
        stream.take(20, max_refs=2)
    assert stream.available() == 32


def test_take_fills_gaps_left_by_receiver_side() -> None:
    key = make_keys(1, 100)[0]
    stream = KeyStream([key])
    stream.take_refs([KeyRef(key.key_id, 10, 20)])
    refs, material = stream.take(30)
    assert [(r.offset, r.length) for r in refs] == [(0, 10), (30, 20)]
    assert bytes(material) == key.key[:10] + key.key[30:50]


def test_take_refs_refuses_reuse_and_consumes_nothing_on_failure() -> None:
    keys = make_keys(2, 100)
    a, b = keys[0].key_id, keys[1].key_id
    stream = KeyStream(keys)
    assert bytes(stream.take_refs([KeyRef(a, 10, 10)])) == keys[0].key[10:20]
    for refs in (
        [KeyRef(b, 0, 5), KeyRef(a, 19, 2)],  # overlaps the used range by one byte
        [KeyRef(b, 0, 5), KeyRef(b, 4, 2)],  # overlaps itself
    ):
        with pytest.raises(KeyReuse):
            stream.take_refs(refs)
        assert stream.available() == 190
    with pytest.raises(KeyShortage):
        stream.take_refs([KeyRef(b, 0, 5), KeyRef(str(uuid.uuid4()), 0, 5)])
    with pytest.raises(LocalError):
        stream.take_refs([KeyRef(b, 0, 5), KeyRef(b, 90, 11)])
    assert stream.available() == 190
    # Adjacent ranges are fine, in any order.
    got = stream.take_refs([KeyRef(a, 20, 5), KeyRef(a, 5, 5)])
    assert bytes(got) == keys[0].key[20:25] + keys[0].key[5:10]


def test_spent_key_is_reuse_not_unknown() -> None:
    key = make_keys(1, 16)[0]
    stream = KeyStream([key])
    stream.take_refs([KeyRef(key.key_id, 0, 16)])
    assert key.key_id not in stream
    with pytest.raises(KeyReuse):
        stream.take_refs([KeyRef(key.key_id, 0, 1)])
    with pytest.raises(KeyReuse):
        stream.add(key)


def test_missing_names_only_unfetched_keys() -> None:
    held, spent = make_keys(2, 8)
    stream = KeyStream([held, spent])
    stream.take_refs([KeyRef(spent.key_id, 0, 8)])
    new = str(uuid.uuid4())
    refs = [KeyRef(held.key_id, 0, 1), KeyRef(new, 0, 1), KeyRef(spent.key_id, 0, 1), KeyRef(new, 1, 1)]
    assert stream.missing(refs) == [new]


def test_material_is_zeroed_in_buffer_and_wipe() -> None:
    key = make_keys(1, 64)[0]
    stream = KeyStream([key])
    stream.take(16)
    entry = stream._keys[key.key_id]
    assert bytes(entry.material[:16]) == bytes(16)
    assert bytes(entry.material[16:]) == key.key[16:]
    buf = entry.material
    stream.wipe()
    assert bytes(buf) == bytes(64)
    assert stream.available() == 0
    with pytest.raises(KeyReuse):
        stream.take_refs([KeyRef(key.key_id, 32, 1)])


# --- seal and open -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 31, 33, 1001, 2**20])
def test_round_trip(size: int) -> None:
    sender, receiver = pair(count=3, size=2**19)
    frame = os.urandom(size)
    before = sender.available()
    envelope = seal(frame, sender)
    assert sender.available() == before - OTK_SIZE - size
    assert len(envelope) == header_len(envelope) + size + TAG_SIZE
    assert open_(envelope, receiver) == frame
    assert receiver.available() == sender.available()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_inputs(kind: type) -> None:
    sender, receiver = pair()
    envelope = seal(kind(b"frame bytes"), sender)
    assert open_(kind(envelope), receiver) == b"frame bytes"


def test_round_trip_spans_several_keys() -> None:
    sender, receiver = pair(count=40, size=32)
    frame = os.urandom(1000)
    envelope = seal(frame, sender)
    refs = parse_envelope_refs(envelope)
    assert len(refs) == 33 and sum(r.length for r in refs) == OTK_SIZE + 1000
    assert open_(envelope, receiver) == frame


def test_many_envelopes_in_any_order() -> None:
    sender, receiver = pair(count=2, size=5000)
    frames = [os.urandom(n) for n in (10, 200, 0, 3000, 17)]
    envelopes = [seal(f, sender) for f in frames]
    for i in (3, 0, 4, 1, 2):
        assert open_(envelopes[i], receiver) == frames[i]


def test_ciphertext_hides_frame_and_seals_differ() -> None:
    sender, receiver = pair()
    frame = b"\x00" * 64 + b"QSHR plaintext share frame" * 4
    e1, e2 = seal(frame, sender), seal(frame, sender)
    h = header_len(e1)
    assert e1[h : h + len(frame)] != frame
    assert frame[64:90] not in e1
    assert e1 != e2 and e1[h:] != e2[h:]
    assert open_(e1, receiver) == open_(e2, receiver) == frame


def test_parse_envelope_refs_matches_sender() -> None:
    keys = make_keys(2, 100)
    sender = KeyStream(keys)
    envelope = seal(b"x" * 150, sender)
    assert parse_envelope_refs(envelope) == [KeyRef(keys[0].key_id, 0, 100), KeyRef(keys[1].key_id, 0, 82)]
    assert envelope[:4] == MAGIC


def test_open_twice_is_reuse() -> None:
    sender, receiver = pair()
    envelope = seal(b"once only", sender)
    assert open_(envelope, receiver) == b"once only"
    with pytest.raises(KeyReuse):
        open_(envelope, receiver)


def test_open_twice_after_key_dropped_is_reuse() -> None:
    keys = make_keys(1, OTK_SIZE + 5)
    envelope = seal(b"12345", KeyStream(keys))
    receiver = KeyStream(keys)
    open_(envelope, receiver)
    assert receiver.available() == 0
    with pytest.raises(KeyReuse):
        open_(envelope, receiver)


def test_unknown_key_is_shortage_and_consumes_nothing() -> None:
    keys = make_keys(2, 50)
    envelope = seal(b"z" * 40, KeyStream(keys))
    receiver = KeyStream(keys[:1])
    assert receiver.missing(parse_envelope_refs(envelope)) == [keys[1].key_id]
    with pytest.raises(KeyShortage):
        open_(envelope, receiver)
    assert receiver.available() == 50
    receiver.add(keys[1])
    assert open_(envelope, receiver) == b"z" * 40


def _assert_forgery_refused(envelope: bytes, receiver: KeyStream) -> None:
    with pytest.raises(SealError) as info:
        open_(envelope, receiver)
    # Opaque: the same message for every failure, and no chained exception telling which check it was.
    assert str(info.value) == str(SealError())
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_flipped_bits_are_refused() -> None:
    frame = os.urandom(100)
    keys = make_keys(2, 200)
    envelope = seal(frame, KeyStream(keys))
    h = header_len(envelope)
    ct_pos, tag_pos = h + 50, len(envelope) - 3
    for pos in (ct_pos, tag_pos, 0, 4, 6, h - 1, 7 + 16 + 3):  # ciphertext, tag, magic, version, ...
        receiver = KeyStream(keys)
        _assert_forgery_refused(flip(envelope, pos), receiver)
    # A flip in a ref's key ID names another (unknown) key: no key bytes are touched.
    with pytest.raises(KeyShortage):
        open_(flip(envelope, 7), KeyStream(keys))


def test_bad_tag_consumes_the_range() -> None:
    keys = make_keys(1, 500)
    envelope = seal(b"payload", KeyStream(keys))
    receiver = KeyStream(keys)
    with pytest.raises(SealError):
        open_(flip(envelope, len(envelope) - 1), receiver)
    assert receiver.available() == 500 - OTK_SIZE - 7
    # The genuine envelope arriving later is refused: that key range has been tried.
    with pytest.raises(KeyReuse):
        open_(envelope, receiver)


def test_malformed_envelopes_consume_nothing() -> None:
    keys = make_keys(1, 500)
    envelope = seal(b"payload", KeyStream(keys))
    h = header_len(envelope)
    receiver = KeyStream(keys)
    wrong_ref_len = bytearray(envelope)
    struct.pack_into(">I", wrong_ref_len, 7 + 16 + 4, OTK_SIZE + 6)
    beyond_key = bytearray(envelope)
    struct.pack_into(">I", beyond_key, 7 + 16, 490)
    for bad in (
        envelope[:-1],
        envelope + b"\0",
        envelope[: h - 4] + struct.pack(">I", 8) + envelope[h:],
        bytes(wrong_ref_len),
        envelope[:5] + b"\0\0" + envelope[7:],
        b"",
        MAGIC,
    ):
        with pytest.raises(SealError):
            open_(bad, receiver)
        assert receiver.available() == 500
    with pytest.raises(SealError):
        open_(bytes(beyond_key), receiver)
    assert receiver.available() == 500
    assert open_(envelope, receiver) == b"payload"


def test_max_length_bounds_before_allocation() -> None:
    keys = make_keys(1, 2000)
    envelope = seal(os.urandom(1000), KeyStream(keys))
    with pytest.raises(SealError):
        open_(envelope, KeyStream(keys), max_length=999)
    # A huge declared ciphertext length on a tiny envelope fails without allocating it.
    forged = bytearray(envelope[: header_len(envelope)] + bytes(TAG_SIZE))
    struct.pack_into(">I", forged, len(forged) - TAG_SIZE - 4, 2**32 - 1)
    struct.pack_into(">I", forged, 7 + 16 + 4, 2**32 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(SealError):
            open_(bytes(forged), KeyStream(keys), max_length=2**32 - 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_seal_with_short_stream_takes_nothing() -> None:
    stream = KeyStream(make_keys(1, OTK_SIZE + 9))
    with pytest.raises(KeyShortage):
        seal(bytes(10), stream)
    assert stream.available() == OTK_SIZE + 9
    seal(bytes(9), stream)
    assert stream.available() == 0


def test_seal_refuses_too_many_refs() -> None:
    stream = KeyStream(make_keys(MAX_REFS + 1, 1))
    with pytest.raises(KeyMaterialError):
        seal(bytes(MAX_REFS - OTK_SIZE + 1), stream)
    assert stream.available() == MAX_REFS + 1
    seal(bytes(MAX_REFS - OTK_SIZE), stream)
    assert stream.available() == 1


_ALLOWED = (SealError, KeyReuse, KeyShortage)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_open_garbage(data: bytes) -> None:
    keys = make_keys(2, 256)
    for buf in (data, MAGIC + b"\x01" + data):
        receiver = KeyStream(keys)
        try:
            open_(buf, receiver)
        except _ALLOWED:
            pass
        else:
            pytest.fail("garbage opened")
        with contextlib.suppress(SealError):
            parse_envelope_refs(buf)


@settings(max_examples=300)
@given(st.binary(max_size=64), st.data())
def test_fuzz_open_mutated_envelopes(frame: bytes, data: st.DataObject) -> None:
    """Envelopes naming real keys reach the key stream and the tag check; still only qstore errors."""
    keys = make_keys(3, 64)
    envelope = bytearray(seal(frame, KeyStream(keys)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(envelope) - 1))
        envelope[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(envelope)))
    receiver = KeyStream(keys)
    try:
        open_(bytes(envelope[:cut]), receiver)
    except _ALLOWED:
        pass
    else:
        pytest.fail("a mutated envelope opened")


# -- the named hybrid mode: AES-256-GCM under a fresh 32-byte QKD key per frame ------------


@pytest.mark.parametrize("size", [0, 1, 1000, 10_000])
def test_gcm_round_trip_spends_32_bytes(size: int) -> None:
    from qstore.otp import GCM_KEY_SIZE, envelope_cipher, key_cost, seal_gcm, seal_with

    alice, bob = pair()
    frame = os.urandom(size)
    before = alice.available()
    envelope = seal_gcm(frame, alice)
    assert alice.available() == before - GCM_KEY_SIZE == before - key_cost("aes-256-gcm", size)
    assert envelope_cipher(envelope) == "aes-256-gcm"
    assert size < 8 or frame not in envelope
    assert open_(envelope, bob) == frame
    with pytest.raises(KeyReuse):
        open_(envelope, bob)
    otp_env = seal_with("otp", frame, alice)
    assert envelope_cipher(otp_env) == "otp" and open_(otp_env, bob) == frame
    with pytest.raises(LocalError):
        seal_with("rot13", frame, alice)


def test_gcm_tampering_and_key_length_lies_are_refused() -> None:
    from qstore.otp import seal_gcm

    alice, bob = pair()
    envelope = bytearray(seal_gcm(b"x" * 500, alice))
    envelope[-1] ^= 1
    with pytest.raises(SealError):
        open_(bytes(envelope), bob)
    # an OTP envelope relabelled as GCM names 32 + len key bytes, not 32: refused before any key is used
    alice, bob = pair()
    env = bytearray(seal(b"y" * 100, alice))
    env[:4] = b"QGCM"
    available = bob.available()
    with pytest.raises(SealError):
        open_(bytes(env), bob)
    assert bob.available() == available
