"""The node's MPC plumbing in memory: the mailbox (order, bounds, failure, timeout) and the key pool."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from nodes.mpc import Mailbox, QueryFailed
from qkd_sim.envelope_keys import KeyPool
from qstore.errors import Conflict, RemoteError
from qstore.otp import QKDKey

QID = "0" * 32


async def test_messages_wait_for_their_round_and_come_whole():
    box = Mailbox()
    box.put(QID, 1, 2, 1, 2, b"world")  # early: round 1 before round 0, second part first
    box.put(QID, 0, 2, 0, 1, b"r0-from-2")
    box.put(QID, 0, 3, 0, 1, b"r0-from-3")
    got = await box.take(QID, 0, [2, 3], 1.0, {})
    assert got == {2: b"r0-from-2", 3: b"r0-from-3"}
    waiter = asyncio.create_task(box.take(QID, 1, [2], 1.0, {}))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # part 0 of 2 is missing
    box.put(QID, 1, 2, 0, 2, b"hello ")
    assert await waiter == {2: b"hello world"}
    box.close(QID)


async def test_duplicates_bad_numbering_and_bounds_are_refused():
    box = Mailbox()
    box.put(QID, 0, 2, 0, 1, b"x")
    with pytest.raises(Conflict):
        box.put(QID, 0, 2, 0, 1, b"x")
    with pytest.raises(RemoteError):
        box.put(QID, 1, 2, 3, 2, b"x")
    for i in range(63):
        box.put(f"{i + 1:032x}", 0, 2, 0, 1, b"")
    with pytest.raises(Conflict, match="too many"):
        box.put("f" * 32, 0, 2, 0, 1, b"")


async def test_a_late_peer_or_an_abort_ends_the_wait_with_its_name():
    box = Mailbox()
    with pytest.raises(QueryFailed, match=r"site3.*round 4"):
        await box.take(QID, 4, [2, 3], 0.05, {2: "site2", 3: "site3"})
    waiter = asyncio.create_task(box.take(QID, 5, [2], 5.0, {}))
    await asyncio.sleep(0.01)
    box.fail(QID, "node site2 stopped: disk full")
    with pytest.raises(QueryFailed, match="disk full"):
        await waiter


async def test_the_key_pool_hands_out_whole_keys_once_and_refills():
    fetched: list[tuple[int, int]] = []

    async def fetch(number: int, size_bits: int) -> list[QKDKey]:
        fetched.append((number, size_bits))
        return [QKDKey(key_id=str(uuid.uuid4()), key=os.urandom(size_bits // 8)) for _ in range(number)]

    pool = KeyPool(fetch, unit=100, depth=8, most=4)
    assert pool.take(150) is None  # empty: starts a refill, the caller fetches its own
    await asyncio.sleep(0.01)
    first = pool.take(150)
    assert first is not None and len(first) == 2 and all(len(k.key) == 100 for k in first)
    second = pool.take(100)
    assert second is not None and {k.key_id for k in first}.isdisjoint(k.key_id for k in second)
    assert pool.take(10_000) is None  # large messages fetch their own keys
    await asyncio.sleep(0.01)
    assert fetched[0] == (8, 800) and all(size == 800 for _, size in fetched)
    await pool.close()
    assert pool.take(1) is None


async def test_a_failing_fetch_leaves_the_pool_empty_without_raising_and_it_retries_later():
    calls = []

    async def fetch(number: int, size_bits: int) -> list[QKDKey]:
        calls.append(number)
        if len(calls) == 1:
            raise RemoteError("KME down")
        return [QKDKey(key_id=str(uuid.uuid4()), key=os.urandom(size_bits // 8)) for _ in range(number)]

    pool = KeyPool(fetch, unit=64, depth=4, retry_s=0.05)
    assert pool.take(10) is None
    await asyncio.sleep(0.01)
    assert pool.take(10) is None and calls == [4]  # no new attempt before retry_s
    await asyncio.sleep(0.06)
    assert pool.take(10) is None  # starts the retry
    await asyncio.sleep(0.01)
    taken = pool.take(10)
    assert taken is not None and len(taken) == 1 and calls == [4, 4]
    await pool.close()


async def test_messages_of_queries_never_run_here_expire():
    now = [0.0]
    box = Mailbox(clock=lambda: now[0])
    box.put("a" * 32, 0, 2, 0, 1, b"x" * 100)  # a query this node never starts
    box.fail("b" * 32, "node site2 stopped: no such table")  # one it refused and a peer aborted
    box.put("c" * 32, 0, 2, 0, 1, b"y")
    await box.take("c" * 32, 0, [2], 1.0, {})  # one it runs
    now[0] = 1000.0
    box.put("d" * 32, 0, 2, 0, 1, b"z")  # any new arrival sweeps the stale ones
    assert set(box._queries) == {"c" * 32, "d" * 32} and box._bytes == 1
