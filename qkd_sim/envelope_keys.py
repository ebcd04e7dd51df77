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
