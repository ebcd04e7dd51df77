"""Trusted-node key relay between KMEs that share no QKD link (sans-IO).

As on the Tokyo QKD Network: when master SAE ``a1`` at KME A asks for keys for
slave SAE ``c1`` at KME C, and A and C are joined only through B (links A–B and
B–C), A makes the keys itself (``os.urandom``, fresh UUID4 key_IDs) and sends
them to C hop by hop, one-time-pad encrypted on every link with that link's
QKD key. Every intermediate KME sees the keys: it is *trusted*.

Protocol (one relay, all or nothing)::

    a1 → A   enc_keys(c1)                 A: keys K, key_IDs I (random)
    A  → B   POST /kme/v1/relay  E_AB     E_AB = seal(payload, key of link A→B)
    B  → C   POST /kme/v1/relay  E_BC     B opens E_AB, re-seals with key of B→C
    C        stores K under I for (a1, c1); answers 200
    B  → A   200                          (after C's 200)
    A  → a1  K, I                         only now: a failed hop hands out nothing
    c1 → C   dec_keys(a1, I)              K, once each

Each hop is a :func:`qstore.otp.seal` envelope (one-time pad and Poly1305
one-time MAC, tag checked before anything else) whose key references are
key_IDs of the sender's outbound :class:`~qkd_sim.pool.LinkPool` toward the
next hop, made for the reserved pair ``kme:<sender>`` → ``kme:<receiver>``
(never a valid SAE ID, so SAEs cannot fetch relay key, nor relay key be made
from an SAE pair's). The receiver resolves them with its inbound pool's
``lookup``, bound to the KME its TLS client certificate names
(``urn:qstore:kme:<id>``, :func:`kme_id_from_peercert`). A hop spends exactly
``32 + len(payload)`` bytes of its link's key: the MAC key and the pad.

Answers of the relay endpoint: 200 ``{"target_KME_ID": ..., "key_count": n}``
once the keys are stored at the destination; 401 (no body) when the caller is
not a KME linked to this one (an SAE certificate included); 400 for an
envelope that does not open ("relay envelope rejected", one message for every
reason) or a payload this KME refuses; 503 when a later hop failed, with
``hop_from_KME_ID``/``hop_to_KME_ID`` in the Error details, which each earlier
KME passes on unchanged. The sender only accepts an answer from the KME its
TLS handshake proved to be the next hop.

Payload (the plaintext of an envelope; integers big-endian)::

    magic      4   b"QRLY"
    version    1   1
    hops       1   links crossed before this one (0 when sent by the origin)
    count      4   number of keys, >= 1
    size       4   bytes per key, 1 .. 2^20
    4 IDs      1 + n each: source_KME_ID, target_KME_ID, master_SAE_ID, slave_SAE_ID (ASCII)
    key_IDs    16 per key: raw UUID bytes
    material   size per key, concatenated in key_ID order

Life of a relayed key, per KME::

    where         state       event                        next
    origin        GENERATED   next hop answers 200         DELIVERED to the master SAE (forgotten)
    origin        GENERATED   a hop fails (any status)     DISCARDED (a1 gets 503 naming the hop)
    intermediate  IN_TRANSIT  next hop answers 200         forgotten (200 to the previous hop)
    intermediate  IN_TRANSIT  next hop fails               forgotten (503 naming the hop)
    destination   STORED      dec_keys by the slave SAE    DELIVERED (deleted)
    destination   STORED      store over capacity          EXPIRED (deleted, oldest first)

Limitations (deliberate): a hop that fails wastes the key every earlier hop
spent (there is no reservation round), so an SAE retrying on 503 spends the
first links' key on every try; if an answer is lost after the destination
stored the keys (a timeout at the origin), they wait there unclaimed until
the store's capacity pushes them out; the origin knows only its first hop's
pool, so Get status for a relayed pair is an upper bound. Routes are static
(:func:`next_hops` computes them from the KME-level links); a route to a KME
that shares a link with this one is refused: a direct link is always used.
"""

