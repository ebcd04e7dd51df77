"""The key material a QKD link delivers to both of its ends (sans-IO).

Simulation choice
-----------------
A real link leaves both KMEs with identical secret bits after sifting, error
correction and privacy amplification. We stand in for that with a secret
``seed`` per link, shared by its two KMEs through their config. Each direction
of a link (KME A → KME B, the keys A hands to its master SAEs for slaves at
B, and B → A) is its own *key stream*: byte ``p`` of the stream is byte ``p``
of AES-256-CTR under a key derived by HKDF-SHA256 from the seed and the
direction, with the 128-bit counter starting at 0. Both ends therefore compute
the same bytes for any position without talking, and the two directions never
share a key.

A key is a contiguous byte range ``[start, start + size)`` of its direction's
stream. The master end allocates ranges in stream order from a cursor, so no
range is handed out twice; key sizes may differ from request to request (1
byte to 1 MiB).

key_ID scheme
-------------
ETSI GS QKD 014 ``dec_keys`` carries only key_IDs, and the simulated KMEs do
not talk to each other, so the key_ID itself tells the slave KME which range
it names, and which SAE pair it belongs to, without letting an SAE forge one.
The 122 free bits of a version-4 UUID are a pseudorandom permutation (a
6-round Feistel network with HMAC-SHA256 round functions, keyed per link and
direction) of::

    start      54 bits   first byte of the range in the stream (up to 16 PiB)
    size - 1   20 bits   key length in bytes, 1 .. 2^20 (1 MiB = 8388608 bits)
    zero       16 bits   must decrypt to 0: random or altered IDs are refused (400)
    pair tag   32 bits   HMAC(master_SAE_ID, slave_SAE_ID): a key_ID works only for
                         the SAE pair it was made for (anyone else gets 401)

Because the version and variant bits are fixed, every key_ID is a valid
random-looking (v4) UUID; the 122 others are indistinguishable from random to
anyone without the seed.

Limitations (documented, deliberate):

* The slave end cannot know what the master end actually handed out. It
  serves any well-formed range that is already generated (by the bound below)
  and not yet retrieved at this end, and marks it retrieved. So security rests
  on key_IDs being unforgeable: a guessed ID passes the checks for the
  guesser's own SAE pair with probability 2^-48 per try (each failure is
  answered 400 or 401, and nothing limits the rate of tries), and would then
  name an arbitrary range of the stream, possibly one handed to another pair.
  The range is retrieved (burnt) at that end, so the real slave would then be
  refused it.
* "Generated" at the slave end is an upper bound, ``initial_bits + rate *
  (now - epoch)``: the master's pool may have been full and paused, which the
  slave cannot see. Both ends must use the same ``epoch`` on comparable
  clocks; a range beyond the bound is "not yet available here" (503), as when
  a key is still in transit.
* The slave end keeps at most ``capacity_bits`` of key waiting: a key more
  than ``capacity_bits`` behind the furthest key retrieved there has expired
  (400). Retrieved ranges are kept as merged intervals, so memory grows only
  with out-of-order retrievals inside that window.
* A stream ends after 2^54 bytes (16 PiB); an exhausted stream answers 503.

Life of a key range, per end (``KeyState``)::

    end     state        event           next state / answer
    master  PENDING      clock advances  STORED
    master  STORED       take()          DELIVERED (key bytes to the master SAE)
    slave   PENDING      lookup()        503, unchanged
    slave   STORED       lookup()        DELIVERED (key bytes to the slave SAE)
    slave   DELIVERED    lookup()        400, unchanged
    slave   STORED       window moves    EXPIRED
    slave   EXPIRED      lookup()        400, unchanged

Hazmat layer: pools hand out raw key material. The KME (:mod:`qkd_sim.etsi014`)
is the recipe built on them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qstore.b64 import writable_bytes
from qstore.errors import KeyShortage, LocalError, RemoteError
from qstore.otp import _Intervals
from qstore.rng import AesCtrRandom

MAX_KEY_BITS = 8 * 2**20
"""Largest key a pool hands out: 1 MiB."""
MAX_STREAM_BYTES = 2**54
"""A direction's stream ends here (the width of the key_ID's start field)."""
DEFAULT_CAPACITY_BITS = float(2**33)
"""Pool size at each end when the config does not say: 1 GiB."""

_ROUNDS = 6
_HALF = 61
_HALF_MASK = (1 << _HALF) - 1
_START_SHIFT, _SIZE_SHIFT, _ZERO_SHIFT = 68, 48, 32
_UUID_FORM = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SALT = b"qkd_sim.pool v1"
_RUN_BYTES = 1 << 18
"""Adjacent small keys up to this many bytes in all come from one keystream call."""
_SMALL_KEY = 1 << 14
"""Keys from this size on are generated one by one, in place."""
_IPAD = bytes(x ^ 0x36 for x in range(256))  # HMAC key pads, as translate tables
_OPAD = bytes(x ^ 0x5C for x in range(256))


class PoolEmpty(KeyShortage):
    """The pool cannot serve the whole request now (ETSI: 503); nothing was taken."""

    status = 503

    def __init__(self, message: str, *, requested_bits: int, available_bits: float):
        self.requested_bits = requested_bits
        self.available_bits = available_bits
        super().__init__(message)

    @property
    def details(self) -> tuple[dict[str, object], ...]:
        avail = self.available_bits
        return ({"requested_bits": self.requested_bits,
                 "available_bits": int(avail) if math.isfinite(avail) else None},)


class KeyIDRejected(RemoteError):
    """A key_ID that is malformed, unknown, already retrieved or expired (ETSI: 400)."""

    status = 400

    def __init__(self, message: str, key_id: str):
        self.key_id = key_id
        super().__init__(message)

    @property
    def details(self) -> tuple[dict[str, object], ...]:
        return ({"key_ID": self.key_id},)


class KeyIDNotYours(RemoteError):
    """A valid key_ID made for another SAE pair (ETSI: 401). Says nothing more."""

    status = 401

    def __init__(self) -> None:
        super().__init__("unauthorized")


class KeyState(enum.Enum):
    """Where a key range is in its life at one end (see the module table)."""

    PENDING = "pending"  # not generated yet (as far as this end knows)
    STORED = "stored"  # generated, waiting to be delivered at this end
    DELIVERED = "delivered"  # handed to this end's SAE, deleted here
    EXPIRED = "expired"  # dropped undelivered (slave end only)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise LocalError(f"{name} must be a non-empty string without NUL")
    return value


def _hkdf(seed: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(seed)


class _HmacSha256:
    """HMAC-SHA256 under one key, with the padded key blocks hashed once (RFC 2104).

    Same digests as ``hmac.digest(key, msg, "sha256")``; each call then costs
    two copies of a hash state instead of a fresh key setup (key_IDs take
    several HMACs each, for every key served).
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\x00")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class KeyIDCodec:
    """key_IDs as an encrypted (start, size, SAE-pair tag): see the module docstring."""

    __slots__ = ("_id_mac", "_tag_mac")

    def __init__(self, id_key: bytes, tag_key: bytes):
        self._id_mac = _HmacSha256(id_key)
        self._tag_mac = _HmacSha256(tag_key)

    def __repr__(self) -> str:
        return "KeyIDCodec(<keys hidden>)"

    def tag(self, master_sae: str, slave_sae: str) -> int:
        """32-bit tag binding a key_ID to one (master, slave) SAE pair."""
        msg = master_sae.encode() + b"\x00" + slave_sae.encode()
        return int.from_bytes(self._tag_mac.digest(msg)[:4], "big")

    def _round(self, i: int, half: int) -> int:
        digest = self._id_mac.digest(bytes((i,)) + half.to_bytes(8, "big"))
        return int.from_bytes(digest[:8], "big") & _HALF_MASK

    def encode(self, start: int, size_bytes: int, tag: int) -> str:
        """The key_ID (lowercase 8-4-4-4-12 UUID) naming ``size_bytes`` bytes at ``start``."""
        if not (0 <= start < MAX_STREAM_BYTES and 1 <= size_bytes <= MAX_KEY_BITS // 8 and 0 <= tag < 2**32):
            raise LocalError("key range out of the key_ID's bounds")
        plain = (start << _START_SHIFT) | ((size_bytes - 1) << _SIZE_SHIFT) | tag
        left, right = plain >> _HALF, plain & _HALF_MASK
        for i in range(_ROUNDS):
            left, right = right, left ^ self._round(i, right)
        c = (left << _HALF) | right
        u = (c >> 74) << 80 | 4 << 76 | ((c >> 62) & 0xFFF) << 64 | 2 << 62 | (c & ((1 << 62) - 1))
        h = f"{u:032x}"  # str(uuid.UUID(int=u)), without building the UUID object
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def decode(self, key_id: object) -> tuple[int, int, int] | None:
        """(start, size_bytes, tag) of a key_ID this codec made, else None."""
        if not isinstance(key_id, str) or not _UUID_FORM.fullmatch(key_id):
            return None
        u = int(key_id.replace("-", ""), 16)
        if (u >> 76) & 0xF != 4 or (u >> 62) & 0b11 != 0b10:
            return None
        c = (u >> 80) << 74 | ((u >> 64) & 0xFFF) << 62 | (u & ((1 << 62) - 1))
        left, right = c >> _HALF, c & _HALF_MASK
        for i in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(i, left), left
        plain = (left << _HALF) | right
        if (plain >> _ZERO_SHIFT) & 0xFFFF:
            return None
        start = plain >> _START_SHIFT
        size = ((plain >> _SIZE_SHIFT) & 0xFFFFF) + 1
        if start + size > MAX_STREAM_BYTES:
            return None
        return start, size, plain & 0xFFFFFFFF


def _check_link(seed: object, rate_bps: object, capacity_bits: object, initial_bits: object,
                epoch: object) -> None:
    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)

    if not isinstance(seed, bytes) or len(seed) < 16:
        raise LocalError("a link seed must be at least 16 bytes")
    if not (number(rate_bps) and rate_bps >= 0):  # type: ignore[operator]
        raise LocalError("rate_bps must be >= 0 (math.inf for unlimited)")
    if not (number(capacity_bits) and capacity_bits > 0):  # type: ignore[operator]
        raise LocalError("capacity_bits must be > 0")
    if not (number(initial_bits) and initial_bits >= 0):  # type: ignore[operator]
        raise LocalError("initial_bits must be >= 0")
    if not (number(epoch) and math.isfinite(epoch)):  # type: ignore[arg-type]
        raise LocalError("epoch must be a finite time")


