"""BB84 at circuit level with qiskit, for runs of up to a few million photons.

Alice sends each photon as |0>, |1> (Z basis) or |+>, |-> (X basis): an X
gate for bit 1, then H for the X basis. Between her and Bob:

* **Eve** (optional) intercepts a fraction ``eve_fraction`` of the photons at
  Alice's door, measures each in a random basis and resends what she saw.
  In the circuit her measurement is a CNOT onto a probe qubit, wrapped in H
  gates when she measures in X; tracing the probe out is exactly measuring
  and resending.
* **The fiber** depolarises: ``ρ → (1 - p) ρ + p I/2``, applied as a qiskit
  :class:`~qiskit.quantum_info.Kraus` channel (Paulis X, Y, Z with weight
  p/4 each). A depolarised photon reads wrong in any basis with
  probability 1/2, so **the QBER is p/2**. With Eve as well, a photon she
  handled is wrong with probability 1/4 before the fiber, and
  ``QBER = p/2 + (1 - p)·f/4`` for an intercepted fraction f (25 % at f = 1,
  p = 0). Loss is a transmittance η: a photon reaches Bob's detector with
  probability η, whatever its state.
* **Bob** measures in a random basis (H then a Z measurement for X).

Photons are not simulated one by one. Every photon falls in one of 24
groups (bit, Alice's basis, Eve absent / Z / X, Bob's basis); one small
circuit per group is evaluated as a :class:`~qiskit.quantum_info.DensityMatrix`
to get the probability that Bob reads 1, and the outcomes of all photons
are then drawn at once with numpy.

Then the classical protocol (:mod:`qkd_sim.postprocess`): sifting, a random
sample of the sifted bits disclosed to estimate the QBER (and dropped from
the key), abort above ``qber_threshold``, Cascade, and Toeplitz hashing down
to :func:`~qkd_sim.postprocess.final_key_length` (finite-size). All
randomness comes from the ``rng`` given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from qiskit import QuantumCircuit
from qiskit.quantum_info import DensityMatrix, Kraus

from qkd_sim.postprocess import (
    CascadeAlice,
    ReconciliationError,
    cascade,
    final_key_length,
    toeplitz_hash,
)
from qstore.errors import LocalError

U8 = npt.NDArray[np.uint8]
Bits = TypeVar("Bits", int, U8)

DEFAULT_QBER_THRESHOLD = 0.11  # Shor–Preskill: 1 - 2h(e) > 0 below about 11 %
DEFAULT_SAMPLE_FRACTION = 0.1
EVE_NONE, EVE_Z, EVE_X = 0, 1, 2
N_GROUPS = 2 * 2 * 3 * 2


@dataclass(frozen=True, kw_only=True)
class BB84Report:
    """What a run produced. Keys are packed bits (``np.packbits``), a whole number of bytes."""

    photons: int
    detected: int
    sifted: int
    sample_size: int
    qber_estimate: float  # on the disclosed sample
    qber_true: float  # on the key bits Cascade had to correct (known only to the simulation)
    leaked_bits: int  # disclosed by Cascade, verification hashes included
    final_key_length: int  # bits, rounded down to whole bytes
    aborted: bool
    abort_reason: str = ""
    errors_corrected: int = 0
    cascade_queries: int = 0
    alice_key: bytes = field(default=b"", repr=False)
    bob_key: bytes = field(default=b"", repr=False)

    @property
    def key_bits(self) -> int:
        """Sifted bits left for the key once the sample is disclosed."""
        return self.sifted - self.sample_size


def depolarizing_channel(p: float) -> Kraus:
    """ρ → (1 - p) ρ + p I/2 on one qubit, as Kraus operators."""
    if not 0 <= p <= 1:
        raise LocalError("depolarizing probability must lie in [0, 1]")
    paulis = (
        np.eye(2, dtype=complex),
        np.array([[0, 1], [1, 0]], dtype=complex),
        np.array([[0, -1j], [1j, 0]], dtype=complex),
        np.array([[1, 0], [0, -1]], dtype=complex),
    )
    weights = (1 - 3 * p / 4, p / 4, p / 4, p / 4)
    return Kraus([math.sqrt(w) * op for w, op in zip(weights, paulis, strict=True) if w > 0])


def group_circuit(
    bit: int, alice_basis: int, eve: int, bob_basis: int, depolarizing: float
) -> QuantumCircuit:
    """One photon's journey: qubit 0 is the photon, qubit 1 Eve's probe (idle without Eve)."""
    qc = QuantumCircuit(2, name=f"bb84_{bit}{alice_basis}{eve}{bob_basis}")
    if bit:
        qc.x(0)
    if alice_basis:
        qc.h(0)
    if eve != EVE_NONE:
        if eve == EVE_X:
            qc.h(0)
        qc.cx(0, 1)
        if eve == EVE_X:
            qc.h(0)
    if depolarizing:
        qc.append(depolarizing_channel(depolarizing).to_instruction(), [0])
    if bob_basis:
        qc.h(0)
    return qc


def _group_code(bit: Bits, alice_basis: Bits, eve: Bits, bob_basis: Bits) -> Bits:
    """Index of a photon's group in 0..23 (fits uint8, so works on arrays and ints alike)."""
    return ((bit * 2 + alice_basis) * 3 + eve) * 2 + bob_basis


