"""The gateway's sans-IO parts: SigV4 against AWS's published examples, aws-chunked, S3 XML, ranges."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.s3 import sigv4
from client.s3 import xml as sx
from client.s3.errors import S3Error
from client.s3.gateway import _parse_range
from client.s3.users import Users, new_user

# AWS's examples (S3 API reference, "Signature Calculations for the Authorization Header" and
# "Query String Authentication"): this key pair, 2013-05-24, us-east-1.
ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
NOW = 1369353600.0  # 20130524T000000Z
CRED = f"{ACCESS}/20130524/us-east-1/s3/aws4_request"


def secret_of(key: str) -> str | None:
    return SECRET if key == ACCESS else None


def header_request(method: str, path: str, query: str, headers: dict[str, str], signed: str, sig: str):
    auth = f"AWS4-HMAC-SHA256 Credential={CRED},SignedHeaders={signed},Signature={sig}"
    return sigv4.Request(method, path, query, {**headers, "Authorization": auth})


GET_OBJECT = ("GET", "/test.txt", "", {
    "Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
    "x-amz-content-sha256": sigv4.EMPTY_SHA256, "x-amz-date": "20130524T000000Z"},
    "host;range;x-amz-content-sha256;x-amz-date",
    "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
PUT_OBJECT = ("PUT", "/test%24file.text", "", {
    "Host": "examplebucket.s3.amazonaws.com", "Date": "Fri, 24 May 2013 00:00:00 GMT",
    "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
    "x-amz-content-sha256": hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()},
    "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
    "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
GET_LIFECYCLE = ("GET", "/", "lifecycle", {
    "Host": "examplebucket.s3.amazonaws.com", "x-amz-date": "20130524T000000Z",
    "x-amz-content-sha256": sigv4.EMPTY_SHA256}, "host;x-amz-content-sha256;x-amz-date",
    "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543")
LIST_OBJECTS = ("GET", "/", "max-keys=2&prefix=J", {
    "Host": "examplebucket.s3.amazonaws.com", "x-amz-date": "20130524T000000Z",
    "x-amz-content-sha256": sigv4.EMPTY_SHA256}, "host;x-amz-content-sha256;x-amz-date",
    "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


@pytest.mark.parametrize("example", [GET_OBJECT, PUT_OBJECT, GET_LIFECYCLE, LIST_OBJECTS],
                         ids=["get", "put", "lifecycle", "list"])
def test_aws_header_examples(example):
    auth = sigv4.verify(header_request(*example), secret_of, now=NOW + 60)
    assert auth.access_key == ACCESS and not auth.presigned


def test_a_changed_byte_anywhere_is_signature_does_not_match():
    method, path, query, headers, signed, sig = GET_OBJECT
    for req in (header_request("PUT", path, query, headers, signed, sig),
                header_request(method, "/test.txu", query, headers, signed, sig),
                header_request(method, path, "x=1", headers, signed, sig),
                header_request(method, path, query, {**headers, "Range": "bytes=0-8"}, signed, sig),
                header_request(method, path, query, headers, signed, sig[:-1] + "0")):
        with pytest.raises(S3Error) as e:
            sigv4.verify(req, secret_of, now=NOW)
        assert (e.value.code, e.value.status) == ("SignatureDoesNotMatch", 403)
    with pytest.raises(S3Error) as e:
        sigv4.verify(header_request(*GET_OBJECT), lambda k: None, now=NOW)
    assert (e.value.code, e.value.status) == ("InvalidAccessKeyId", 403)
    with pytest.raises(S3Error) as e:
        sigv4.verify(header_request(*GET_OBJECT), secret_of, now=NOW + 3600)
    assert (e.value.code, e.value.status) == ("RequestTimeTooSkewed", 403)
    with pytest.raises(S3Error) as e:
        sigv4.verify(sigv4.Request("GET", "/", "", {"Host": "h"}), secret_of, now=NOW)
    assert e.value.code == "AccessDenied"


PRESIGNED = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1"
             "%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
             "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


def test_aws_presigned_example_and_expiry():
    req = sigv4.Request("GET", "/test.txt", PRESIGNED, {"Host": "examplebucket.s3.amazonaws.com"})
    auth = sigv4.verify(req, secret_of, now=NOW + 86399)
    assert auth.presigned and auth.payload == sigv4.UNSIGNED
    with pytest.raises(S3Error) as e:
        sigv4.verify(req, secret_of, now=NOW + 86401)
    assert (e.value.code, e.value.status, e.value.message) == ("AccessDenied", 403, "request has expired")
    with pytest.raises(S3Error) as e:
        sigv4.verify(sigv4.Request("GET", "/test.txt", PRESIGNED.replace("86400", "86500"),
                                   {"Host": "examplebucket.s3.amazonaws.com"}), secret_of, now=NOW)
    assert e.value.code == "SignatureDoesNotMatch"


def test_any_region_is_accepted():
    key = sigv4.signing_key(SECRET, "20130524", "ap-south-2")
    headers = {"Host": "h", "x-amz-date": "20130524T000000Z", "x-amz-content-sha256": sigv4.UNSIGNED}
    req = sigv4.Request("GET", "/b/k", "", headers)
    scope = "20130524/ap-south-2/s3/aws4_request"
    creq = sigv4.canonical_request(req, ["host", "x-amz-content-sha256", "x-amz-date"], sigv4.UNSIGNED)
    sig = sigv4._hmac(key, sigv4.string_to_sign("20130524T000000Z", scope, creq)).hex()
    auth = (f"AWS4-HMAC-SHA256 Credential={ACCESS}/{scope},"
            f"SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature={sig}")
    req = sigv4.Request("GET", "/b/k", "", {**headers, "Authorization": auth})
    out = sigv4.verify(req, secret_of, now=NOW)
    assert out.scope == scope


# -- aws-chunked: AWS's example (64 KiB + 1 KiB of 'a', seed signature of the request) ----------

CHUNKED_HEADERS = {
    "Host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
    "x-amz-content-sha256": sigv4.STREAMING, "Content-Encoding": "aws-chunked",
    "x-amz-decoded-content-length": "66560", "Content-Length": "66824"}
CHUNKED_SIGNED = ("content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
                  "x-amz-decoded-content-length;x-amz-storage-class")
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
CHUNK_SIGS = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
              "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
              "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]


def chunked_example() -> tuple[sigv4.Auth, bytes]:
    req = header_request("PUT", "/examplebucket/chunkObject.txt", "", CHUNKED_HEADERS, CHUNKED_SIGNED, SEED)
    auth = sigv4.verify(req, secret_of, now=NOW)
    body = b""
    for data, sig in zip([b"a" * 65536, b"a" * 1024, b""], CHUNK_SIGS, strict=True):
        body += f"{len(data):x};chunk-signature={sig}\r\n".encode() + data + b"\r\n"
    assert len(body) == 66824
    return auth, body


def decode_all(decoder: sigv4.ChunkedDecoder, pieces: list[bytes]) -> bytes:
    out = b""
    for piece in [*pieces, b""]:
        decoder.feed(piece)
        while True:
            got = decoder.next()
            if got is sigv4.NEED_DATA:
                break
            if got is sigv4.END:
                return out
            out += got
    raise AssertionError("no END")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 70000), max_size=6))
def test_aws_chunked_example_decodes_however_it_is_cut(cuts):
    auth, body = chunked_example()
    bounds = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)], strict=True)]
    assert decode_all(sigv4.ChunkedDecoder(auth), pieces) == b"a" * 66560


def test_a_tampered_chunk_or_signature_is_refused():
    auth, body = chunked_example()
    for bad in (body.replace(b"a" * 1024, b"a" * 1023 + b"b"),
                body.replace(CHUNK_SIGS[1].encode(), b"0" * 64),
                body.replace(f";chunk-signature={CHUNK_SIGS[0]}".encode(), b""), body[:-40]):
        with pytest.raises(S3Error) as e:
            decode_all(sigv4.ChunkedDecoder(auth), [bad])
        assert e.value.code in ("SignatureDoesNotMatch", "IncompleteBody")


def test_unsigned_trailer_chunks():
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    assert decode_all(sigv4.ChunkedDecoder(None), [body]) == b"hello world"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_chunks_raise_only_s3_errors(data):
    with contextlib.suppress(S3Error):
        decode_all(sigv4.ChunkedDecoder(None), [data])


# -- XML ---------------------------------------------------------------------------------------


def test_xml_documents_and_parsing():
    doc = sx.document("ListBucketResult", [("Name", "b"), ("Contents", [("Key", "a<&>"), ("Size", 3)]),
                                           ("IsTruncated", False), ("Gone", None)])
    assert b"<Key>a&lt;&amp;&gt;</Key>" in doc and b"<IsTruncated>false</IsTruncated>" in doc
    assert b"Gone" not in doc
    err = sx.error("NoSuchKey", "no", resource="/b/k", request_id="R")
    assert b"<Code>NoSuchKey</Code>" in err and b"<RequestId>R</RequestId>" in err
    body = (b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b'<Part><PartNumber>1</PartNumber><ETag>"aa"</ETag></Part>'
            b"<Part><PartNumber>3</PartNumber><ETag>bb</ETag></Part></CompleteMultipartUpload>")
    assert sx.parse_complete(body) == [sx.PartRef(1, "aa"), sx.PartRef(3, "bb")]
    with pytest.raises(S3Error) as e:
        sx.parse_complete(body.replace(b"<PartNumber>3", b"<PartNumber>1"))
    assert e.value.code == "InvalidPartOrder"
    quiet, objs = sx.parse_delete(b"<Delete><Quiet>true</Quiet><Object><Key>x</Key></Object></Delete>")
    assert quiet and objs == [("x", None)]
    bomb = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;">]>'
            b"<Delete><Object><Key>&b;</Key></Object></Delete>")
    for bad in (bomb, b"<Delete>", b"<Other/>", b"x" * (sx.MAX_XML + 1), b"<Delete></Delete>"):
        with pytest.raises(S3Error) as e:
            sx.parse_delete(bad)
        assert e.value.code == "MalformedXML" and e.value.status == 400


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_xml_parsers_raise_only_s3_errors(data):
    for parse in (sx.parse_complete, sx.parse_delete, sx.parse_bucket_config):
        with contextlib.suppress(S3Error):
            parse(data)


def test_ranges():
    assert _parse_range("bytes=0-9", 100) == (0, 10)
    assert _parse_range("bytes=90-", 100) == (90, 100)
    assert _parse_range("bytes=-5", 100) == (95, 100)
    assert _parse_range("bytes=50-1000", 100) == (50, 100)
    assert _parse_range("bytes=5-1", 100) is None and _parse_range("items=0-1", 100) is None
    assert _parse_range("bytes=0-1,4-5", 100) is None  # several ranges: the whole object, as S3
    for bad in ("bytes=100-", "bytes=100-200"):
        with pytest.raises(S3Error) as e:
            _parse_range(bad, 100)
        assert e.value.status == 416


def test_users_file_shape_and_secrets_not_in_repr():
    u = new_user("carol", ["a", "b"])
    users = Users.from_json({"users": [{"name": "carol", "access_key": u.access_key,
                                        "secret_key": u.secret_key,
                                        "buckets": ["a"]}]})
    assert users.secret_of(u.access_key) == u.secret_key and users.secret_of("nobody") is None
    got = users.get(u.access_key)
    assert got is not None and got.may_use("a") and not got.may_use("b")
    assert u.secret_key not in repr(got)
    for bad in ({}, {"users": []}, {"users": [{"access_key": "short", "secret_key": "x" * 20}]},
                {"users": [{"access_key": "A" * 20}]}):
        with pytest.raises(Exception, match=r"."):
            Users.from_json(bad)
