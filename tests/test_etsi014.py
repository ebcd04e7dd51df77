"""ETSI GS QKD 014 messages and the KME core, in memory: field names, strict parsing, status codes."""

import base64
import contextlib
import json
import math
import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd_sim.etsi014 import (
    Error,
    EtsiError,
    Key,
    KeyContainer,
    KeyContainerReader,
    KeyIDs,
    KeyRequest,
    KMECore,
    Limits,
    NoDirectLink,
    Status,
    Unauthorized,
    dumps,
    loads,
)
from qkd_sim.pool import MAX_KEY_BITS, LinkConfig, PoolEmpty
from qstore.errors import LocalError, RemoteError

SEED = b"\x07" * 32
DIRECTORY = {"a1": "KME_A", "a2": "KME_A", "b1": "KME_B", "b2": "KME_B", "c1": "KME_C"}
KID = "550e8400-e29b-41d4-a716-446655440000"


def core(kme, saes, peer, *, rate=math.inf, capacity=2.0**33, initial=None, limits=None):
    link = LinkConfig(peer=peer, seed=SEED, rate_bps=rate, capacity_bits=capacity, initial_bits=initial)
    return KMECore(kme_id=kme, saes=saes, directory=DIRECTORY, links=[link], limits=limits)


@pytest.fixture
def pair():
    return core("KME_A", {"a1", "a2"}, "KME_B"), core("KME_B", {"b1", "b2"}, "KME_A")


# -- messages -------------------------------------------------------------------


def test_status_has_the_standard_fields(pair):
    a, _ = pair
    status = a.status("a1", "b1", 0.0).to_json()
    assert list(status) == ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                            "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                            "min_key_size", "max_SAE_ID_count"]
    assert status["source_KME_ID"] == "KME_A" and status["target_KME_ID"] == "KME_B"
    assert status["master_SAE_ID"] == "a1" and status["slave_SAE_ID"] == "b1"
    assert status["stored_key_count"] == status["max_key_count"] == 100_000
    assert status["max_key_size"] == 8388608 and status["max_SAE_ID_count"] == 0
    assert Status.from_json(dumps(status)).to_json() == status


def test_key_container_encodes_base64_with_standard_names():
    c = KeyContainer(keys=(Key(key_ID=KID.upper(), key=b"\x00\xffkey"),), key_container_extension={"x": 1})
    doc = c.to_json()
    assert doc == {"keys": [{"key_ID": KID, "key": base64.b64encode(b"\x00\xffkey").decode()}],
                   "key_container_extension": {"x": 1}}
    assert KeyContainer.from_json(dumps(doc)) == c
    assert "key" not in repr(c.keys[0]).replace("key_ID", "").replace("key_extension", "")


def test_key_request_and_key_ids_roundtrip():
    r = KeyRequest(number=3, size=512, extension_optional=({"abc_route_type": "direct"},))
    assert KeyRequest.from_json(dumps(r.to_json())) == r
    assert KeyRequest.from_json(b"{}") == KeyRequest()
    assert KeyRequest.from_query({"number": "2", "size": "64"}) == KeyRequest(number=2, size=64)
    ids = KeyIDs.of([KID])
    assert ids.to_json() == {"key_IDs": [{"key_ID": KID}]}
    assert KeyIDs.from_json(dumps(ids.to_json())) == ids
    assert KeyIDs.from_query({"key_ID": KID.upper()}).ids == [KID]
    error = Error(message="m", details=({"a": 1},))
    assert Error.from_json(b'{"message": "m", "details": [{"a": 1}]}') == error


@pytest.mark.parametrize("body", [
    b"", b"[]", b"null", b'{"number": 1.0}', b'{"number": true}', b'{"number": "1"}', b'{"number": 0}',
    b'{"number": 1, "number": 2}', b'{"nmber": 1}', b'{"size": NaN}', b'{"additional_slave_SAE_IDs": "b2"}',
    b'{"additional_slave_SAE_IDs": ["no spaces"]}', b'{"extension_mandatory": {"a": 1}}',
    b'{"extension_optional": [1]}', b"\xff", b"[" * 100_000,
])
def test_bad_key_requests_are_400(body):
    with pytest.raises(EtsiError) as err:
        KeyRequest.from_json(body)
    assert err.value.status == 400


@pytest.mark.parametrize("body", [
    b'{"key_IDs": []}', b'{"key_IDs": [{"key_ID": "not-a-uuid"}]}', b'{"key_IDs": [{"key_ID": 5}]}',
    b'{"key_IDs": [{"key_ID": "%s", "extra": 1}]}' % KID.encode(), b'{"key_IDs": "x"}', b"{}",
    b'{"key_IDs": [{"key_ID": "{%s}"}]}' % KID.encode(),
])
def test_bad_key_ids_are_400(body):
    with pytest.raises(EtsiError):
        KeyIDs.from_json(body)


