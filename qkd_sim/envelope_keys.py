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
from collections.abc import Awaitable, Callable
from typing import Any

from qkd_sim.sae import SAEClient
from qstore.errors import LocalError
from qstore.otp import KeyRef, KeyStream, QKDKey


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
    ids = list(dict.fromkeys(ref.key_id for ref in refs))
    status = await sae.limits(master)
    per = status.max_key_per_request
    batches = await asyncio.gather(*(sae.get_dec_keys(master, ids[i : i + per])
                                     for i in range(0, len(ids), per)))
    return KeyStream(key for batch in batches for key in batch)


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
            self._keys.extend(await self._fetch(want, 8 * self.unit))
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

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        self._keys = []  # QKDKey bytes are immutable: dropped, as envelope_keys drops its own


class AheadKeys:
    """One :class:`KeyPool` per peer of an SAE: key for an envelope, from the pool when it is small.

    For long-lived processes (nodes, the S3 gateway): keys fetched ahead wait
    at the KME until the peer asks for them, so a short-lived one (a CLI
    command) would leave its pool's keys unused.
    """

    def __init__(self, sae: SAEClient, *, unit: int = 512, depth: int = 16, most: int = 4):
        self.sae = sae
        self.unit, self.depth, self.most = unit, depth, most
        self._pools: dict[str, KeyPool] = {}

    def _fetch(self, peer: str) -> Callable[[int, int], Awaitable[list[Any]]]:
        async def fetch(number: int, size_bits: int) -> list[Any]:
            limit = (await self.sae.limits(peer)).max_key_per_request
            return await self.sae.get_enc_keys(peer, min(number, limit), size_bits)

        return fetch

    async def envelope(self, peer: str, nbytes: int) -> tuple[KeyStream, int]:
        """Key for one envelope of ``nbytes`` to ``peer``, and the key bytes it spends (whole keys when
        they come from the pool: the rest of the last one is wiped unused)."""
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = KeyPool(self._fetch(peer), unit=self.unit, depth=self.depth,
                                               most=self.most)
        ahead = pool.take(nbytes)
        if ahead is not None:
            return KeyStream(ahead), len(ahead) * pool.unit
        return await envelope_keys(self.sae, peer, nbytes), nbytes

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
