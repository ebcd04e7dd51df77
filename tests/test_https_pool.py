"""qkd_sim.https_pool against real TLS servers on 127.0.0.1: aiohttp's, and a raw one that misbehaves."""

import asyncio
import socket
import ssl

import pytest
from aiohttp import web

from qkd_sim import pki
from qkd_sim.https_pool import BodyTooLarge, HTTPSPool, TransportError

BIG = bytes(range(256)) * 12_289  # about 3 MiB: several buffers' worth


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(root / "ca")
    return {"server": pki.issue(ca, "KME_S", root / "certs", kind="kme"),
            "client": pki.issue(ca, "c1", root / "certs")}


def client_ctx(ids):
    c = ids["client"]
    return pki.client_ssl_context(c.cert, c.key, c.ca)


def server_ctx(ids):
    s = ids["server"]
    return pki.server_ssl_context(s.cert, s.key, s.ca)


@pytest.fixture
async def server(ids):
    """aiohttp over mutual TLS; ``peers`` records the client port of each request (one per connection)."""
    peers: list[int] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])
        body = await request.read()
        if request.query.get("chunked"):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for at in range(0, len(BIG), 100_003):
                await resp.write(BIG[at : at + 100_003])
            await resp.write_eof()
            return resp
        if request.query.get("big"):
            return web.Response(body=BIG)
        if request.query.get("sleep"):
            await asyncio.sleep(float(request.query["sleep"]))
        status = int(request.query.get("status", "200"))
        echoed = b"%s %s %s" % (request.method.encode(), request.path_qs.encode(), body)
        return web.Response(status=status, body=echoed,
                            headers={"X-Got-Id": request.headers.get("X-Request-ID", "")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, keepalive_timeout=0.3)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx(ids))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://localhost:{port}", peers
    await runner.cleanup()


async def test_requests_reuse_one_connection_and_bodies_arrive_whole(server, ids):
    url, peers = server
    async with HTTPSPool(url, client_ctx(ids)) as pool:
        a = await pool.request("POST", "/a?x=1", body=b"hello", limit=1 << 20,
                               headers=[("X-Request-ID", "rid-1")])
        assert (a.status, a.body, a.headers["x-got-id"]) == (200, b"POST /a?x=1 hello", "rid-1")
        big = await pool.request("GET", "/b?big=1", limit=1 << 22)
        assert big.body == BIG
        got = bytearray()
        answer = await pool.request("GET", "/c?chunked=1", limit=1 << 22,
                                    sink=lambda buf, start, end: got.extend(buf[start:end]))
        assert (answer.status, answer.body, bytes(got)) == (200, b"", BIG)
        assert len(set(peers)) == 1, "keep-alive: every request on the first connection"
        # not a 200: the body comes back instead of going to the sink
        other = await pool.request("GET", "/d?status=404", limit=10, sink=lambda *a: pytest.fail("sink"))
        assert (other.status, other.body) == (404, b"GET /d?status=404 ")


async def test_concurrent_requests_open_more_connections_up_to_the_limit(server, ids):
    url, peers = server
    async with HTTPSPool(url, client_ctx(ids), max_connections=3) as pool:
        answers = await asyncio.gather(*(pool.request("GET", f"/{i}?big=1", limit=1 << 22) for i in range(6)))
        assert all(a.body == BIG for a in answers)
        assert len(set(peers)) == 3 and len(pool._idle) == 3


async def test_a_connection_the_server_closed_while_idle_is_replaced(server, ids):
    url, peers = server
    async with HTTPSPool(url, client_ctx(ids)) as pool:
        await pool.request("GET", "/1", limit=100)
        await asyncio.sleep(0.6)  # past the server's keep-alive of 0.3 s
        assert (await pool.request("GET", "/2", limit=100)).body == b"GET /2 "
        assert len(set(peers)) == 2


async def test_limits_timeouts_and_cancellation(server, ids):
    url, _ = server
    async with HTTPSPool(url, client_ctx(ids), read_timeout_s=0.3) as pool:
        with pytest.raises(BodyTooLarge) as info:
            await pool.request("GET", "/big?big=1", limit=1000)
        assert info.value.status == 200
        with pytest.raises(TransportError, match="no answer within"):
            await pool.request("GET", "/slow?sleep=2", limit=100)
        task = asyncio.create_task(pool.request("GET", "/slow?sleep=0.2", limit=100))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool._idle == []  # each of those connections was mid-answer: closed, not reused
        assert (await pool.request("GET", "/ok", limit=100)).status == 200
    with pytest.raises(TransportError, match="closed"):
        await pool.request("GET", "/after", limit=100)


async def test_unreachable_and_untrusted_servers(server, ids, tmp_path):
    url, _ = server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(TransportError, match="refused"):
        await HTTPSPool(f"https://127.0.0.1:{free}", client_ctx(ids)).request("GET", "/", limit=10)
    other = pki.issue(pki.create_ca(tmp_path / "other"), "client", tmp_path / "o")
    untrusting = pki.client_ssl_context(other.cert, other.key, other.ca)
    with pytest.raises(TransportError, match="certificate"):
        await HTTPSPool(url, untrusting).request("GET", "/", limit=10)
    with pytest.raises(ValueError):
        HTTPSPool("http://127.0.0.1:1", client_ctx(ids))


async def raw_server(ids, handle, *, close_after=False):
    """A TLS server answering whatever ``handle(request_number, data)`` returns (None: close instead)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                data = await reader.readuntil(b"\r\n\r\n")
                n += 1
                answer = handle(n, data)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx(ids))
    return srv, f"https://localhost:{srv.sockets[0].getsockname()[1]}"


async def test_a_request_the_server_drops_on_a_reused_connection_is_sent_again(ids):
    seen = []

    def handle(n, data):
        seen.append(n)
        return None if n == 2 else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    srv, url = await raw_server(ids, handle)
    async with HTTPSPool(url, client_ctx(ids)) as pool:
        assert (await pool.request("GET", "/1", limit=10)).body == b"ok"
        assert (await pool.request("GET", "/2", limit=10)).body == b"ok"  # dropped, then sent on a new one
        assert seen == [1, 2, 1]
    srv.close()


@pytest.mark.parametrize("answer, error", [
    (None, "closed without an answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "closed before the response was complete"),
    (b"SMTP ready\r\n\r\n", "bad HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "after the end"),
])
async def test_broken_answers_are_transport_errors(ids, answer, error):
    srv, url = await raw_server(ids, lambda n, data: answer, close_after=True)
    async with HTTPSPool(url, client_ctx(ids)) as pool:
        with pytest.raises(TransportError, match=error):
            await pool.request("GET", "/", limit=100)
        assert pool._idle == []
    srv.close()
