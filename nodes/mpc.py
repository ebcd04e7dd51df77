"""The MPC runtime of a node: drives a sans-IO protocol over sealed node-to-node links.

A protocol (:mod:`qstore.mpc.engine`) yields one :class:`Exchange` per round.
The runtime seals each peer's payload with fresh QKD key (one-time pad and
one-time MAC, key from this node's KME with ``enc_keys``: the node is the
master SAE of that message), posts it to the peer's ``/v1/mpc/messages``,
waits for every peer's message of the same round in the :class:`Mailbox`
(the peer opens with ``dec_keys``), and resumes the protocol with them. CPU
work of a step runs in a worker thread, so a node keeps accepting its
peers' messages while it computes.

Failure is clean and quick: a peer that cannot be reached, a message that
does not open, or a round that does not complete within the timeout ends
the query on this node with an error naming the peer; the node tells the
other peers (``/v1/mpc/abort``) so they stop waiting too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from qstore.errors import Conflict, RemoteError

log = logging.getLogger(__name__)

PART_BYTES = 16 << 20  # payloads above this travel as several sealed parts, concurrently
MAX_PENDING_QUERIES = 64
MAX_PENDING_BYTES = 2 << 30
PENDING_TTL_S = 120.0


class QueryFailed(RemoteError):
    """The query could not finish on this node (a peer down, too slow, or sent garbage)."""

    status = 502


@dataclass
class _Query:
    created: float
    parts: dict[tuple[int, int], dict[int, list[bytes | None]]] = field(default_factory=dict)  # (round, x)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    nbytes: int = 0
    active: bool = False  # this node runs the query (it has taken a round's messages)


class Mailbox:
    """Messages from peer nodes, by query, round and sender, until the query's runner takes them.

    Messages may arrive before this node has started the query (a faster
    peer); they wait here, within bounds (queries, bytes, age).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self._queries: dict[str, _Query] = {}
        self._bytes = 0
        self._clock = clock

    def _query(self, query_id: str) -> _Query:
        q = self._queries.get(query_id)
        if q is None:
            self._expire()
            if len(self._queries) >= MAX_PENDING_QUERIES:
                raise Conflict("too many queries in progress on this node")
            q = self._queries[query_id] = _Query(created=self._clock())
        return q

    def _expire(self) -> None:
        now = self._clock()
        for qid, q in list(self._queries.items()):
            if now - q.created > PENDING_TTL_S and not q.active:  # never started here, or aborted
                self.close(qid)

    def put(self, query_id: str, round_: int, sender: int, part: int, parts: int, payload: bytes) -> None:
        q = self._query(query_id)
        if self._bytes + len(payload) > MAX_PENDING_BYTES:
            raise Conflict("this node holds too many undelivered MPC messages")
        slots = q.parts.setdefault((round_, sender), {}).setdefault(0, [None] * parts)
        if len(slots) != parts or not 0 <= part < parts:
            raise RemoteError("message part numbering does not match")
        if slots[part] is not None:
            raise Conflict("message part sent twice")
        slots[part] = payload
        q.nbytes += len(payload)
        self._bytes += len(payload)
        q.arrived.set()

    def fail(self, query_id: str, reason: str) -> None:
        q = self._query(query_id)
        q.failure = q.failure or reason
        q.arrived.set()

    async def take(self, query_id: str, round_: int, senders: list[int], timeout_s: float,
                   names: dict[int, str]) -> dict[int, bytes]:
        """Every sender's whole message of this round (QueryFailed when one is late or the query failed)."""
        q = self._query(query_id)
        q.active = True
        deadline = self._clock() + timeout_s
        while True:
            if q.failure is not None:
                raise QueryFailed(q.failure)
            done = {}
            for x in senders:
                slots = q.parts.get((round_, x), {}).get(0)
                if slots is not None and all(p is not None for p in slots):
                    done[x] = slots
            if len(done) == len(senders):
                out = {}
                for x, slots in done.items():
                    out[x] = b"".join(slots)  # type: ignore[arg-type]
                    del q.parts[(round_, x)]
                    size = sum(len(p) for p in slots)  # type: ignore[arg-type]
                    q.nbytes -= size
                    self._bytes -= size
                return out
            left = deadline - self._clock()
            if left <= 0:
                late = [names.get(x, str(x)) for x in senders if x not in done]
                raise QueryFailed(f"no message from {', '.join(late)} in round {round_} "
                                  f"within {timeout_s:g} s")
            q.arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await q.arrived.wait()

    def close(self, query_id: str) -> None:
        q = self._queries.pop(query_id, None)
        if q is not None:
            self._bytes -= q.nbytes


Send = Callable[[int, int, bytes], Awaitable[int]]  # (peer x, round, payload) -> key bytes spent


@dataclass
class RunStats:
    rounds: int = 0
    bytes_sent: int = 0
    key_spent: int = 0
    seconds: float = 0.0
    compute_s: float = 0.0  # in protocol steps (worker thread)
    send_s: float = 0.0  # sealing and posting this node's messages (key fetches included)
    wait_s: float = 0.0  # waiting for the peers' messages after sending ours


def _step(protocol: Generator[Any, Any, Any], received: Any) -> tuple[bool, Any]:
    """One step of the protocol: (False, its next Exchange) or (True, its result).

    StopIteration cannot cross a thread into a Future, hence the flag.
    """
    try:
        return False, protocol.send(received)
    except StopIteration as stop:
        return True, stop.value


async def drive(protocol: Generator[Any, Any, Any], *, query_id: str, me: int, peers: list[int],
                send: Send, mailbox: Mailbox, names: dict[int, str], round_timeout_s: float,
                max_elements: int, stats: RunStats) -> Any:
    """Run ``protocol`` to its end, exchanging each round's messages with ``peers``; its return value."""
    from qstore.mpc import engine

    started = time.perf_counter()
    received: dict[int, list[Any]] | None = None
    round_ = 0
    try:
        while True:
            t0 = time.perf_counter()
            done, exchange = await asyncio.to_thread(_step, protocol, received)
            stats.compute_s += time.perf_counter() - t0
            if done:
                return exchange
            targets = set(exchange.out)
            if targets != set(peers):
                raise QueryFailed(f"protocol round {round_} addresses {sorted(targets)}, "
                                  f"not the peers {peers}")
            payloads = {x: engine.encode_payload(vecs) for x, vecs in exchange.out.items()}
            t1 = time.perf_counter()
            spent = await asyncio.gather(*(send(x, round_, payloads[x]) for x in peers))
            t2 = time.perf_counter()
            stats.send_s += t2 - t1
            stats.key_spent += sum(spent)
            stats.bytes_sent += sum(len(p) for p in payloads.values())
            raw = await mailbox.take(query_id, round_, peers, round_timeout_s, names)
            stats.wait_s += time.perf_counter() - t2
            try:
                received = {x: engine.decode_payload(raw[x], max_elements) for x in peers}
            except ValueError as exc:
                raise QueryFailed(f"a peer sent a malformed message in round {round_}: {exc}") from None
            round_ += 1
            stats.rounds = round_
    finally:
        stats.seconds = time.perf_counter() - started
        protocol.close()
