"""Randomness for sharing coefficients.

Shamir's secrecy is only as good as its coefficients. Two generators:

* :class:`AesCtrRandom` (default): the AES-256-CTR keystream of
  ``cryptography`` (OpenSSL, AES-NI) under a fresh 32-byte key from
  ``os.urandom``. :func:`qstore.sharing.split` builds a new one for every
  call, i.e. it is re-keyed from the OS for every chunk. It is a standard
  CSPRNG construction (the keystream of a block cipher in counter mode, as
  in NIST SP 800-90A's CTR_DRBG without derivation function) and runs at
  several GB/s, where ``os.urandom`` alone caps a split near 180 MB/s.
  Note the honest caveat: the coefficients are then computationally, not
  information-theoretically, random: an adversary who could break AES-256
  and saw k-1 shares of the same chunk could in principle learn something.
* :class:`OsRandom` (strict mode): every byte straight from ``os.urandom``,
  for data whose secrecy must not rest on AES at all.

Tests inject :class:`AesCtrRandom` with a fixed key for reproducible vectors.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZEROS = bytes(1 << 18)


class AesCtrRandom:
    """AES-256-CTR keystream under a key from os.urandom (or a given test key)."""

    def __init__(self, key: bytes | None = None):
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise ValueError("AES-256 key must be 32 bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def fill(self, out: memoryview) -> None:
        """Write len(out) fresh random bytes into ``out``."""
        out = out.cast("B") if out.format != "B" else out
        for pos in range(0, len(out), len(_ZEROS)):
            piece = out[pos : pos + len(_ZEROS)]
            self._enc.update_into(_ZEROS[: len(piece)], piece)


class OsRandom:
    """Strict mode: every byte from the operating system's CSPRNG."""

    def fill(self, out: memoryview) -> None:
        out = out.cast("B") if out.format != "B" else out
        out[:] = os.urandom(len(out))
