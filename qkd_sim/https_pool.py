"""Keep-alive HTTPS/1.1 connections to one server, for an SAE's requests to its KME (asyncio shell).

Why not aiohttp here: an SAE receives its keys as megabytes of base64 in
JSON, so its cost is in the bytes, and asyncio's TLS layer copies each of
them three times (socket to memory BIO, decrypted into a new bytes object per
record, joined) before aiohttp's parser and stream copy them again. This pool
decrypts with a non-blocking :class:`ssl.SSLSocket` straight into one 1 MiB
buffer per connection and hands the body's ranges of it to the caller's sink
(:class:`qkd_sim.etsi014.KeyContainerReader` decodes the base64 from there),
so key bytes are copied by the kernel and decrypted by OpenSSL, and that is
all. HTTP parsing is sans-IO in :mod:`qkd_sim.http1`.

Semantics follow aiohttp's client where the SAE relied on them: a connection
is reused while the server keeps it alive; a request on a reused connection
that the server had closed (no byte of answer) is sent once more on a new one;
``read_timeout_s`` bounds each wait for bytes; a cancelled request closes its
connection. Everything that goes wrong on the wire is :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from qkd_sim.http1 import HTTPParseError, ResponseParser, request_bytes

BUFFER_BYTES = 1 << 20
"""Decrypted bytes gathered per connection before they are parsed and handed on."""

Sink = Callable[[bytearray, int, int], None]
"""Called with (buffer, start, end) for each range of body bytes; the buffer is reused after it returns."""


class TransportError(Exception):
    """The server could not be reached, closed the connection, was too slow, or did not speak HTTP/1.1."""


@dataclass(frozen=True)
class Answer:
    """A response: status, headers (lower-case names), and its body unless it went to a sink."""

    status: int
    headers: dict[str, str]
    body: bytes


class BodyTooLarge(TransportError):
    """The body of an answer with ``status`` exceeded the caller's limit (the connection was dropped)."""

    def __init__(self, message: str, status: int):
        self.status = status
        super().__init__(message)


class _Stale(Exception):
    """The connection failed before any byte of the answer: the server may never have read the request."""


