"""HTTP/1.1 for an SAE's requests to its KME, sans-IO: request bytes out, response events in.

:class:`ResponseParser` reads one response (RFC 9112): the status line and
headers, then a body delimited by ``Content-Length``, by the chunked coding, or
by the end of the connection. It parses bytes where they lie: :meth:`feed`
takes a buffer and a range and answers the ranges of body bytes in it, so a
shell that decrypts TLS straight into a reused buffer hands key material on
without copying it (:mod:`qkd_sim.https_pool`). It keeps nothing but the head
and the few bytes of a chunk-size line.

It is strict where leniency lets a response be read two ways: conflicting
``Content-Length`` values, ``Content-Length`` beside ``Transfer-Encoding``, a
transfer coding other than ``chunked``, bare LF line ends and obsolete line
folding are refused with :class:`HTTPParseError`, and so are bytes after the
end of a response (this client never pipelines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_HEAD = 1 << 16
"""Most bytes of a status line and headers (aiohttp's server sends a few hundred)."""
_MAX_CHUNK_LINE = 1 << 12  # a chunk-size line, with any extensions
_MAX_TRAILERS = 1 << 14

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([\t !-~\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t -~\x80-\xff]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[\t ]*(;[\t -~\x80-\xff]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class HTTPParseError(Exception):
    """The bytes are not an HTTP/1.1 response this client accepts (the connection is then unusable)."""


def request_bytes(method: str, target: str, host: str, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"") -> bytes:
    """One request: ``method target`` with ``Host``, ``headers`` and ``body`` (``Content-Length`` added)."""
    if not _TOKEN.fullmatch(method.encode("ascii")):
        raise ValueError(f"not an HTTP method: {method!r}")
    if not target.startswith("/") or not target.isascii() or any(c in target for c in " \r\n\t"):
        raise ValueError("a request target is an absolute path of visible ASCII")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name.encode("ascii")) or "\r" in value or "\n" in value:
            raise ValueError(f"not a header field: {name!r}")
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class ResponseParser:
    """One HTTP/1.1 response to a request that is not HEAD, parsed as its bytes arrive.

    After :meth:`feed` has read the head, ``status`` and ``headers`` (names in
    lower case, repeated fields joined with ", ") are set and ``keep_alive``
    says whether the connection may carry another request once ``complete``.
    Interim (1xx) responses are skipped.
    """

    def __init__(self, *, max_head: int = MAX_HEAD):
        self.max_head = max_head
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.complete = False
        self._head = bytearray()
        self._mode = "head"  # head | length | chunk-size | chunk-data | chunk-end | trailers | close | done
        self._left = 0  # body bytes left (length), or of the current chunk
        self._line = bytearray()  # a chunk-size line, a chunk's CRLF, or the trailer section so far

    def __repr__(self) -> str:
        return f"ResponseParser(status={self.status}, {self._mode})"

    def feed(self, data: bytes | bytearray, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Parse ``data[start:end]``; the ``(start, end)`` ranges of body bytes in it, in order."""
        end = len(data) if end is None else end
        pos, body = start, []
        while pos < end:
            mode = self._mode
            if mode == "done":
                raise HTTPParseError("bytes after the end of the response")
            if mode == "head":
                pos = self._read_head(data, pos, end)
            elif mode in ("length", "chunk-data"):
                n = min(self._left, end - pos)
                body.append((pos, pos + n))
                pos += n
                self._left -= n
                if not self._left:
                    self._end_data()
            elif mode == "close":
                body.append((pos, end))
                pos = end
            else:
                pos = self._read_line(data, pos, end)
        return body

    def feed_eof(self) -> None:
        """The connection ended: completes a body delimited by it, else HTTPParseError if cut short."""
        if self._mode == "close":
            self._mode, self.complete = "done", True
        elif self._mode != "done":
            raise HTTPParseError("the connection closed before the response was complete"
                                 if self._mode != "head" or self._head else "the connection closed")

    # -- head -------------------------------------------------------------------

    def _read_head(self, data: bytes | bytearray, pos: int, end: int) -> int:
        head = self._head
        before = len(head)
        take = min(end, pos + self.max_head + 4 - before)  # never more than the limit and its blank line
        head += data[pos:take]
        found = head.find(b"\r\n\r\n", max(0, before - 3))
        if found < 0:
            if len(head) > self.max_head:
                raise HTTPParseError(f"response head longer than {self.max_head} bytes")
            return take
        text = bytes(head[:found])
        self._head = bytearray()
        self._parse_head(text)
        return pos + found + 4 - before

    def _parse_head(self, text: bytes) -> None:
        lines = text.split(b"\r\n")
        if any(b"\n" in line or b"\r" in line for line in lines):
            raise HTTPParseError("a bare CR or LF in the response head")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise HTTPParseError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        minor, status = match.group(1), int(match.group(2))
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HTTPParseError(f"not a header field: {line[:80]!r}")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise HTTPParseError(f"a control character in header {name[:80]!r}")
            key, val = name.decode("ascii").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        if 100 <= status < 200:
            if status == 101:
                raise HTTPParseError("the server switched protocols")
            return  # interim: the real response follows
        self.status, self.reason, self.headers = status, (match.group(3) or b"").decode("latin-1"), headers
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self.keep_alive = "close" not in tokens and (minor == b"1" or "keep-alive" in tokens)
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in (204, 304):
            self._finish()
        elif coding is not None:
            if length is not None:
                raise HTTPParseError("both Content-Length and Transfer-Encoding")
            if coding.strip().lower() != "chunked":
                raise HTTPParseError(f"unsupported Transfer-Encoding {coding[:40]!r}")
            self._mode = "chunk-size"
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values)).encode("ascii", "replace")):
                raise HTTPParseError(f"bad Content-Length {length[:40]!r}")
            self._left = int(next(iter(values)))
            self._mode = "length"
            if not self._left:
                self._finish()
        else:
            self._mode = "close"
            self.keep_alive = False

    # -- chunked ------------------------------------------------------------------

    def _read_line(self, data: bytes | bytearray, pos: int, end: int) -> int:
        """A chunk-size line, the CRLF after a chunk, or a trailer section: up to the line end."""
        line = self._line
        scan = max(0, len(line) - 1)
        limit = _MAX_TRAILERS if self._mode == "trailers" else _MAX_CHUNK_LINE
        take = min(end, pos + limit + 4 - len(line))
        start_len = len(line)
        line += data[pos:take]
        if self._mode == "trailers":
            if line.startswith(b"\r\n"):
                found, stop = 0, 2
            else:
                found = line.find(b"\r\n\r\n", max(0, scan - 2))
                stop = found + 4
        else:
            found = line.find(b"\r\n", scan)
            stop = found + 2
        if found < 0:
            if len(line) > limit:
                raise HTTPParseError("a chunk line or trailer section too long")
            return take
        text = bytes(line[: stop - 2])
        self._line = bytearray()
        next_pos = pos + (stop - start_len)
        if self._mode == "chunk-size":
            match = _CHUNK_SIZE.fullmatch(text)
            if match is None:
                raise HTTPParseError(f"bad chunk size line {text[:40]!r}")
            self._left = int(match.group(1), 16)
            self._mode = "chunk-data" if self._left else "trailers"
        elif self._mode == "chunk-end":
            if text:
                raise HTTPParseError("no CRLF after a chunk")
            self._mode = "chunk-size"
        else:
            lone = text.replace(b"\r\n", b"")
            if b"\n" in lone or b"\r" in lone:
                raise HTTPParseError("a bare CR or LF in the trailers")
            self._finish()
        return next_pos

    def _end_data(self) -> None:
        if self._mode == "length":
            self._finish()
        else:
            self._mode = "chunk-end"

    def _finish(self) -> None:
        self._mode, self.complete = "done", True