def direction_label(master_kme: str, slave_kme: str) -> bytes:
    """The bytes that name one direction of a link in every derivation."""
    master = _check_id("master KME ID", master_kme).encode()
    return master + b"\x00" + _check_id("slave KME ID", slave_kme).encode()


class LinkPool:
    """One end's view of one direction of a QKD link.

    The master end (:meth:`take`) fills at ``rate_bps`` up to ``capacity_bits``
    on the caller's clock (``now`` in seconds; ``rate_bps = math.inf`` keeps it
    full) and hands out ranges in stream order. The slave end (:meth:`lookup`)
    serves the ranges named by key_IDs, each at most once. A KME holds the
    master end of its outbound direction and the slave end of the inbound one;
    one object can also serve both ends (a KME's local pool). Not thread-safe.
    """

    def __init__(
        self,
        *,
        seed: bytes,
        master_kme: str,
        slave_kme: str,
        rate_bps: float = math.inf,
        capacity_bits: float = DEFAULT_CAPACITY_BITS,
        initial_bits: float = 0.0,
        epoch: float = 0.0,
    ):
        _check_link(seed, rate_bps, capacity_bits, initial_bits, epoch)
        self.master_kme = master_kme
        self.slave_kme = slave_kme
        label = direction_label(master_kme, slave_kme)
        self.rate_bps = float(rate_bps)
        self.capacity_bits = float(capacity_bits)
        self.initial_bits = float(min(initial_bits, capacity_bits))
        self.epoch = float(epoch)
        self._stream_key = _hkdf(seed, b"stream\x00" + label)
        self._keystream = AesCtrRandom(self._stream_key)  # the same stream, by our VAES kernel where it runs
        self.codec = KeyIDCodec(_hkdf(seed, b"key_ID\x00" + label), _hkdf(seed, b"pair tag\x00" + label))
        # master end
        self._level = self.initial_bits
        self._last = self.epoch
        self._cursor = 0
        # slave end
        self._retrieved = _Intervals()
        self._floor = 0
        self._furthest = 0
        self._served = 0

    def __repr__(self) -> str:
        return f"LinkPool({self.master_kme} → {self.slave_kme}, rate={self.rate_bps}, cursor={self._cursor})"

    @property
    def name(self) -> str:
        """``master KME → slave KME``, for messages."""
        return f"{self.master_kme} → {self.slave_kme}"

    # -- the key stream -------------------------------------------------------

    def _fill(self, out: memoryview, start: int) -> None:
        """Write stream bytes ``start .. start + len(out)`` into ``out``."""
        skip = start % 16
        if skip:  # the first, partial block: OpenSSL's CTR from the block holding ``start``
            iv = (start // 16).to_bytes(16, "big")
            enc = Cipher(algorithms.AES(self._stream_key), modes.CTR(iv)).encryptor()
            head = min(len(out), 16 - skip)
            out[:head] = enc.update(bytes(skip + head))[skip:]
            out, start = out[head:], start + head
        if len(out):
            self._keystream.fill(out, start)

    def _material(self, start: int, length: int) -> bytes:
        """The stream bytes of one key, written straight into the bytes object handed out."""
        if length < 2:  # writable_bytes cannot make these
            one = bytearray(length)
            with memoryview(one) as view:
                self._fill(view, start)
            return bytes(one)
        key, view = writable_bytes(length)
        with view:
            self._fill(view, start)
        return key

    def _materials(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (start, size) range.

        Large keys are generated in place (:meth:`_material`); runs of adjacent
        small ones share one keystream call, which they are sliced from.
        """
        out: list[bytes] = []
        i, n = 0, len(ranges)
        while i < n:
            first = ranges[i][0]
            end = first + ranges[i][1]
            j = i + 1
            if ranges[i][1] < _SMALL_KEY:
                while (j < n and ranges[j][0] == end and ranges[j][1] < _SMALL_KEY
                       and end + ranges[j][1] - first <= _RUN_BYTES):
                    end += ranges[j][1]
                    j += 1
            if j == i + 1:
                out.append(self._material(first, end - first))
            else:
                block, skip = divmod(first, 16)
                iv = block.to_bytes(16, "big")
                run = Cipher(algorithms.AES(self._stream_key), modes.CTR(iv)).encryptor().update(
                    bytes(skip + end - first))
                out.extend(run[skip + at - first : skip + at - first + size] for at, size in ranges[i:j])
            i = j
        return out

    # -- master end -----------------------------------------------------------

    def _refill(self, now: float) -> None:
        if math.isinf(self.rate_bps):
            self._level = self.capacity_bits  # unlimited: always full, whatever the clock says
        elif now > self._last:
            self._level = min(self.capacity_bits, self._level + self.rate_bps * (now - self._last))
            self._last = now

    def available_bits(self, now: float) -> float:
        """Key bits stored at the master end and not yet handed out."""
        self._refill(now)
        return min(self._level, 8.0 * (MAX_STREAM_BYTES - self._cursor))

    @property
    def delivered_bits(self) -> int:
        """Bits handed out by the master end so far."""
        return 8 * self._cursor

    def take(
        self, count: int, size_bits: int, now: float, *, master_sae: str, slave_sae: str
    ) -> list[tuple[str, bytes]]:
        """Master end: ``count`` fresh keys of ``size_bits`` each, as (key_ID, key bytes).

        All or nothing: raises :class:`PoolEmpty` (503) and takes nothing when
        the pool holds fewer than ``count * size_bits`` bits.
        """
        if not _is_int(count) or count < 1:
            raise LocalError("count must be a positive integer")
        if not _is_int(size_bits) or size_bits % 8 or not 8 <= size_bits <= MAX_KEY_BITS:
            raise LocalError(f"size_bits must be a multiple of 8 in [8, {MAX_KEY_BITS}]")
        tag = self.codec.tag(_check_id("master SAE ID", master_sae), _check_id("slave SAE ID", slave_sae))
        need = count * size_bits
        avail = self.available_bits(now)
        if need > avail:
            raise PoolEmpty(
                f"not enough key on link {self.name}: {need} bits requested, {int(avail)} available",
                requested_bits=need, available_bits=avail,
            )
        size = size_bits // 8
        start = self._cursor
        ranges = [(start + i * size, size) for i in range(count)]
        materials = self._materials(ranges)
        encode = self.codec.encode
        keys = [(encode(at, size, tag), key) for (at, _), key in zip(ranges, materials, strict=True)]
        self._cursor = start + count * size
        self._level -= need
        return keys

    # -- slave end ------------------------------------------------------------

    def generated_bound_bits(self, now: float) -> float:
        """Slave end: the most bits the master end can have generated by ``now``."""
        if math.isinf(self.rate_bps):
            return math.inf
        if now <= self.epoch:
            return self.initial_bits
        return self.initial_bits + self.rate_bps * (now - self.epoch)

    def state(self, start: int, size: int, now: float) -> KeyState:
        """Slave end: the state of the byte range ``[start, start + size)``."""
        end = start + size
        if start < self._floor:
            return KeyState.EXPIRED
        if self._retrieved.overlaps(start, end):
            return KeyState.DELIVERED
        if 8 * end > self.generated_bound_bits(now):
            return KeyState.PENDING
        return KeyState.STORED

    def lookup(
        self, key_ids: Sequence[str], now: float, *, master_sae: str, slave_sae: str
    ) -> list[bytes]:
        """Slave end: the keys named by ``key_ids``, in order; each is served once.

        All or nothing; every ID is checked before any is marked retrieved.
        Raises :class:`KeyIDRejected` (400) for a malformed, unknown, repeated,
        retrieved or expired ID, :class:`KeyIDNotYours` (401) for an ID made
        for another SAE pair, :class:`PoolEmpty` (503) for a range this end
        does not have yet.
        """
        tag = self.codec.tag(_check_id("master SAE ID", master_sae), _check_id("slave SAE ID", slave_sae))
        tag_bytes = tag.to_bytes(4, "big")
        ranges: list[tuple[int, int]] = []
        pending = _Intervals()
        for key_id in key_ids:
            shown = key_id if isinstance(key_id, str) and len(key_id) <= 64 else "?"
            decoded = self.codec.decode(key_id)
            if decoded is None:
                raise KeyIDRejected(f"unknown key_ID {shown}", shown)
            start, size, key_tag = decoded
            if not hmac.compare_digest(key_tag.to_bytes(4, "big"), tag_bytes):
                raise KeyIDNotYours()
            if pending.overlaps(start, start + size):
                raise KeyIDRejected(f"key_ID {shown} is named twice", shown)
            state = self.state(start, size, now)
            if state is KeyState.DELIVERED:
                raise KeyIDRejected(f"key_ID {shown} was already retrieved", shown)
            if state is KeyState.EXPIRED:
                raise KeyIDRejected(f"key_ID {shown} has expired", shown)
            if state is KeyState.PENDING:
                raise PoolEmpty(
                    f"key_ID {shown} is not yet available at this end of link {self.name}",
                    requested_bits=8 * size, available_bits=0.0,
                )
            pending.add(start, start + size)
            ranges.append((start, size))
        out = self._materials(ranges)
        for start, size in ranges:
            self._retrieved.add(start, start + size)
            self._furthest = max(self._furthest, start + size)
            self._served += size
        self._expire()
        return out

    @property
    def retrieved_bits(self) -> int:
        """Slave end: bits delivered so far."""
        return 8 * self._served

    def _expire(self) -> None:
        """Drop undelivered ranges more than ``capacity_bits`` behind the furthest delivered key."""
        if math.isinf(self.capacity_bits):
            return
        floor = self._furthest - int(self.capacity_bits // 8)
        if floor <= self._floor:
            return
        holes = []
        for s, e in self._retrieved.gaps(floor):
            if s >= floor:
                break
            holes.append((s, min(e, floor)))
        for s, e in holes:
            self._retrieved.add(s, e)
        self._floor = floor


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """One QKD link as a KME sees it: the peer KME and the pool parameters of both directions.

    ``initial_bits`` None means the link starts full (it has been running for a
    while). ``epoch`` is when generation began on the KMEs' clock; both ends of
    a link must be given the same one.
    """

    peer: str
    seed: bytes = field(repr=False)
    rate_bps: float = math.inf
    capacity_bits: float = DEFAULT_CAPACITY_BITS
    initial_bits: float | None = None
    epoch: float = 0.0

    def __post_init__(self) -> None:
        _check_id("peer KME ID", self.peer)
        initial = 0.0 if self.initial_bits is None else self.initial_bits
        _check_link(self.seed, self.rate_bps, self.capacity_bits, initial, self.epoch)

    def pools(self, kme_id: str) -> tuple[LinkPool, LinkPool]:
        """(outbound: this KME is master, inbound: the peer is master) for ``kme_id``."""
        initial = self.capacity_bits if self.initial_bits is None else self.initial_bits
        common = {"seed": self.seed, "rate_bps": self.rate_bps, "capacity_bits": self.capacity_bits,
                  "initial_bits": initial, "epoch": self.epoch}
        return (LinkPool(master_kme=kme_id, slave_kme=self.peer, **common),
                LinkPool(master_kme=self.peer, slave_kme=kme_id, **common))