@pytest.mark.parametrize("query", [{"number": "-1"}, {"number": "1e3"}, {"size": ""}, {"count": "1"},
                                   {"number": "99999999999"}])
def test_bad_get_parameters_are_400(query):
    with pytest.raises(EtsiError):
        KeyRequest.from_query(query)


def test_construction_errors_are_local():
    with pytest.raises(LocalError):
        KeyRequest(number=0)
    with pytest.raises(LocalError):
        Limits(key_size=100)  # not a multiple of 8
    with pytest.raises(LocalError):
        Limits(max_key_size=2 * 8388608)


# -- the KME core -----------------------------------------------------------------


def test_enc_then_dec_gives_identical_keys_once(pair):
    a, b = pair
    sent = a.enc_keys("a1", "b1", KeyRequest(number=4, size=256), 0.0)
    got = b.dec_keys("b1", "a1", KeyIDs.of(k.key_ID for k in sent.keys), 0.0)
    assert got == sent
    with pytest.raises(RemoteError, match="already retrieved") as err:
        b.dec_keys("b1", "a1", KeyIDs.of([sent.keys[0].key_ID]), 0.0)
    assert err.value.status == 400 and Error.of(err.value).details == ({"key_ID": sent.keys[0].key_ID},)


def test_default_size_is_key_size(pair):
    a, _ = pair
    (key,) = a.enc_keys("a1", "b1", KeyRequest(), 0.0).keys
    assert len(key.key) * 8 == Limits().key_size


def test_unauthorized_callers_get_401(pair):
    a, b = pair
    sent = a.enc_keys("a1", "b1", KeyRequest(number=1), 0.0)
    with pytest.raises(Unauthorized):
        b.dec_keys("b2", "a1", KeyIDs.of([sent.keys[0].key_ID]), 0.0)  # not the key's slave
    with pytest.raises(Unauthorized):
        a.enc_keys("b1", "a1", KeyRequest(), 0.0)  # not an SAE of KME_A
    with pytest.raises(Unauthorized):
        a.status(None, "b1", 0.0)
    assert b.dec_keys("b1", "a1", KeyIDs.of([sent.keys[0].key_ID]), 0.0)  # untouched by the refusals


@pytest.mark.parametrize(("request_", "words"), [
    (KeyRequest(size=100), "multiple of 8"),
    (KeyRequest(size=8 * 8388608), "outside"),
    (KeyRequest(number=129), "max_key_per_request"),
    (KeyRequest(extension_mandatory=({"abc_route_type": "direct"},)), "extension_mandatory"),
    (KeyRequest(additional_slave_SAE_IDs=("b2",)), "multicast"),
])
def test_enc_keys_validation(pair, request_, words):
    a, _ = pair
    with pytest.raises(EtsiError, match=words) as err:
        a.enc_keys("a1", "b1", request_, 0.0)
    body = Error.of(err.value).to_json()
    assert body["message"] and body["details"]


def test_unknown_and_unlinked_slaves_are_400(pair):
    a, _ = pair
    with pytest.raises(EtsiError, match="unknown slave_SAE_ID"):
        a.enc_keys("a1", "zz", KeyRequest(), 0.0)
    with pytest.raises(NoDirectLink) as err:
        a.enc_keys("a1", "c1", KeyRequest(), 0.0)
    assert err.value.status == 400
    assert err.value.details == ({"source_KME_ID": "KME_A", "target_KME_ID": "KME_C"},)
    with pytest.raises(EtsiError):
        a.enc_keys("a1", "a1", KeyRequest(), 0.0)


def test_local_pairs_use_the_local_pool(pair):
    a, _ = pair
    sent = a.enc_keys("a1", "a2", KeyRequest(number=2), 0.0)
    assert a.dec_keys("a2", "a1", KeyIDs.of(k.key_ID for k in sent.keys), 0.0) == sent