from __future__ import annotations

import math
import os
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, TypeVar

from qkd_sim import network
from qkd_sim.etsi014 import Error as ErrorBody
from qkd_sim.etsi014 import (
    EtsiError,
    JSONObject,
    Key,
    KeyContainer,
    KeyIDs,
    KeyRequest,
    KMECore,
    Status,
    Unauthorized,
    canonical_key_id,
    is_id,
)
from qkd_sim.pki import KME_URN, SAE_URN
from qkd_sim.pool import MAX_KEY_BITS, KeyIDNotYours, KeyIDRejected, LinkPool, PoolEmpty
from qstore import otp
from qstore.errors import KeyMaterialError, LocalError, RemoteError, SealError

RELAY_PATH = "/kme/v1/relay"
"""The KME-to-KME endpoint (POST, body: one envelope, mutual TLS with KME certificates)."""
MAX_HOPS = 16
"""Links a payload may cross; a routing loop ends here."""
MAX_RELAY_BYTES = 1 << 22
"""Largest relay payload (header, key_IDs and key material): 4 MiB."""
MAX_ENVELOPE_BYTES = MAX_RELAY_BYTES + (1 << 15)
"""Largest relay request body a KME reads: the payload plus the envelope's header and tag."""
MAX_ANSWER_BYTES = 1 << 16
"""Largest answer a KME reads from the next hop."""
PAIR_PREFIX = "kme:"
"""Relay key is made in a link pool for the pair ``kme:<sender>`` → ``kme:<receiver>``."""

_MAGIC = b"QRLY"
_VERSION = 1
_HEAD = struct.Struct(">4sBBII")
_KEY_BYTES = MAX_KEY_BITS // 8
_REJECTED = "relay envelope rejected"
_SHOWN = 300


class RelayError(RemoteError):
    """A relay payload this KME will not accept (400): malformed, misaddressed or a duplicate."""

    status = 400


class RelayFailed(RemoteError):
    """A hop of a relay failed (503): nothing was handed out. Names the hop."""

    status = 503

    def __init__(self, message: str, *, source: str, target: str, hop_from: str, hop_to: str):
        self.source = source
        self.target = target
        self.hop_from = hop_from
        self.hop_to = hop_to
        super().__init__(message)

    @classmethod
    def at(cls, *, source: str, target: str, hop_from: str, hop_to: str, reason: str) -> RelayFailed:
        return cls(f"key relay {source} → {target} failed at hop {hop_from} → {hop_to}: {reason}",
                   source=source, target=target, hop_from=hop_from, hop_to=hop_to)

    @property
    def details(self) -> tuple[JSONObject, ...]:
        return ({"source_KME_ID": self.source, "target_KME_ID": self.target,
                 "hop_from_KME_ID": self.hop_from, "hop_to_KME_ID": self.hop_to},)


def pair_names(master_kme: str, slave_kme: str) -> tuple[str, str]:
    """The (master, slave) names relay key of one link direction is tagged with in its pool."""
    return PAIR_PREFIX + master_kme, PAIR_PREFIX + slave_kme


def kme_id_from_peercert(peercert: object) -> str | None:
    """The KME ID of a verified peer (``getpeercert()`` form), or None.

    A KME certificate has one Common Name and exactly one SAN URI
    ``urn:qstore:kme:<id>`` naming the same ID, and no SAE URI: so an SAE
    certificate is never a KME identity (nor a KME one an SAE identity, see
    :func:`qkd_sim.pki.sae_id_from_peercert`).
    """
    if not isinstance(peercert, dict):
        return None
    cns = [value for rdn in peercert.get("subject", ()) for (attr, value) in rdn if attr == "commonName"]
    if len(cns) != 1 or not is_id(cns[0]):
        return None
    uris = [value for kind, value in peercert.get("subjectAltName", ())
            if kind == "URI" and isinstance(value, str)]
    if any(u.startswith(SAE_URN) for u in uris):
        return None
    kmes = [u[len(KME_URN):] for u in uris if u.startswith(KME_URN)]
    return cns[0] if kmes == [cns[0]] else None


