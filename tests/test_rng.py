"""The coefficient generators: our AES-CTR equals OpenSSL's, streams are addressable, wiping works."""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from qstore import _simd
from qstore.rng import AesCtrRandom, OsRandom, expand_key_256


def openssl_ctr(key: bytes, position: int, length: int) -> bytes:
    iv = (position // 16).to_bytes(16, "big")
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(bytes(length))


def test_key_expansion_matches_fips_197_appendix_a3():
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    rk = expand_key_256(key)
    assert len(rk) == 240
    assert rk[:32] == key
    assert rk[32:36].hex() == "9ba35411"  # w[8]
    assert rk[-4:].hex() == "706c631e"  # w[59]


@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**20).map(lambda b: 16 * b),
       st.integers(0, 5000))
def test_keystream_equals_openssl(key, position, length):
    out = bytearray(length)
    AesCtrRandom(key).fill(memoryview(out), position)
    assert bytes(out) == openssl_ctr(key, position, length)


@pytest.mark.parametrize("name", _simd.aes_available())
def test_each_compiled_aes_kernel_equals_openssl(name):
    key = os.urandom(32)
    kernel = _simd.compile_aes(name)
    rk = np.frombuffer(expand_key_256(key), dtype=np.uint8).copy()
    for first, nvec in [(0, 1), (3, 4 * 7 + 3), (2**40 - 5, 17)]:
        out = np.zeros(nvec * kernel.lanes * 16, dtype=np.uint8)
        kernel.fn(out.ctypes.data, nvec, rk.ctypes.data, first)
        assert out.tobytes() == openssl_ctr(key, 16 * first, len(out))


def test_positions_address_the_same_stream():
    gen = AesCtrRandom(bytes(range(32)))
    whole = bytearray(4096)
    gen.fill(memoryview(whole), 0)
    part = bytearray(1000)
    gen.fill(memoryview(part), 2048)
    assert part == whole[2048:3048]
    with pytest.raises(ValueError):
        gen.fill(memoryview(part), 7)


def test_fresh_keys_and_wipe():
    a, b = bytearray(64), bytearray(64)
    AesCtrRandom().fill(memoryview(a))
    AesCtrRandom().fill(memoryview(b))
    assert a != b
    gen = AesCtrRandom()
    gen.wipe()
    with pytest.raises(ValueError):
        gen.fill(memoryview(a))


def test_os_random_fills():
    buf = bytearray(256)
    OsRandom().fill(memoryview(buf), 0)
    assert len(set(buf)) > 100
