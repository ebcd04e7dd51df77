"""Sans-IO rounds of an MPC protocol: what a party sends, what it receives, in which order.

A protocol is a generator. It yields an :class:`Exchange` (for every other
party, the list of field vectors to send it) and is resumed with what every
other party sent it in that round (peer x → list of vectors, an *inbox*).
Its return value is the party's result::

    def open_(ctx, a):
        inbox = yield Exchange.broadcast(ctx, [a])
        ...
        return value

All parties run the same program on the same public inputs, so they yield
the same number of rounds with vectors of the same shapes. Sub-protocols
compose with ``yield from``; parallel work is one vectorised call over a
larger array (or several vectors in one Exchange), never parallel generators.

Who moves the bytes is not this module's business: :func:`run_local` drives
all parties in memory (tests, benchmarks); a node's runtime sends
``encode_payload(exchange.out[peer])`` over its link to each peer and feeds
the decoded answers back. :func:`decode_payload` is the boundary where a
peer's bytes become vectors: garbage raises :class:`EngineError` and nothing
else. A protocol checks the inbox it is resumed with by :func:`expect`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from qstore import field
from qstore.errors import LocalError, RemoteError
from qstore.field import ELEM_BYTES, Vec
from qstore.rng import RandomSource

__all__ = [
    "Context",
    "EngineError",
    "Exchange",
    "Inbox",
    "Protocol",
    "ProtocolError",
    "decode_payload",
    "encode_payload",
    "expect",
    "run_local",
]

T = TypeVar("T")
Inbox = dict[int, list[Vec]]

MAX_NDIM = 8  # element axes of one vector (the limb axis not counted)
_COUNT = struct.Struct("<I")
_DIM = struct.Struct("<I")
_U32_MAX = (1 << 32) - 1


class EngineError(RemoteError, ValueError):
    """A peer's message is unacceptable: garbled bytes, wrong count or shape of vectors."""


class ProtocolError(EngineError):
    """The parties disagree: inconsistent shares, or different numbers of rounds."""


@dataclass(frozen=True, kw_only=True)
class Context:
    """Who I am in one computation: my x, every party's x, the threshold, my randomness.

    ``t`` parties together learn nothing; ``len(parties) ≥ 2t + 1`` so that
    products (degree 2t) can be reduced. ``rng`` is a
    :class:`qstore.rng.RandomSource` for my random choices, default ``os.urandom``.
    """

    me: int
    parties: tuple[int, ...]
    t: int
    rng: RandomSource | None = None

    def __post_init__(self) -> None:
        parties = tuple(self.parties)
        object.__setattr__(self, "parties", parties)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in parties):
            raise LocalError("party coordinates must be positive integers")
        if list(parties) != sorted(set(parties)):
            raise LocalError("parties must be sorted and distinct")
        if self.me not in parties:
            raise LocalError(f"party {self.me} is not among the parties")
        if not isinstance(self.t, int) or self.t < 0 or len(parties) < 2 * self.t + 1:
            raise LocalError(f"need n ≥ 2t+1 parties, got n={len(parties)}, t={self.t}")

    @property
    def n(self) -> int:
        return len(self.parties)

    @property
    def peers(self) -> tuple[int, ...]:
        """Every party but me."""
        return tuple(x for x in self.parties if x != self.me)


@dataclass(frozen=True)
class Exchange:
    """One communication round: peer x → the vectors sent to it (every other party, possibly [])."""

    out: dict[int, list[Vec]]

    @classmethod
    def send_all(cls, ctx: Context, vecs_for_peer: Callable[[int], list[Vec]]) -> Exchange:
        """Each peer gets its own list (e.g. its share of something I deal)."""
        return cls({peer: list(vecs_for_peer(peer)) for peer in ctx.peers})

    @classmethod
    def broadcast(cls, ctx: Context, vecs: Sequence[Vec]) -> Exchange:
        """Every peer gets the same list (e.g. my share, to open a value)."""
        vecs = list(vecs)
        return cls({peer: vecs for peer in ctx.peers})


Protocol = Generator[Exchange, Inbox, T]
"""A party's program: yields Exchanges, is resumed with inboxes, returns its result."""


def expect(
    ctx: Context,
    inbox: Mapping[int, Sequence[Vec]],
    shapes: Sequence[tuple[int, ...]] | Callable[[int], Sequence[tuple[int, ...]]],
) -> Inbox:
    """The inbox if every peer sent exactly the vectors expected of it, else EngineError.

    ``shapes``: the element shapes (without the limb axis) every peer must
    send, or a function of the peer giving them (parties that send nothing: []).
    """
    if set(inbox) != set(ctx.peers):
        raise EngineError("a round's messages come from other parties than expected")
    checked: Inbox = {}
    for peer in ctx.peers:
        want = [tuple(s) for s in (shapes(peer) if callable(shapes) else shapes)]
        got = list(inbox[peer])
        if len(got) != len(want):
            raise EngineError(f"party {peer} sent {len(got)} vectors, expected {len(want)}")
        for v, shape in zip(got, want, strict=True):
            if not isinstance(v, np.ndarray) or v.dtype != np.uint64 or v.shape != shape + (2,):
                raise EngineError(f"party {peer} sent a vector of the wrong shape")
        checked[peer] = got
    return checked