def test_the_local_pool_serves_bulk_keys_without_end(pair):
    """A client and the node of its own site are SAEs of one KME: a 4 MiB chunk's pad (and many more)
    comes from the local pool, which is as large as a link's and refills at once."""
    a, _ = pair
    for _ in range(3):  # 3 x 8 MiB, well past the 3.2 MB that max_key_count x key_size would allow
        sent = a.enc_keys("a1", "a2", KeyRequest(number=8, size=MAX_KEY_BITS), 0.0)
        got = a.dec_keys("a2", "a1", KeyIDs.of(k.key_ID for k in sent.keys), 0.0)
        assert got == sent and [len(k.key) for k in got.keys] == [MAX_KEY_BITS // 8] * 8


def test_exhaustion_is_503_and_all_or_nothing_then_recovers():
    a = core("KME_A", {"a1"}, "KME_B", rate=1024.0, capacity=4096.0, initial=0.0)
    b = core("KME_B", {"b1"}, "KME_A", rate=1024.0, capacity=4096.0, initial=0.0)
    assert a.status("a1", "b1", 0.0).stored_key_count == 0
    with pytest.raises(PoolEmpty) as err:
        a.enc_keys("a1", "b1", KeyRequest(number=1), 0.0)
    assert err.value.status == 503
    assert a.status("a1", "b1", 1.0).stored_key_count == 4
    with pytest.raises(PoolEmpty):
        a.enc_keys("a1", "b1", KeyRequest(number=5), 1.0)
    sent = a.enc_keys("a1", "b1", KeyRequest(number=4), 1.0)
    assert b.dec_keys("b1", "a1", KeyIDs.of(k.key_ID for k in sent.keys), 1.0) == sent
    with pytest.raises(EtsiError, match="exceeds the key pool"):
        a.enc_keys("a1", "b1", KeyRequest(number=1, size=8192), 100.0)  # can never be served


def test_dec_keys_too_many_ids(pair):
    _, b = pair
    with pytest.raises(EtsiError, match="max_key_per_request"):
        b.dec_keys("b1", "a1", KeyIDs.of([KID] * 129), 0.0)


def test_directory_must_agree_with_attached_saes():
    with pytest.raises(LocalError):
        KMECore(kme_id="KME_A", saes={"b1"}, directory=DIRECTORY)


# -- fuzz: garbage raises only the 400-kind error ---------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
field_names = st.sampled_from(["number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
                               "extension_optional", "key_IDs", "key_ID", "key_IDs_extension", "keys", "key",
                               "key_ID_extension", "key_extension", "key_container_extension", "message",
                               "details"] + list(Status.__dataclass_fields__))
shaped = st.dictionaries(field_names, json_values, max_size=6)
elements = st.lists(st.dictionaries(field_names, json_values), max_size=3)
nested_ids = st.builds(lambda xs: {"key_IDs": xs}, elements)
nested_keys = st.builds(lambda xs: {"keys": xs}, elements)
bodies = (st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
          | (json_values | shaped | nested_ids | nested_keys).map(lambda v: json.dumps(v).encode()))
PARSERS = [KeyRequest.from_json, KeyIDs.from_json, KeyContainer.from_json, Status.from_json, Error.from_json]


@given(parse=st.sampled_from(PARSERS), body=bodies)
def test_parsers_raise_only_etsi_errors(parse, body):
    try:
        parse(body)
    except EtsiError as exc:
        assert exc.status == 400 and isinstance(exc, RemoteError)


@given(query=st.dictionaries(st.sampled_from(["number", "size", "key_ID", "x"]), st.text(max_size=12)))
def test_query_parsers_raise_only_etsi_errors(query):
    for parse in (KeyRequest.from_query, KeyIDs.from_query):
        with contextlib.suppress(EtsiError):
            parse(query)


@given(body=bodies)
def test_loads_is_strict_json_or_etsi_error(body):
    try:
        value = loads(body)
    except EtsiError:
        return
    dumps(value)  # whatever parsed can be written back as standard JSON


# -- Key containers written in pieces and read as they arrive ---------------------


def container_of(sizes, rng, *, extensions=False):
    keys = tuple(Key(key_ID=str(uuid.UUID(int=rng.getrandbits(128), version=4)), key=rng.randbytes(n),
                     key_extension={"i": i} if extensions and i == 1 else None)
                 for i, n in enumerate(sizes))
    return KeyContainer(keys=keys, key_container_extension={"x": [1]} if extensions else None)


key_sizes = st.lists(st.sampled_from([1, 2, 3, 47, 48, 49, 1000, 3000, 9000, 70_000]), max_size=5)


@given(sizes=key_sizes, seed=st.integers(0, 2**32), piece=st.sampled_from([64, 1000, 4096, 1 << 18]),
       extensions=st.booleans())
def test_json_pieces_join_to_the_standard_json(sizes, seed, piece, extensions):
    c = container_of(sizes, random.Random(seed), extensions=extensions)
    expected = dumps(c.to_json())
    assert c.to_json_bytes() == expected and c.json_length() == len(expected)
    pieces = list(c.json_pieces(piece))
    assert b"".join(pieces) == expected
    # about ``piece`` each: a key of up to 8 KiB goes whole into one, and so does a key with
    # extensions (written by the generic encoder), whatever its size
    whole = max((len(dumps(k.to_json())) for k in c.keys
                 if k.key_ID_extension is not None or k.key_extension is not None), default=0)
    assert all(len(p) <= piece + max(11_100, whole + 100) for p in pieces)


def test_json_pieces_are_short_at_both_ends():
    """A quarter piece first, whole pieces in the middle, quarters again in the last two pieces' worth."""
    c = container_of([1 << 20] * 16, random.Random(5))
    piece = 1 << 20
    sizes = [len(p) for p in c.json_pieces(piece)]
    total = sum(sizes)
    assert total == c.json_length()
    assert sizes[0] <= piece // 4 + 100
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    middle = [n for n, at in zip(sizes, starts, strict=True) if at and total - at > 2 * piece]
    tail = [n for n, at in zip(sizes, starts, strict=True) if total - at <= 2 * piece]
    assert middle and all(piece - 4 <= n <= piece + 100 for n in middle)
    assert len(tail) >= 4 and all(n <= piece // 4 + 100 for n in tail)


def read_in_chunks(body, cuts, *, in_place=False, **kw):
    """``body`` fed in pieces; ``in_place``: each from inside a reused buffer, as the SAE's pool does."""
    reader = KeyContainerReader(limit=kw.pop("limit", 1 << 30), whole_below=0, **kw)
    at = 0
    for cut in [*sorted(cuts), len(body)]:
        if in_place:  # bytes around the range that would break the parse if it read them
            buf = bytearray(b'"}]=,' * 3) + body[at:cut] + b'"}]}=,"'
            reader.feed(buf, 15, 15 + cut - at)
            buf[:] = b"x" * len(buf)  # reused: the reader must not keep a view on it
        else:
            reader.feed(body[at:cut])
        at = cut
    return reader.finish()


def outcome(parse):
    try:
        return "ok", parse()
    except EtsiError as exc:
        return "error", str(exc)


edits = st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 10**9),
                           st.sampled_from(list(b'= A"}],{ \n/+\x80'))), max_size=3)


