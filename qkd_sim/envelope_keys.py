"""Key for exactly one envelope: fresh keys sized to the need, never shared with another envelope.

Why not a long-lived per-peer buffer: a key whose first half sealed one
envelope and whose second half seals the next ties the two envelopes to one
receiver *process*. ETSI GS QKD 014 hands each key to each side once, so when
the peer restarts (a CLI client is a new process for every command; a node
may be restarted), the new process cannot fetch that key again and every
envelope using its rest fails. Keys cut to the envelope avoid this: the
sender asks ``enc_keys`` for ``nbytes // max`` keys of the largest size and
one key for the remainder (both within the KME's limits), so no byte is
wasted and no key outlives its envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any

from qkd_sim.etsi014 import canonical_key_id
from qkd_sim.sae import SAEClient
from qstore.errors import LocalError, QStoreError
from qstore.otp import KeyRef, KeyStream, QKDKey

ANNOUNCE_HEADER = "X-QStore-Keys"  # key IDs a sender fetched ahead for envelopes to the receiver
EPOCH_HEADER = "X-QStore-Epoch"  # names one receiving process of an SAE (random, per process)
MAX_ANNOUNCED = 256  # key IDs in one announcement at most
_HEX = frozenset("0123456789abcdef")


async def envelope_keys(sae: SAEClient, peer: str, nbytes: int) -> KeyStream:
    """A key stream holding exactly ``nbytes`` of fresh key shared with slave SAE ``peer``."""
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise LocalError("nbytes must be a positive integer")
    status = await sae.limits(peer)
    biggest = status.max_key_size // 8
    smallest = max(1, status.min_key_size // 8)
    full, rest = divmod(nbytes, biggest)
    if rest and rest < smallest:  # the last key would be below the KME's minimum: split differently
        full, rest = full - 1, rest + biggest
        if full < 0:
            full, rest = 0, smallest
    calls = []
    per = status.max_key_per_request
    while full > 0:
        calls.append(sae.get_enc_keys(peer, min(full, per), 8 * biggest))
        full -= min(full, per)
    if rest > biggest:  # rest + biggest after the minimum adjustment: two keys
        half = rest // 2
        calls += [sae.get_enc_keys(peer, 1, 8 * half), sae.get_enc_keys(peer, 1, 8 * (rest - half))]
    elif rest:
        calls.append(sae.get_enc_keys(peer, 1, 8 * rest))
    batches: list[list[QKDKey]] = await asyncio.gather(*calls)
    return KeyStream(key for batch in batches for key in batch)


async def opening_keys(sae: SAEClient, master: str, refs: list[KeyRef]) -> KeyStream:
    """A key stream holding the keys an envelope from ``master`` names (fetched with ``dec_keys``).

    Per envelope too: the KME hands a key_ID to this SAE once, so a replayed
    envelope fails there (KMEError with kme_status 400) without any local
    record of spent key_IDs growing for ever.
    """
    return KeyStream(await _dec_keys(sae, master, list(dict.fromkeys(ref.key_id for ref in refs))))


async def _dec_keys(sae: SAEClient, master: str, ids: list[str]) -> list[QKDKey]:
    """The keys ``ids`` from ``master``, in as few ``dec_keys`` requests as the KME's limit allows."""
    per = (await sae.limits(master)).max_key_per_request
    batches = await asyncio.gather(*(sae.get_dec_keys(master, ids[i : i + per])
                                     for i in range(0, len(ids), per)))
    return [key for batch in batches for key in batch]