# ---------------------------------------------------------------- wire form


def encode_payload(vecs: Sequence[Vec]) -> bytes:
    """Vectors → bytes: u32 count; per vector u8 ndim and ndim u32 dims; then every element's 16 bytes.

    Little-endian throughout; the limb axis is implicit. The inverse is :func:`decode_payload`.
    """
    head = [_COUNT.pack(len(vecs))]
    body = []
    for v in vecs:
        field.check(v)
        dims = v.shape[:-1]
        if len(dims) > MAX_NDIM or any(d > _U32_MAX for d in dims):
            raise LocalError(f"a vector of shape {dims} has no wire form")
        head.append(bytes([len(dims)]) + b"".join(_DIM.pack(d) for d in dims))
        body.append(field.to_bytes(v))
    return b"".join(head + body)


def decode_payload(data: bytes | bytearray | memoryview, max_elements: int) -> list[Vec]:
    """Bytes → vectors, refusing more than ``max_elements`` elements in all.

    Garbage (truncated or trailing bytes, absurd counts or shapes, unreduced
    elements) raises :class:`EngineError` and nothing else.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError as exc:
        raise EngineError("payload is not a byte string") from exc
    size = len(buf)
    if size < _COUNT.size:
        raise EngineError("payload shorter than its header")
    (count,) = _COUNT.unpack_from(buf, 0)
    pos = _COUNT.size
    if count > size - pos:  # every vector takes at least one header byte
        raise EngineError("payload announces more vectors than it holds")
    shapes: list[tuple[tuple[int, ...], int]] = []
    total = 0
    for _ in range(count):
        if pos >= size:
            raise EngineError("payload truncated in its header")
        ndim = buf[pos]
        pos += 1
        if ndim > MAX_NDIM:
            raise EngineError("a vector has too many axes")
        if pos + ndim * _DIM.size > size:
            raise EngineError("payload truncated in its header")
        dims = tuple(_DIM.unpack_from(buf, pos + i * _DIM.size)[0] for i in range(ndim))
        pos += ndim * _DIM.size
        n = 1
        for d in dims:
            n *= d
        total += n
        if total > max_elements:
            raise EngineError(f"payload holds more than {max_elements} field elements")
        shapes.append((dims, n))
    if size - pos != total * ELEM_BYTES:
        raise EngineError("payload length does not match its shapes")
    flat = np.frombuffer(buf, dtype="<u8", count=2 * total, offset=pos).astype(np.uint64).reshape(total, 2)
    try:
        field.check(flat)
    except field.FieldError as exc:
        raise EngineError("payload holds an unreduced field element") from exc
    out = []
    start = 0
    for dims, n in shapes:
        out.append(flat[start : start + n].reshape(dims + (2,)))
        start += n
    return out


# ---------------------------------------------------------------- in-memory driver


def run_local(
    programs: Mapping[int, Protocol[Any]],
    *,
    views: dict[int, list[Inbox]] | None = None,
    wire: bool = True,
) -> dict[int, Any]:
    """Drive every party's program in memory, round by round, and return each party's result.

    ``programs``: party x → its protocol generator (all on the same parties).
    ``views``: if given, filled with each party's view: per round, what it
    received (peer → vectors), which is everything a curious party learns
    beyond its own inputs and randomness. ``wire``: pass every message
    through :func:`encode_payload`/:func:`decode_payload`, as a network would.
    ProtocolError if the parties do not all stop in the same round.
    """
    xs = sorted(programs)
    if views is not None:
        views.update({x: [] for x in xs})
    pending: dict[int, Exchange] = {}
    results: dict[int, Any] = {}
    inboxes: dict[int, Inbox | None] = dict.fromkeys(xs)
    while True:
        for x in xs:
            try:
                step = programs[x].send(inboxes[x])
            except StopIteration as stop:
                results[x] = stop.value
            else:
                if not isinstance(step, Exchange):
                    raise LocalError(f"party {x} yielded {type(step).__name__}, not an Exchange")
                pending[x] = step
        if not pending:
            return results
        if results:
            raise ProtocolError(
                f"parties {sorted(results)} finished while {sorted(pending)} went on to another round"
            )
        for x, ex in pending.items():
            if set(ex.out) != set(xs) - {x}:
                raise LocalError(f"party {x} must address every other party exactly once")
        for x in xs:
            inbox: Inbox = {}
            for y in xs:
                if y != x:
                    vecs = pending[y].out[x]
                    if wire:
                        data = encode_payload(vecs)
                        vecs = decode_payload(data, max_elements=len(data) // ELEM_BYTES)
                    inbox[y] = list(vecs)
            inboxes[x] = inbox
            if views is not None:
                views[x].append(inbox)
        pending = {}