@given(sizes=key_sizes, seed=st.integers(0, 2**32), cuts=st.lists(st.integers(0, 10**9), max_size=8),
       edit=edits, reformat=st.booleans(), hint=st.sampled_from([None, 1, 3, 1000, 70_000]),
       limit_cut=st.sampled_from([None, 0, 1]), in_place=st.booleans())
def test_reader_gives_what_the_strict_parser_gives(sizes, seed, cuts, edit, reformat, hint, limit_cut,
                                                   in_place):
    """Any body, cut anywhere: the same keys, or the same EtsiError, as KeyContainer.from_json."""
    body = bytearray(container_of(sizes, random.Random(seed)).to_json_bytes())
    if reformat:  # valid JSON, but not in the compact form: the reader falls back to the strict parser
        body = bytearray(json.dumps(json.loads(body), indent=1).encode())
    for how, at, byte in edit:
        at = at % (len(body) + 1)
        if how == "insert" or not body:
            body[at:at] = bytes([byte])
        elif how == "replace":
            body[min(at, len(body) - 1)] = byte
        else:
            del body[min(at, len(body) - 1)]
    body = bytes(body)
    limit = 1 << 30 if limit_cut is None else len(body) - limit_cut
    cuts = [c % (len(body) + 1) for c in cuts]
    expected = outcome(lambda: KeyContainer.from_json(body, limit=limit))
    chunks = outcome(lambda: read_in_chunks(body, cuts, key_bytes=hint, limit=limit, in_place=in_place))
    assert chunks == expected
    whole = KeyContainerReader(limit=limit)  # short bodies: gathered, parsed whole
    whole.feed(body)
    assert outcome(whole.finish) == expected


def test_reader_decodes_mebibyte_keys_in_pieces():
    c = container_of([1 << 20] * 3, random.Random(1))
    body = c.to_json_bytes()
    cuts = list(range(0, len(body), 65_537))
    assert read_in_chunks(body, cuts, key_bytes=1 << 20) == c
    assert read_in_chunks(body, cuts) == c
    assert read_in_chunks(body, cuts, key_bytes=1000) == c  # a wrong size hint costs a copy, nothing else
    assert read_in_chunks(body, cuts, key_bytes=1 << 20, in_place=True) == c


@pytest.mark.parametrize("tail", [b"=", b"===="])
def test_padding_after_a_whole_quad_is_refused_by_both_parsers(tail):
    """Python 3.11's binascii would take '=' after a complete last quad; RFC 4648 does not, nor do we."""
    body = b'{"keys":[{"key_ID":"%s","key":"QUJD%s"}]}' % (KID.encode(), tail)
    with pytest.raises(EtsiError):
        KeyContainer.from_json(body)
    with pytest.raises(EtsiError):
        read_in_chunks(body, [])