def next_hops(kme_id: str, links: Iterable[Sequence[object]]) -> dict[str, str]:
    """Next-hop table of ``kme_id`` for every KME it reaches only through others.

    ``links`` are the KME-level QKD links as ``(a, b)`` or ``(a, b, rate_bps)``
    (default unlimited). Routes are :meth:`qkd_sim.network.Network.route`'s
    widest paths (fewest hops among equals); KMEs linked to ``kme_id`` are left
    out, as a direct link is always used.
    """
    edges = []
    for entry in links:
        a, b, *rest = entry
        rate = rest[0] if rest else math.inf
        edges.append(network.Link(a=str(a), b=str(b), rate_bps=float(rate)))  # type: ignore[arg-type]
    names = sorted({e.a for e in edges} | {e.b for e in edges} | {kme_id})
    net = network.Network.build("kmes", 2, [network.Site(name=n) for n in names], edges)
    linked = {other for other, _ in net.neighbours(kme_id)}
    table = {}
    for dest in names:
        if dest == kme_id or dest in linked:
            continue
        try:
            table[dest] = net.route(kme_id, dest)[1]
        except network.ConfigError:
            continue  # unreachable: no route, and enc_keys says so
    return table


# -- the payload ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RelayPayload:
    """What one relay carries: the keys, their key_IDs and who they are for. ``size`` in bits."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    size: int
    key_IDs: tuple[str, ...]
    material: bytes = field(repr=False)
    hops: int = 0

    _IDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")

    def __post_init__(self) -> None:
        for name in self._IDS:
            if not is_id(getattr(self, name)):
                raise LocalError(f"{name} must be 1-64 characters of [A-Za-z0-9._-]")
        if not isinstance(self.size, int) or self.size % 8 or not 8 <= self.size <= MAX_KEY_BITS:
            raise LocalError(f"size must be a multiple of 8 in [8, {MAX_KEY_BITS}]")
        ids = tuple(canonical_key_id(k) for k in self.key_IDs)
        if not ids or len(set(ids)) != len(ids):
            raise LocalError("key_IDs must be distinct UUIDs, at least one")
        object.__setattr__(self, "key_IDs", ids)
        if not isinstance(self.material, bytes) or len(self.material) != len(ids) * (self.size // 8):
            raise LocalError("material must hold size bits for every key_ID")
        if not isinstance(self.hops, int) or not 0 <= self.hops < MAX_HOPS:
            raise LocalError(f"hops must be in [0, {MAX_HOPS})")
        if self.encoded_size(self.size, len(ids), *self._id_values()) > MAX_RELAY_BYTES:
            raise LocalError(f"a relay payload holds at most {MAX_RELAY_BYTES} bytes")

    def __repr__(self) -> str:
        return (f"RelayPayload({self.source_KME_ID} → {self.target_KME_ID}, {self.master_SAE_ID} → "
                f"{self.slave_SAE_ID}, {len(self.key_IDs)} × {self.size} bits, hops={self.hops})")

    def _id_values(self) -> tuple[str, str, str, str]:
        return self.source_KME_ID, self.target_KME_ID, self.master_SAE_ID, self.slave_SAE_ID

    @staticmethod
    def encoded_size(size: int, count: int, *ids: str) -> int:
        """Bytes of the payload of ``count`` keys of ``size`` bits between these four IDs."""
        return _HEAD.size + sum(1 + len(i) for i in ids) + count * (16 + size // 8)

    def etsi_keys(self) -> list[Key]:
        """The keys as ETSI Key objects, in key_ID order."""
        n = self.size // 8
        return [Key(key_ID=kid, key=self.material[i * n : (i + 1) * n]) for i, kid in enumerate(self.key_IDs)]

    def forwarded(self) -> RelayPayload:
        """The payload as the next hop receives it (one more link crossed)."""
        if self.hops + 1 >= MAX_HOPS:
            raise RelayError(f"relay would cross more than {MAX_HOPS} links (a routing loop?)")
        return RelayPayload(**{name: getattr(self, name) for name in self._IDS}, size=self.size,
                            key_IDs=self.key_IDs, material=self.material, hops=self.hops + 1)

    def encode(self) -> bytes:
        parts = [_HEAD.pack(_MAGIC, _VERSION, self.hops, len(self.key_IDs), self.size // 8)]
        for value in self._id_values():
            raw = value.encode("ascii")
            parts.append(bytes([len(raw)]) + raw)
        parts += [uuid.UUID(k).bytes for k in self.key_IDs]
        parts.append(self.material)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> RelayPayload:
        """Parse strictly; anything wrong raises :class:`RelayError` and nothing else."""
        try:
            mv = memoryview(data).cast("B")
            if len(mv) > MAX_RELAY_BYTES or len(mv) < _HEAD.size:
                raise RelayError("malformed relay payload")
            magic, version, hops, count, size = _HEAD.unpack_from(mv)
            if magic != _MAGIC or version != _VERSION or not 1 <= size <= _KEY_BYTES or count < 1:
                raise RelayError("malformed relay payload")
            pos, ids = _HEAD.size, []
            for _ in cls._IDS:
                n = mv[pos]
                ids.append(bytes(mv[pos + 1 : pos + 1 + n]).decode("ascii"))
                pos += 1 + n
            if len(mv) != pos + count * (16 + size):
                raise RelayError("malformed relay payload")
            key_ids = tuple(str(uuid.UUID(bytes=bytes(mv[pos + 16 * i : pos + 16 * (i + 1)])))
                            for i in range(count))
            material = bytes(mv[pos + 16 * count :])
            return cls(**dict(zip(cls._IDS, ids, strict=True)), size=8 * size, key_IDs=key_ids,
                       material=material, hops=hops)
        except RelayError:
            raise
        except (LocalError, ValueError, TypeError, IndexError, struct.error):
            # LocalError is a ValueError; both mean the bytes were not a payload.
            raise RelayError("malformed relay payload") from None


# -- one hop: seal with the outbound link's key, open with the inbound one's ------------------


def seal_for_link(payload: bytes, pool: LinkPool, now: float) -> bytes:
    """An envelope of ``payload`` under fresh key of ``pool`` (the master end toward the next hop).

    Spends exactly ``32 + len(payload)`` bytes of the link's key, as whole pool
    keys of at most 1 MiB. All or nothing: :class:`~qkd_sim.pool.PoolEmpty`
    when the pool holds less, and nothing is taken.
    """
    need = otp.OTK_SIZE + len(payload)
    avail = pool.available_bits(now)
    if 8 * need > avail:
        raise PoolEmpty(
            f"not enough key on link {pool.name}: {8 * need} bits requested, {int(avail)} available",
            requested_bits=8 * need, available_bits=avail,
        )
    master, slave = pair_names(pool.master_kme, pool.slave_kme)
    full, rest = divmod(need, _KEY_BYTES)
    taken = pool.take(full, MAX_KEY_BITS, now, master_sae=master, slave_sae=slave) if full else []
    if rest:
        taken += pool.take(1, 8 * rest, now, master_sae=master, slave_sae=slave)
    stream = otp.KeyStream(otp.QKDKey(kid, key) for kid, key in taken)
    try:
        return otp.seal(payload, stream)
    finally:
        stream.wipe()


def open_from_link(envelope: bytes | bytearray | memoryview, pool: LinkPool, now: float) -> bytes:
    """The payload of an envelope sealed by :func:`seal_for_link` with the other end of ``pool``.

    ``pool`` is the slave end of the direction from the sending KME. The key
    ranges named are spent whatever the outcome (one try per one-time key); the
    tag is checked before anything is decrypted. Every failure is one opaque
    :class:`~qstore.errors.SealError` ("relay envelope rejected").
    """
    refs = otp.parse_envelope_refs(envelope, max_length=MAX_RELAY_BYTES)
    ids = []
    for ref in refs:
        decoded = pool.codec.decode(ref.key_id)
        # The sender uses whole keys, so the keys named add up to the envelope's own length.
        if decoded is None or ref.offset != 0 or decoded[1] != ref.length:
            raise SealError(_REJECTED)
        ids.append(ref.key_id)
    master, slave = pair_names(pool.master_kme, pool.slave_kme)
    try:
        material = pool.lookup(ids, now, master_sae=master, slave_sae=slave)
    except (KeyIDRejected, KeyIDNotYours, PoolEmpty):
        raise SealError(_REJECTED) from None
    stream = otp.KeyStream(otp.QKDKey(kid, key) for kid, key in zip(ids, material, strict=True))
    try:
        return otp.open_(envelope, stream, max_length=MAX_RELAY_BYTES)
    except (SealError, KeyMaterialError):
        raise SealError(_REJECTED) from None
    finally:
        stream.wipe()


# -- the destination's store ----------------------------------------------------------------


class _Stored:
    __slots__ = ("master", "material", "slave")

    def __init__(self, master: str, slave: str, material: bytes) -> None:
        self.master = master
        self.slave = slave
        self.material = bytearray(material)


class RelayStore:
    """Keys relayed to this KME, waiting for their slave SAE; each is handed out once.

    Holds at most ``capacity_bits``; when a new relay does not fit, the oldest
    keys expire (they are then unknown, 400, like retrieved ones). Not thread-safe.
    """

    def __init__(self, capacity_bits: float) -> None:
        if not capacity_bits > 0:
            raise LocalError("capacity_bits must be > 0")
        self.capacity_bits = float(capacity_bits)
        self._keys: dict[str, _Stored] = {}
        self._pairs: Counter[tuple[str, str]] = Counter()
        self._bits = 0

    def __repr__(self) -> str:
        return f"RelayStore(keys={len(self._keys)}, bits={self._bits})"

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def stored_bits(self) -> int:
        return self._bits

    def count(self, master_sae: str, slave_sae: str) -> int:
        """Keys waiting for one SAE pair."""
        return self._pairs[master_sae, slave_sae]

    def put(self, payload: RelayPayload) -> None:
        """Store a relay's keys (all or nothing; a key_ID already held is a RelayError)."""
        bits = len(payload.key_IDs) * payload.size
        if bits > self.capacity_bits:
            raise RelayError("relay larger than the relay store")
        if any(kid in self._keys for kid in payload.key_IDs):
            raise RelayError("relay repeats a key_ID already stored")
        while self._bits + bits > self.capacity_bits:
            self._drop(next(iter(self._keys)))
        pair = (payload.master_SAE_ID, payload.slave_SAE_ID)
        for key in payload.etsi_keys():
            self._keys[key.key_ID] = _Stored(*pair, key.key)
        self._pairs[pair] += len(payload.key_IDs)
        self._bits += bits

    def take(self, key_ids: Sequence[str], *, master_sae: str, slave_sae: str) -> list[bytes]:
        """The keys named, in order, deleted here. All checked first: 400 unknown, 401 another pair's."""
        seen = set()
        for kid in key_ids:
            entry = self._keys.get(kid)
            if entry is None:
                raise KeyIDRejected(f"key_ID {kid} is unknown here or was already retrieved", kid)
            if (entry.master, entry.slave) != (master_sae, slave_sae):
                raise KeyIDNotYours()
            if kid in seen:
                raise KeyIDRejected(f"key_ID {kid} is named twice", kid)
            seen.add(kid)
        out = [bytes(self._keys[kid].material) for kid in key_ids]
        for kid in key_ids:
            self._drop(kid)
        return out

    def _drop(self, key_id: str) -> None:
        entry = self._keys.pop(key_id)
        self._pairs[entry.master, entry.slave] -= 1
        self._bits -= 8 * len(entry.material)
        otp._zero(entry.material)


