"""qstore core: information-theoretic building blocks with no I/O.

Modules in dependency order: :mod:`qstore.gf256` (the field),
:mod:`qstore.linmap` (GF(2^8) linear maps over buffers: the kernels),
:mod:`qstore.rng` (coefficient randomness), :mod:`qstore.sharing` (Shamir
split/combine of bytes and streams), :mod:`qstore.decoding` (correcting
wrong shares), :mod:`qstore.framing` (share frames),
:mod:`qstore.otp` (one-time-pad + one-time MAC sealing),
:mod:`qstore.errors` (one error tree).
"""

__version__ = "0.1.0"
