"""qkd_sim.http1: the sans-IO HTTP/1.1 response parser, fed any split of any response it must accept."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkd_sim.http1 import HTTPParseError, ResponseParser, request_bytes

bodies = st.binary(max_size=3000)
splits = st.lists(st.integers(0, 10**6), max_size=6)
tokens = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)


def parse(raw: bytes, cuts=(), *, in_buffer=False, eof=False):
    """Status, headers, body and completeness of ``raw`` fed in pieces (each in a reused buffer if asked)."""
    p = ResponseParser()
    body = bytearray()
    at = 0
    for cut in [*sorted(c % (len(raw) + 1) for c in cuts), len(raw)]:
        piece = raw[at:cut]
        if in_buffer:
            buf = bytearray(b"\r\n0\r\n" * 2) + piece + b"HTTP/1.1 500 x\r\n"
            for start, end in p.feed(buf, 10, 10 + len(piece)):
                body += buf[start:end]
        else:
            for start, end in p.feed(piece):
                body += piece[start:end]
        at = cut
    if eof:
        p.feed_eof()
    return p.status, p.headers, bytes(body), p.complete, p.keep_alive


def chunked(body: bytes, sizes: list[int], ext: bool) -> bytes:
    out, at = bytearray(), 0
    for size in [*sizes, len(body)]:
        part = body[at : at + size]
        if part:
            out += b"%x%s\r\n%s\r\n" % (len(part), b";name=value" if ext else b"", part)
        at += len(part)
    return bytes(out) + b"0\r\n" + (b"Trailer: x\r\n" if ext else b"") + b"\r\n"


@given(status=st.integers(200, 599).filter(lambda s: s not in (204, 304)), body=bodies, cuts=splits,
       headers=st.lists(st.tuples(tokens, values), max_size=5), interim=st.booleans(),
       in_buffer=st.booleans())
def test_content_length_responses_any_split(status, body, cuts, headers, interim, in_buffer):
    head = b"".join(b"X-%s: %s\r\n" % (n.encode(), v.encode()) for n, v in headers)
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b"") + \
        b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), head, body)
    got_status, got_headers, got_body, complete, keep_alive = parse(raw, cuts, in_buffer=in_buffer)
    assert (got_status, got_body, complete, keep_alive) == (status, body, True, True)
    for name, value in headers:  # repeated names joined, as RFC 9110 allows
        assert value in got_headers[f"x-{name}"].split(", ") or value == ""


@given(body=bodies, sizes=st.lists(st.integers(1, 500), max_size=8), ext=st.booleans(), cuts=splits,
       in_buffer=st.booleans())
def test_chunked_responses_any_split(body, sizes, ext, cuts, in_buffer):
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes, ext)
    assert parse(raw, cuts, in_buffer=in_buffer)[2:4] == (body, True)


@given(body=bodies, cuts=splits)
def test_a_body_delimited_by_the_connection_ends_with_it(body, cuts):
    raw = b"HTTP/1.1 200 OK\r\n\r\n" + body
    assert parse(raw, cuts)[3] is False
    assert parse(raw, cuts, eof=True)[2:] == (body, True, False)


def test_connection_close_and_http10_are_not_kept_alive():
    assert parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[4] is False
    assert parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[4] is False
    assert parse(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[4] is True
    assert parse(b"HTTP/1.1 204 No Content\r\n\r\n")[2:4] == (b"", True)


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
])
def test_malformed_or_ambiguous_responses_are_refused(raw):
    with pytest.raises(HTTPParseError):
        parse(raw)


def test_limits_on_the_head_and_chunk_lines():
    with pytest.raises(HTTPParseError, match="longer than"):
        parse(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (1 << 16))
    with pytest.raises(HTTPParseError, match="too long"):
        parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * 5000)


@pytest.mark.parametrize("raw", [b"", b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"])
def test_a_response_cut_short_is_an_error_at_eof(raw):
    with pytest.raises(HTTPParseError, match="closed"):
        parse(raw, eof=True)


def test_request_bytes():
    assert request_bytes("POST", "/api/v1/keys/b1/enc_keys", "127.0.0.1:8443",
                         [("Content-Type", "application/json")], b"{}") == (
        b"POST /api/v1/keys/b1/enc_keys HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert request_bytes("GET", "/x", "h") == b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    for bad in [("GE T", "/x", ()), ("GET", "x", ()), ("GET", "/a b", ()),
                ("GET", "/x", [("A", "b\r\nC: d")]), ("GET", "/x", [("A:", "b")])]:
        with pytest.raises(ValueError):
            request_bytes(bad[0], bad[1], "h", bad[2])