# -- a relaying KME -------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class RelayStep(Generic[T]):
    """One envelope to POST to ``next_KME_ID``'s relay endpoint, and what follows its answer.

    The shell sends :attr:`envelope` and calls :meth:`finish` with the answer
    (or :meth:`unreachable`); either returns :attr:`result` (the keys, at the
    origin; the acknowledgement, at an intermediate) or raises
    :class:`RelayFailed` naming the hop that failed.
    """

    source_KME_ID: str
    target_KME_ID: str
    from_KME_ID: str
    next_KME_ID: str
    envelope: bytes = field(repr=False)
    result: T = field(repr=False)

    def _failed(self, reason: str) -> RelayFailed:
        return RelayFailed.at(source=self.source_KME_ID, target=self.target_KME_ID,
                              hop_from=self.from_KME_ID, hop_to=self.next_KME_ID, reason=reason)

    def finish(self, status: int, body: bytes, *, answered_by: str | None) -> T:
        """The result when the next hop (as its TLS certificate names it) answered 200."""
        if answered_by != self.next_KME_ID:
            raise self._failed(f"answered by {answered_by or 'an unidentified peer'}, not {self.next_KME_ID}")
        if status == 200:
            return self.result
        try:
            error = ErrorBody.from_json(body)
        except EtsiError:
            raise self._failed(f"{self.next_KME_ID} answered {status}") from None
        message = error.message[:_SHOWN]
        hop = error.details[0] if error.details else {}
        hop_from, hop_to = hop.get("hop_from_KME_ID"), hop.get("hop_to_KME_ID")
        if status == 503 and is_id(hop_from) and is_id(hop_to):  # a later hop failed: pass it on
            raise RelayFailed(message, source=self.source_KME_ID, target=self.target_KME_ID,
                              hop_from=hop_from, hop_to=hop_to)  # type: ignore[arg-type]
        raise self._failed(f"{self.next_KME_ID} answered {status}: {message}")

    def unreachable(self, reason: str) -> T:
        """The next hop could not be asked (no address, connection error, timeout): always raises."""
        raise self._failed(reason)


