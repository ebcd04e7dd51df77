"""Randomness for sharing coefficients.

Shamir's secrecy is only as good as its coefficients. Two generators:

* :class:`AesCtrRandom` (default): the AES-256-CTR keystream under a fresh
  32-byte key from ``os.urandom``. :func:`qstore.sharing.split` builds a new
  one for every call, i.e. it is re-keyed from the OS for every chunk. It is
  a standard CSPRNG construction (the keystream of a block cipher in counter
  mode, as in NIST SP 800-90A's CTR_DRBG) and runs at several GB/s, where
  ``os.urandom`` alone caps a split near 180 MB/s. Honest caveat: the
  coefficients are then computationally, not information-theoretically,
  random: an adversary who could break AES-256 and held k-1 shares of the
  same chunk could in principle learn something.
* :class:`OsRandom` (strict mode): every byte from ``os.urandom``, for data
  whose secrecy must not rest on AES at all.

The stream is addressable: ``fill(out, position)`` writes the keystream
bytes ``position .. position + len(out)``, so segments of one split can be
drawn in any order (or by several threads) and give the same shares. The
keystream is exactly OpenSSL's AES-256-CTR with an all-zero IV; on CPUs with
AES-NI/VAES it is computed by :mod:`qstore._simd` with the GIL released (and
faster than OpenSSL), otherwise by OpenSSL through ``cryptography``. Tests
inject a fixed key for reproducible vectors.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qstore import gf256

_ZEROS = bytes(1 << 18)
_BLOCK = 16


class RandomSource(Protocol):
    """Anything that fills a writable buffer with uniform random bytes.

    ``position`` addresses the stream (a multiple of 16); sources without a
    stream (the OS) ignore it. ``reserve(n)`` hands out the start of n
    stream bytes never handed out before, so that no coefficient is ever
    used twice, however often one generator is used.
    """

    def fill(self, out: memoryview, position: int = 0) -> None: ...

    def reserve(self, nbytes: int) -> int: ...


@cache
def _sbox() -> tuple[int, ...]:
    """The AES S-box: inversion in GF(2^8) mod 0x11B, then the affine map."""
    box = []
    for x in range(256):
        b = int(gf256.INV[x]) if x else 0
        r = b
        for sh in (1, 2, 3, 4):
            r ^= ((b << sh) | (b >> (8 - sh))) & 0xFF
        box.append(r ^ 0x63)
    return tuple(box)


def expand_key_256(key: bytes) -> bytes:
    """FIPS-197 key expansion of an AES-256 key: 15 round keys, 240 bytes."""
    if len(key) != 32:
        raise ValueError("AES-256 key must be 32 bytes")
    sbox = _sbox()
    words = [list(key[4 * i : 4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(words[i - 1])
        if i % 8 == 0:
            t = [sbox[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = gf256.mul(rcon, 2)
        elif i % 8 == 4:
            t = [sbox[b] for b in t]
        words.append([a ^ b for a, b in zip(words[i - 8], t, strict=True)])
    return bytes(b for w in words for b in w)


def _aes_kernel():  # -> qstore._simd.AesKernel | None
    if os.environ.get("QSTORE_KERNEL", "").strip().lower() == "numpy":
        return None
    from qstore import _simd

    names = _simd.aes_available()
    return _simd.compile_aes(names[0]) if names else None


class AesCtrRandom:
    """AES-256-CTR keystream under a key from os.urandom (or a given test key)."""

    def __init__(self, key: bytes | None = None):
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise ValueError("AES-256 key must be 32 bytes")
        self._key: bytes | None = key
        self._kernel = _aes_kernel()
        self._round_keys = np.frombuffer(expand_key_256(key), dtype=np.uint8).copy() if self._kernel else None
        self._next = 0

    def reserve(self, nbytes: int) -> int:
        """Start of ``nbytes`` of fresh stream (rounded up to whole blocks)."""
        start = self._next
        self._next += -(-nbytes // _BLOCK) * _BLOCK
        return start

    def kernel_state(self) -> tuple[str, np.ndarray] | None:
        """(AES kernel name, round keys) for kernels that make the stream themselves (hazmat)."""
        if self._kernel is None or self._round_keys is None:
            return None
        return self._kernel.name, self._round_keys

    def fill(self, out: memoryview, position: int = 0) -> None:
        """Write keystream bytes ``position .. position + len(out)`` into ``out``."""
        if self._key is None:
            raise ValueError("this generator has been wiped")
        if position % _BLOCK or position < 0:
            raise ValueError("position must be a non-negative multiple of 16")
        out = out.cast("B") if out.format != "B" else out
        block = position // _BLOCK
        done = 0
        if self._kernel is not None and self._round_keys is not None:
            step = _BLOCK * self._kernel.lanes
            nvec = len(out) // step
            if nvec:
                arr = np.frombuffer(out, dtype=np.uint8)
                self._kernel.fn(arr.ctypes.data, nvec, self._round_keys.ctypes.data, block)
                done = nvec * step
        if done < len(out):
            iv = (block + done // _BLOCK).to_bytes(16, "big")  # OpenSSL: same stream, same place
            enc = Cipher(algorithms.AES(self._key), modes.CTR(iv)).encryptor()
            for pos in range(done, len(out), len(_ZEROS)):
                piece = out[pos : pos + len(_ZEROS)]
                enc.update_into(_ZEROS[: len(piece)], piece)

    def wipe(self) -> None:
        """Forget the key material (the coefficients are as secret as the data)."""
        if self._round_keys is not None:
            self._round_keys.fill(0)
        self._round_keys = None
        self._kernel = None
        self._key: bytes | None = None


class OsRandom:
    """Strict mode: every byte from the operating system's CSPRNG."""

    def reserve(self, nbytes: int) -> int:
        return 0  # no stream: every fill is fresh

    def fill(self, out: memoryview, position: int = 0) -> None:
        out = out.cast("B") if out.format != "B" else out
        out[:] = os.urandom(len(out))