@lru_cache(maxsize=64)
def outcome_probabilities(depolarizing: float) -> npt.NDArray[np.float64]:
    """P(Bob reads 1) for every group, indexed like the group code; one circuit each."""
    p1 = np.empty(N_GROUPS)
    for bit in (0, 1):
        for a in (0, 1):
            for eve in (EVE_NONE, EVE_Z, EVE_X):
                for b in (0, 1):
                    state = DensityMatrix(group_circuit(bit, a, eve, b, depolarizing))
                    p1[_group_code(bit, a, eve, b)] = state.probabilities([0])[1]
    p1.setflags(write=False)
    return p1


def _bits(rng: np.random.Generator, n: int) -> U8:
    return rng.integers(0, 2, n, dtype=np.uint8)


class Sifted(NamedTuple):
    detected: int
    alice: U8  # Alice's bits where Bob detected the photon and the bases agree
    bob: U8  # Bob's readings of the same photons


def transmit_and_sift(
    photons: int,
    *,
    transmittance: float = 1.0,
    depolarizing: float = 0.0,
    eve_fraction: float = 0.0,
    rng: np.random.Generator,
) -> Sifted:
    """The quantum stage (Alice, Eve, fiber, Bob) and sifting, drawn group by group."""
    bit, alice_basis = _bits(rng, photons), _bits(rng, photons)
    eve = np.where(rng.random(photons) < eve_fraction, EVE_Z + _bits(rng, photons), EVE_NONE)
    detected = rng.random(photons) < transmittance
    bit, alice_basis, eve = bit[detected], alice_basis[detected], eve[detected].astype(np.uint8)
    bob_basis = _bits(rng, len(bit))
    p1 = outcome_probabilities(float(depolarizing))[_group_code(bit, alice_basis, eve, bob_basis)]
    bob_bit = (rng.random(len(bit)) < p1).astype(np.uint8)
    same = alice_basis == bob_basis
    return Sifted(len(bit), bit[same], bob_bit[same])


def run_bb84(
    photons: int,
    *,
    transmittance: float = 1.0,
    depolarizing: float = 0.0,
    eve_fraction: float = 0.0,
    qber_threshold: float = DEFAULT_QBER_THRESHOLD,
    sample_fraction: float = DEFAULT_SAMPLE_FRACTION,
    eps_sec: float = 1e-10,
    eps_pe: float = 1e-10,
    rng: np.random.Generator | None = None,
) -> BB84Report:
    """Send ``photons`` photons, then sift, estimate, correct and amplify; see the module doc."""
    if photons < 0:
        raise LocalError("photons must be >= 0")
    for name, value in (
        ("transmittance", transmittance),
        ("depolarizing", depolarizing),
        ("eve_fraction", eve_fraction),
        ("qber_threshold", qber_threshold),
        ("sample_fraction", sample_fraction),
    ):
        if not 0 <= value <= 1:
            raise LocalError(f"{name} must lie in [0, 1], got {value}")
    rng = np.random.default_rng() if rng is None else rng
    detected, alice_sifted, bob_sifted = transmit_and_sift(
        photons, transmittance=transmittance, depolarizing=depolarizing, eve_fraction=eve_fraction, rng=rng
    )

    # A random sample is disclosed for the QBER estimate and dropped from the key.
    sifted = len(alice_sifted)
    sample_size = min(sifted, math.ceil(sample_fraction * sifted))
    in_sample = np.zeros(sifted, dtype=bool)
    in_sample[rng.choice(sifted, size=sample_size, replace=False)] = True
    sample_errors = int(np.count_nonzero(alice_sifted[in_sample] != bob_sifted[in_sample]))
    alice_raw, bob_raw = alice_sifted[~in_sample], bob_sifted[~in_sample]
    report = BB84Report(
        photons=photons,
        detected=detected,
        sifted=sifted,
        sample_size=sample_size,
        qber_estimate=sample_errors / sample_size if sample_size else 0.0,
        qber_true=float(np.mean(alice_raw != bob_raw)) if len(alice_raw) else 0.0,
        leaked_bits=0,
        final_key_length=0,
        aborted=True,
    )
    if sample_size == 0 or len(alice_raw) == 0:
        return replace(report, abort_reason="too few sifted bits to estimate the QBER and keep a key")
    if report.qber_estimate > qber_threshold:
        reason = f"QBER estimate {report.qber_estimate:.2%} above threshold {qber_threshold:.2%}"
        return replace(report, abort_reason=reason)

    # Error correction: Bob asks, Alice answers; every disclosed bit is counted.
    alice = CascadeAlice(alice_raw)
    try:
        corrected = cascade(bob_raw, alice, report.qber_estimate, rng=rng)
    except ReconciliationError:
        return replace(
            report,
            leaked_bits=alice.leaked_bits,
            cascade_queries=alice.n_queries,
            abort_reason="error correction failed verification",
        )
    report = replace(
        report,
        leaked_bits=corrected.leaked_bits,
        cascade_queries=corrected.n_queries,
        errors_corrected=int(np.count_nonzero(corrected.key != bob_raw)),
    )

    # Privacy amplification to whole bytes: Alice draws the public seed, both hash.
    length = final_key_length(
        len(alice_raw),
        report.qber_estimate,
        corrected.leaked_bits,
        n_sample=sample_size,
        eps_sec=eps_sec,
        eps_pe=eps_pe,
    )
    length -= length % 8
    if length == 0:
        return replace(report, abort_reason="no secret key left after the finite-size bound")
    seed = _bits(rng, len(alice_raw) + length - 1)
    return replace(
        report,
        aborted=False,
        final_key_length=length,
        alice_key=np.packbits(toeplitz_hash(alice_raw, length, seed)).tobytes(),
        bob_key=np.packbits(toeplitz_hash(corrected.key, length, seed)).tobytes(),
    )