class KeyPool:
    """Keys fetched ahead for small envelopes to one peer (MPC round messages, small objects' shares).

    Most rounds of a query carry a few hundred bytes, and a small object's
    share a few KiB; fetching their key with ``enc_keys`` when the envelope is
    ready puts a KME round trip on the critical path of each. The pool holds whole keys of
    :attr:`unit` bytes fetched in the background; a message that fits in
    the pool takes whole keys (never a key another message uses: the
    per-envelope rule of :mod:`qkd_sim.envelope_keys` holds, and the unused
    rest of its last key is wiped with it). Larger messages fetch their own.
    Refills run as tasks the pool owns; :meth:`close` cancels them. After
    a failed refill (a KME down, a link dry) the pool tries again only after
    ``retry_s``, so that a long-lived process does not stay without it.
    """

    def __init__(self, fetch: Callable[[int, int], Awaitable[list[Any]]], *, unit: int = 512,
                 depth: int = 16, most: int = 4, retry_s: float = 5.0):
        self._fetch = fetch  # (number, size_bits) -> keys
        self.unit = unit
        self.depth = depth
        self.most = most  # keys per message at most: larger messages fetch their own, cut to size
        self._keys: list[Any] = []
        self._news: list[str] = []  # IDs of keys fetched but not yet announced to the receiver
        self._refill: asyncio.Task[None] | None = None
        self.retry_s = retry_s
        self._retry_at = 0.0  # loop time before which no refill starts (after a failed one)

    def _start_refill(self) -> None:
        loop = asyncio.get_running_loop()
        if (self._refill is None or self._refill.done()) and loop.time() >= self._retry_at:
            self._refill = loop.create_task(self._fill())

    async def _fill(self) -> None:
        want = self.depth - len(self._keys)
        if want <= 0:
            return
        try:
            keys = await self._fetch(want, 8 * self.unit)
            self._keys.extend(keys)
            self._news.extend(k.key_id for k in keys)
            del self._news[: -MAX_ANNOUNCED]
        except Exception:  # the next message fetches its own key and reports the error
            self._retry_at = asyncio.get_running_loop().time() + self.retry_s

    def take(self, nbytes: int) -> list[Any] | None:
        """Whole keys covering ``nbytes`` if the pool has them now (then refills), else None."""
        count = -(-nbytes // self.unit)
        if count > self.most:
            return None
        if len(self._keys) < count:
            self._start_refill()
            return None
        taken, self._keys = self._keys[:count], self._keys[count:]
        if len(self._keys) < self.depth // 2:
            self._start_refill()
        return taken

    def news(self) -> list[str]:
        """IDs of keys fetched since the last call: for the receiver to fetch ahead (:class:`OpeningKeys`)."""
        news, self._news = self._news, []
        return news

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        self._keys = []  # QKDKey bytes are immutable: dropped, as envelope_keys drops its own
        self._news = []


class AheadKeys:
    """One :class:`KeyPool` per peer of an SAE: key for an envelope, from the pool when it is small.

    For long-lived processes (nodes, the S3 gateway): keys fetched ahead wait
    at the KME until the peer asks for them, so a short-lived one (a CLI
    command) would leave its pool's keys unused.
    """

    def __init__(self, sae: SAEClient, *, unit: int = 512, depth: int = 16, most: int = 4,
                 max_pools: int = 1024):
        self.sae = sae
        self.unit, self.depth, self.most = unit, depth, most
        self.max_pools = max_pools
        self._pools: dict[Hashable, KeyPool] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _fetch(self, peer: str) -> Callable[[int, int], Awaitable[list[Any]]]:
        async def fetch(number: int, size_bits: int) -> list[Any]:
            limit = (await self.sae.limits(peer)).max_key_per_request
            return await self.sae.get_enc_keys(peer, min(number, limit), size_bits)

        return fetch

    async def envelope(self, peer: str, nbytes: int, *,
                       pool: Hashable | None = None) -> tuple[KeyStream, int]:
        """Key for one envelope of ``nbytes`` to ``peer``, and the key bytes it spends (whole keys when
        they come from the pool: the rest of the last one is wiped unused).

        ``pool``: which of the peer's pools (default: the peer's own). A node keeps one per receiving
        process of an SAE, so that keys it announced reach only the process that fetches them.
        """
        name = peer if pool is None else pool
        keys = self._pools.get(name)
        if keys is None:
            if len(self._pools) >= self.max_pools:
                self._retire(next(iter(self._pools)))
            keys = self._pools[name] = KeyPool(self._fetch(peer), unit=self.unit, depth=self.depth,
                                               most=self.most)
        ahead = keys.take(nbytes)
        if ahead is not None:
            return KeyStream(ahead), len(ahead) * keys.unit
        return await envelope_keys(self.sae, peer, nbytes), nbytes

    def news(self, pool: Hashable) -> list[str]:
        """Key IDs the pool fetched since last asked: announce them to the receiver."""
        keys = self._pools.get(pool)
        return keys.news() if keys is not None else []

    def reset(self, pool: Hashable) -> None:
        """Drop a pool (the receiver lost the keys it fetched ahead: it restarted); the next starts fresh."""
        if pool in self._pools:
            self._retire(pool)

    def _retire(self, pool: Hashable) -> None:
        task = asyncio.get_running_loop().create_task(self._pools.pop(pool).close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        for task in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def check_epoch(epoch: str) -> str:
    """An :data:`EPOCH_HEADER` value: 16 to 64 lowercase hex digits (LocalError otherwise)."""
    if not 16 <= len(epoch) <= 64 or not set(epoch) <= _HEX:
        raise LocalError(f"{EPOCH_HEADER} must be 16 to 64 lowercase hex digits")
    return epoch


def parse_announcement(value: str | None) -> list[str]:
    """The key IDs of an :data:`ANNOUNCE_HEADER` value (comma-separated); LocalError when malformed."""
    if not value:
        return []
    ids = value.split(",")
    if len(ids) > MAX_ANNOUNCED:
        raise LocalError(f"at most {MAX_ANNOUNCED} key IDs may be announced at once")
    return [canonical_key_id(i.strip()) for i in ids]


class OpeningKeys:
    """The receiving side of announced keys: fetched ahead with one ``dec_keys`` per announcement.

    A sender that fetched keys ahead (:class:`AheadKeys`) names them in
    :data:`ANNOUNCE_HEADER`; the receiver fetches them all at once in the
    background, and an envelope that uses them opens without a KME round trip
    of its own. Each key still serves one envelope: :meth:`stream` hands a
    held key out once and forgets it, so a replayed envelope finds nothing
    here, asks the KME, and is refused there as before. IDs this receiver has
    asked for already (alone or announced) are never asked again, so a late
    announcement cannot spoil a batch. Held keys are bounded per sender
    (``most``; the oldest go), and so is the memory of IDs asked.
    """

    def __init__(self, sae: SAEClient, *, most: int = 512, remember: int = 8192):
        self.sae = sae
        self.most, self.remember = most, remember
        self._held: dict[str, dict[str, QKDKey]] = {}  # master -> key_ID -> key, oldest first
        self._asked: dict[str, dict[str, None]] = {}  # master -> key IDs asked for, oldest first
        self._pending: dict[str, asyncio.Future[None]] = {}  # key_ID -> its batch fetch
        self._tasks: set[asyncio.Task[None]] = set()

    def _mark_asked(self, master: str, ids: Iterable[str]) -> None:
        asked = self._asked.setdefault(master, {})
        for i in ids:
            asked[i] = None
        while len(asked) > self.remember:
            del asked[next(iter(asked))]

    def announce(self, master: str, key_ids: Iterable[str]) -> None:
        """Start fetching the announced keys that were never asked for."""
        asked = self._asked.get(master, {})
        ids = [i for i in dict.fromkeys(key_ids) if i not in asked and i not in self._pending]
        if not ids:
            return
        self._mark_asked(master, ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for i in ids:
            self._pending[i] = done
        task = asyncio.get_running_loop().create_task(self._fetch(master, ids, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, master: str, ids: list[str], done: asyncio.Future[None]) -> None:
        try:
            # on failure, the envelopes that use these keys ask for them alone, and fail there if they must
            with contextlib.suppress(QStoreError, OSError):
                keys = await _dec_keys(self.sae, master, ids)
                held = self._held.setdefault(master, {})
                held.update((k.key_id, k) for k in keys)
                while len(held) > self.most:
                    del held[next(iter(held))]
        finally:
            for i in ids:
                self._pending.pop(i, None)
            done.set_result(None)

    async def stream(self, master: str, refs: list[KeyRef]) -> KeyStream:
        """The keys an envelope from ``master`` names: held ones, the rest with ``dec_keys``."""
        ids = list(dict.fromkeys(ref.key_id for ref in refs))
        waits = {self._pending[i] for i in ids if i in self._pending}
        if waits:
            await asyncio.gather(*waits)
        held = self._held.get(master, {})
        have = [held.pop(i) for i in ids if i in held]
        got = {k.key_id for k in have}
        missing = [i for i in ids if i not in got]
        if missing:
            self._mark_asked(master, missing)
            have += await _dec_keys(self.sae, master, missing)
        return KeyStream(have)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._held.clear()  # QKDKey bytes are immutable: dropped