class _Connection:
    """One TLS connection, its receive buffer, and waiting for it to be readable or writable."""

    def __init__(self, sock: ssl.SSLSocket, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.buf = bytearray(BUFFER_BYTES)
        self.view = memoryview(self.buf)
        self.idle_since = loop.time()
        self.answered = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading = False

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                raw, error = None, None
                for family, kind, proto, _, address in infos:
                    raw = socket.socket(family, kind, proto)
                    raw.setblocking(False)
                    try:
                        await loop.sock_connect(raw, address)
                        break
                    except OSError as exc:
                        raw.close()
                        raw, error = None, exc
                    except BaseException:  # timed out or cancelled: the socket is not left open
                        raw.close()
                        raise
                if raw is None:
                    raise error or OSError(f"no address for {host}")
                if raw.family in (socket.AF_INET, socket.AF_INET6):
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
                conn = cls(sock, loop)
                try:
                    await conn._handshake()
                except BaseException:
                    conn.close()
                    raise
                return conn
        except TimeoutError:
            raise TransportError(f"no TLS connection within {timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(_reason(exc)) from None

    async def _handshake(self) -> None:
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(readable=True, timeout=None)
            except ssl.SSLWantWriteError:
                await self._wait(readable=False, timeout=None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, *, readable: bool, timeout: float | None) -> None:
        """Until the socket is readable (or writable); TimeoutError after ``timeout`` seconds."""
        self._waiter = self.loop.create_future()
        registered = readable and self._reading  # the reader stays registered while a response is read
        if not registered:
            (self.loop.add_reader if readable else self.loop.add_writer)(self.fd, self._wake)
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None
            if not registered:
                (self.loop.remove_reader if readable else self.loop.remove_writer)(self.fd)

    def alive(self) -> bool:
        """An idle connection the server has not closed (nor sent anything on)."""
        try:
            self.sock.recv_into(self.view[:1], 1)  # returns only at the end of the connection, or on data
        except ssl.SSLWantReadError:
            return True
        except (OSError, ssl.SSLError):
            pass
        return False

    async def send(self, data: bytes, timeout: float) -> None:
        view, at = memoryview(data), 0
        while at < len(data):
            try:
                at += self.sock.send(view[at:])
            except ssl.SSLWantWriteError:
                await self._wait(readable=False, timeout=timeout)
            except ssl.SSLWantReadError:
                await self._wait(readable=True, timeout=timeout)

    async def receive(self, parser: ResponseParser, on_body: Callable[[int, int], None],
                      timeout: float) -> None:
        """Read one response into ``parser``, body ranges of ``self.buf`` to ``on_body``.

        ``self.answered`` tells, also when this raises, whether any byte of it came.
        """
        sock, view, size = self.sock, self.view, len(self.buf)
        fill = 0
        self.answered = False
        self.loop.add_reader(self.fd, self._wake)
        self._reading = True
        try:
            while not parser.complete:
                try:
                    n = sock.recv_into(view[fill:], size - fill)
                except ssl.SSLWantReadError:
                    if fill:
                        self._parse(parser, fill, on_body)
                        fill = 0
                        continue
                    await self._wait(readable=True, timeout=timeout)
                    continue
                except ssl.SSLWantWriteError:
                    await self._wait(readable=False, timeout=timeout)
                    continue
                except ssl.SSLZeroReturnError:
                    n = 0
                if n == 0:  # the server closed the connection
                    if fill:
                        self._parse(parser, fill, on_body)
                        fill = 0
                    if not parser.complete:
                        parser.feed_eof()
                    break
                self.answered = True
                fill += n
                if fill == size:
                    self._parse(parser, fill, on_body)
                    fill = 0
                    await asyncio.sleep(0)  # a long body does not hold the event loop
            if fill:
                self._parse(parser, fill, on_body)
        finally:
            self._reading = False
            self.loop.remove_reader(self.fd)

    def _parse(self, parser: ResponseParser, fill: int, on_body: Callable[[int, int], None]) -> None:
        for start, end in parser.feed(self.buf, 0, fill):
            on_body(start, end)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _reason(exc: BaseException) -> str:
    """What went wrong, without addresses or certificate contents beyond the error's kind."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return type(exc).__name__


class HTTPSPool:
    """Requests to the server at ``url`` (``https://host:port``) over keep-alive TLS connections.

    ``context`` is the client's :class:`ssl.SSLContext` (with its certificate for
    mutual TLS). At most ``max_connections`` requests are in flight (more wait
    their turn: a KME serves no faster on more connections, and every new one
    costs a TLS handshake at both ends). Connections are kept between
    requests for at most ``idle_s`` seconds (below aiohttp's server keep-alive
    of 75 s, so that the server rarely closes one under a request).
    """

    def __init__(self, url: str, context: ssl.SSLContext, *, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 300.0, max_connections: int = 32, idle_s: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("url must be https://host[:port]")
        self.host = parts.hostname
        self.port = parts.port or 443
        self._host_header = parts.netloc.rpartition("@")[2]
        self.context = context
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.idle_s = idle_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"HTTPSPool(https://{self._host_header}, {len(self._idle)} idle)"

    async def __aenter__(self) -> HTTPSPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, method: str, target: str, *, headers: Iterable[tuple[str, str]] = (),
                      body: bytes = b"", limit: int, sink: Sink | None = None,
                      other_limit: int = 1 << 20) -> Answer:
        """Send one request; the answer, a 200 answer's body fed to ``sink`` instead if one is given.

        A 200 answer's body longer than ``limit`` bytes, or another's longer
        than ``other_limit``, raises :class:`BodyTooLarge`.
        """
        if self._closed:
            raise TransportError("the connection pool is closed")
        data = request_bytes(method, target, self._host_header, headers, body)
        async with self._slots:
            conn, reused = await self._acquire()
            while True:
                try:
                    return await self._exchange(conn, data, limit, other_limit, sink)
                except _Stale as exc:
                    if not reused:
                        raise TransportError(f"closed without an answer ({exc})") from None
                # the server had closed the idle connection: once more on a new one
                conn, reused = await _Connection.open(self.host, self.port, self.context,
                                                      self.connect_timeout_s), False

    async def _exchange(self, conn: _Connection, data: bytes, limit: int, other_limit: int,
                        sink: Sink | None) -> Answer:
        parser = ResponseParser()
        parts: list[bytes] = []
        total = 0

        def on_body(start: int, end: int) -> None:
            nonlocal total
            total += end - start
            most = limit if parser.status == 200 else other_limit
            if total > most:
                raise BodyTooLarge(f"answer ({parser.status}) longer than {most} bytes", parser.status)
            if sink is not None and parser.status == 200:
                sink(conn.buf, start, end)
            else:
                parts.append(bytes(conn.view[start:end]))

        conn.answered = False
        try:
            await conn.send(data, self.read_timeout_s)
            await conn.receive(parser, on_body, self.read_timeout_s)
        except HTTPParseError as exc:
            conn.close()
            if not conn.answered:
                raise _Stale(str(exc)) from None
            raise TransportError(f"bad HTTP answer: {exc}") from None
        except TimeoutError:
            conn.close()
            raise TransportError(f"no answer within {self.read_timeout_s:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            if not conn.answered:
                raise _Stale(_reason(exc)) from None
            raise TransportError(_reason(exc)) from None
        except BaseException:
            conn.close()  # cancelled, or the sink raised: the connection is mid-answer
            raise
        self._release(conn, parser.keep_alive)
        return Answer(parser.status, parser.headers, b"".join(parts))

    async def _acquire(self) -> tuple[_Connection, bool]:
        """An idle connection the server still holds open (True), else a new one (False)."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since <= self.idle_s and conn.alive():
                return conn, True
            conn.close()
        return await _Connection.open(self.host, self.port, self.context, self.connect_timeout_s), False

    def _release(self, conn: _Connection, keep_alive: bool) -> None:
        if keep_alive and not self._closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