class RelayKME:
    """A KME with trusted-node relay: the ETSI methods, over direct links or hop by hop.

    Pairs whose KMEs share a link (or a KME) are served by ``core``
    unchanged; a slave SAE whose KME is in ``routes`` (destination KME → next
    hop KME, a linked peer) gets keys relayed as the module docstring says.
    ``rng`` makes keys and key_IDs (``os.urandom``; tests may inject one).
    Synchronous and complete per call, like :class:`~qkd_sim.etsi014.KMECore`.

    Get status for a relayed pair: ``target_KME_ID`` is the slave's KME;
    ``stored_key_count`` and ``max_key_count`` count keys of ``key_size`` the
    first hop's pool could carry now and when full (each key costs its size
    plus 16 bytes of key_ID, each relay 32 bytes of MAC key and the header;
    later hops are not seen from here, so this is an upper bound);
    ``max_key_per_request`` and ``max_key_size`` are bounded by one relay
    payload (:data:`MAX_RELAY_BYTES`); ``status_extension`` names the route's
    next hop: ``{"relay": {"next_hop_KME_ID": ..., "max_relay_bytes": ...}}``.
    """

    def __init__(self, core: KMECore, *, routes: Mapping[str, str] = MappingProxyType({}),
                 rng: Callable[[int], bytes] = os.urandom):
        self.core = core
        self.kme_id = core.kme_id
        table = dict(routes)
        for dest, hop in table.items():
            if not (is_id(dest) and is_id(hop)):
                raise LocalError("routes map KME IDs to KME IDs")
            if dest == self.kme_id or core.linked(dest):
                raise LocalError(f"route to {dest}: KME {self.kme_id} is linked to it (a link is used)")
            if hop not in core.peers:
                raise LocalError(f"route to {dest} via {hop}: KME {self.kme_id} has no QKD link to {hop}")
        self.routes: Mapping[str, str] = MappingProxyType(table)
        self._rng = rng
        lim = core.limits
        self.store = RelayStore(max(lim.max_key_count * lim.key_size, 4 * 8 * MAX_RELAY_BYTES))
        self._spent: Counter[str] = Counter()
        self._received: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"RelayKME({self.kme_id}, routes={dict(self.routes)}, store={self.store!r})"

    @property
    def spent_bits(self) -> Mapping[str, int]:
        """Link key bits this KME spent sending relays, per next-hop KME (MAC key included)."""
        return MappingProxyType(self._spent)

    @property
    def received_bits(self) -> Mapping[str, int]:
        """Link key bits spent opening relays, per previous-hop KME (also for rejected envelopes)."""
        return MappingProxyType(self._received)

    def relayed(self, kme: str) -> bool:
        """Whether keys for SAEs at ``kme`` travel through other KMEs."""
        return kme in self.routes

    def authorize_kme(self, kme: str | None) -> str:
        """The calling KME if it shares a QKD link with this one, else :class:`Unauthorized`."""
        if kme is None or kme not in self.core.peers:
            raise Unauthorized()
        return kme

    # -- the ETSI methods ---------------------------------------------------------

    def status(self, caller: str | None, slave_SAE_ID: str, now: float) -> Status:
        """Get status (see the class docstring for a relayed pair)."""
        master = self.core.authorize(caller)
        target = self.core.kme_of(slave_SAE_ID, "slave_SAE_ID")
        if not self.relayed(target):
            return self.core.status(master, slave_SAE_ID, now)
        hop = self.routes[target]
        pool = self.core.outbound(hop)
        lim = self.core.limits
        overhead = RelayPayload.encoded_size(8, 0, self.kme_id, target, master, slave_SAE_ID)
        per_key = 16 + lim.key_size // 8

        def keys_in(bits: float) -> int:
            if not math.isfinite(bits):
                return lim.max_key_count
            return max(0, min(lim.max_key_count, int((bits // 8 - otp.OTK_SIZE - overhead) // per_key)))

        room = MAX_RELAY_BYTES - overhead
        return Status(
            source_KME_ID=self.kme_id, target_KME_ID=target, master_SAE_ID=master,
            slave_SAE_ID=slave_SAE_ID, key_size=lim.key_size,
            stored_key_count=keys_in(pool.available_bits(now)), max_key_count=keys_in(pool.capacity_bits),
            max_key_per_request=max(1, min(lim.max_key_per_request, room // per_key)),
            max_key_size=min(lim.max_key_size, 8 * (room - 16)), min_key_size=lim.min_key_size,
            max_SAE_ID_count=self.core.max_SAE_ID_count,
            status_extension={"relay": {"next_hop_KME_ID": hop, "max_relay_bytes": MAX_RELAY_BYTES}},
        )

    def enc_keys(self, caller: str | None, slave_SAE_ID: str, request: KeyRequest,
                 now: float) -> KeyContainer | RelayStep[KeyContainer]:
        """Get key: the keys (direct link), or the first hop of their relay (keys once it succeeds)."""
        master = self.core.authorize(caller)
        target = self.core.kme_of(slave_SAE_ID, "slave_SAE_ID")
        if not self.relayed(target):
            return self.core.enc_keys(master, slave_SAE_ID, request, now)
        size = self.core.check_request(master, slave_SAE_ID, request)
        length = RelayPayload.encoded_size(size, request.number, self.kme_id, target, master, slave_SAE_ID)
        if length > MAX_RELAY_BYTES:
            raise EtsiError(f"a relayed request carries at most {MAX_RELAY_BYTES} bytes of keys and key_IDs",
                            [{"requested_bytes": length, "max_relay_bytes": MAX_RELAY_BYTES}])
        hop = self.routes[target]
        pool = self.core.outbound(hop)
        if 8 * (otp.OTK_SIZE + length) > pool.capacity_bits:
            raise EtsiError(f"request exceeds the key pool of link {pool.name}, the first hop of its relay",
                            [{"requested_bits": 8 * (otp.OTK_SIZE + length),
                              "capacity_bits": int(pool.capacity_bits)}])
        key_ids = tuple(str(uuid.UUID(bytes=self._rng(16), version=4)) for _ in range(request.number))
        material = self._rng(request.number * size // 8)
        payload = RelayPayload(source_KME_ID=self.kme_id, target_KME_ID=target, master_SAE_ID=master,
                               slave_SAE_ID=slave_SAE_ID, size=size, key_IDs=key_ids, material=material)
        return self._send(payload, hop, now, KeyContainer(keys=tuple(payload.etsi_keys())))

    def dec_keys(self, caller: str | None, master_SAE_ID: str, request: KeyIDs, now: float) -> KeyContainer:
        """Get key with key IDs: from the link pool, or from the relay store for a relayed pair."""
        slave = self.core.authorize(caller)
        source = self.core.kme_of(master_SAE_ID, "master_SAE_ID")
        if self.core.linked(source):
            return self.core.dec_keys(slave, master_SAE_ID, request, now)
        ids = self.core.check_key_ids(request)
        try:
            keys = self.store.take(ids, master_sae=master_SAE_ID, slave_sae=slave)
        except KeyIDNotYours:
            raise Unauthorized() from None
        return KeyContainer(keys=tuple(Key(key_ID=kid, key=key) for kid, key in zip(ids, keys, strict=True)))

    # -- the relay endpoint ---------------------------------------------------------

    def receive(
        self, caller_kme: str | None, envelope: bytes, now: float
    ) -> JSONObject | RelayStep[JSONObject]:
        """A relay envelope from a neighbour KME: stored here (acknowledgement) or the next hop to send."""
        peer = self.authorize_kme(caller_kme)
        pool = self.core.inbound(peer)
        before = pool.retrieved_bits
        try:
            plain = open_from_link(envelope, pool, now)
        finally:
            self._received[peer] += pool.retrieved_bits - before
        payload = RelayPayload.decode(plain)
        target = payload.target_KME_ID
        ack = {"target_KME_ID": target, "key_count": len(payload.key_IDs)}
        if target == self.kme_id:
            self._deliver(payload)
            return ack
        if payload.source_KME_ID == self.kme_id:
            raise RelayError("relay came back to its origin (a routing loop)")
        hop = target if self.core.linked(target) else self.routes.get(target)
        if hop is None:
            raise RelayFailed.at(source=payload.source_KME_ID, target=target, hop_from=self.kme_id,
                                 hop_to=target, reason=f"KME {self.kme_id} has no route to {target}")
        if hop == peer:
            raise RelayError(f"relay to {target} would go back to {peer} (a routing loop)")
        return self._send(payload.forwarded(), hop, now, ack)

    def _deliver(self, payload: RelayPayload) -> None:
        if payload.slave_SAE_ID not in self.core.saes:
            raise RelayError(f"slave SAE {payload.slave_SAE_ID} is not attached to KME {self.kme_id}")
        master, source = payload.master_SAE_ID, payload.source_KME_ID
        if source == self.kme_id or self.core.directory.get(master) != source:
            raise RelayError(f"master SAE {master} is not attached to KME {source}")
        self.store.put(payload)

    def _send(self, payload: RelayPayload, hop: str, now: float, result: T) -> RelayStep[T]:
        data = payload.encode()
        try:
            envelope = seal_for_link(data, self.core.outbound(hop), now)
        except PoolEmpty as exc:
            raise RelayFailed.at(source=payload.source_KME_ID, target=payload.target_KME_ID,
                                 hop_from=self.kme_id, hop_to=hop, reason=str(exc)) from None
        self._spent[hop] += 8 * (otp.OTK_SIZE + len(data))
        return RelayStep(payload.source_KME_ID, payload.target_KME_ID, self.kme_id, hop, envelope, result)
