"""qstore.b64 agrees with binascii (strict mode) on every input, for every backend."""

import binascii
import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qstore import _b64simd, b64
from qstore.errors import LocalError, RemoteError

BACKENDS = b64.available_backends()
ALPHABET = b64.ALPHABET

# Short (binascii alone), and long enough for the kernels (blocks of 64 characters) and their tails.
data = st.binary(min_size=0, max_size=3000) | st.builds(
    lambda seed, n: random.Random(seed).randbytes(n), st.integers(0, 2**32), st.integers(0, 40_000))
sizes = st.integers(min_value=0, max_value=12_000)


@pytest.fixture(params=BACKENDS, scope="module")
def codec(request) -> b64.Codec:
    return b64.codec(request.param)


RFC4648 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def reference(text: bytes) -> bytes | None:
    """binascii's strict answer, None where it refuses or where the text is not RFC 4648's form."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        return None
    return raw if RFC4648.fullmatch(text) else None


def ours(codec: b64.Codec, text: bytes) -> bytes | None:
    try:
        got = codec.decode(text)
    except b64.Base64Error:
        got = None
    buf = bytearray(len(text) + 7)
    try:
        n = codec.decode_into(text, buf)
    except b64.Base64Error:
        assert got is None
    else:
        assert bytes(buf[:n]) == got
    return got


def test_backends():
    assert BACKENDS[-1] == "numpy"
    assert set(BACKENDS) <= {"vbmi512", "numpy"}
    assert _b64simd.available() == BACKENDS[:-1]


@given(data)
def test_encode_equals_binascii(codec, raw):
    expected = binascii.b2a_base64(raw, newline=False)
    assert codec.encode(raw) == expected
    out = bytearray(b"*" * (len(expected) + 5))
    assert codec.encode_into(memoryview(raw), out) == len(expected)
    assert bytes(out) == expected + b"*" * 5  # nothing written past the end
    assert b64.encoded_length(len(raw)) == len(expected)


@given(data)
def test_round_trip(codec, raw):
    text = codec.encode(raw)
    assert codec.decode(text) == raw
    assert codec.decode(bytearray(text)) == raw
    assert b64.decoded_length(text) == len(raw)
    out = bytearray(b"*" * (len(raw) + 3))
    assert codec.decode_into(memoryview(text), out) == len(raw)
    assert bytes(out) == raw + b"***"


@given(data, st.data())
def test_corrupted_text_is_refused_as_binascii_refuses(codec, raw, draw):
    """Change, insert or delete characters anywhere: same verdict and same bytes as binascii."""
    text = bytearray(binascii.b2a_base64(raw, newline=False))
    bad = st.sampled_from(b"=\n \r\t-_.:\x00\x7f\x80\xc3\xff" + bytes([ALPHABET[0]]))
    for _ in range(draw.draw(st.integers(1, 3))):
        at = draw.draw(st.integers(0, len(text)))
        how = draw.draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "insert" or not text:
            text[at:at] = bytes([draw.draw(bad)])
        elif how == "replace":
            text[min(at, len(text) - 1)] = draw.draw(bad)
        else:
            del text[min(at, len(text) - 1)]
    assert ours(codec, bytes(text)) == reference(bytes(text))


@given(st.lists(st.sampled_from(list(ALPHABET + b"=")), max_size=800))
def test_any_text_over_the_alphabet_and_padding(codec, chars):
    text = bytes(chars)
    assert ours(codec, text) == reference(text)


@given(sizes, st.integers(0, 255), st.data())
def test_a_single_foreign_byte_is_found_anywhere(codec, n, byte, draw):
    assume(byte not in ALPHABET)
    text = bytearray(binascii.b2a_base64(os.urandom(n), newline=False))
    assume(text)
    at = draw.draw(st.integers(0, len(text) - 1))
    if byte == ord("=") and at >= len(text) - 2:
        assume(False)  # may be valid padding; covered by the alphabet test
    text[at] = byte
    assert reference(bytes(text)) is None
    with pytest.raises(b64.Base64Error):
        codec.decode(bytes(text))


@pytest.mark.parametrize("text", [b"QR==", b"QUJ=", b"QUJD" * 100 + b"QR==", b"QUJD" * 100 + b"QUK="])
def test_unused_bits_are_ignored_as_binascii_does(codec, text):
    assert codec.decode(text) == binascii.a2b_base64(text, strict_mode=True)


@pytest.mark.parametrize("text", [b"QUJD=", b"QUJD====", b"QUJD" * 100 + b"=", b"QUJD" * 100 + b"===="])
def test_padding_after_a_whole_quad_is_refused(codec, text):
    """Python 3.11's binascii lets '=' follow a complete last quad; RFC 4648 does not, nor do we."""
    assert binascii.a2b_base64(text, strict_mode=True) == binascii.a2b_base64(text.rstrip(b"="))
    with pytest.raises(b64.Base64Error):
        codec.decode(text)


@pytest.mark.parametrize("text", [b"=", b"A", b"AB=", b"A===", b"AB=C", b"ABC==", b"=ABC", b"AB==QUJD",
                                  b"QUJD" * 100 + b"AB=", b"QUJD" * 100 + b"====", b"QUJD=" + b"QUJD" * 100,
                                  b"QUJD" * 100 + b"\n"])
def test_malformed(codec, text):
    assert reference(text) is None
    with pytest.raises(b64.Base64Error) as info:
        codec.decode(text)
    assert isinstance(info.value, RemoteError)
    assert b"QUJD" not in str(info.value).encode()  # the message never quotes the input


def test_empty(codec):
    assert codec.encode(b"") == b"" and codec.decode(b"") == b""


def test_misuse_is_local(codec):
    with pytest.raises(LocalError):
        codec.encode_into(b"abc", bytearray(3))
    with pytest.raises(LocalError):
        codec.decode_into(b"QUJD", bytearray(2))
    with pytest.raises(LocalError):
        codec.encode_into(b"abc", b"xxxx")  # read-only
    with pytest.raises(LocalError):
        codec.decode("QUJD")  # text, not bytes


def test_large_buffers(codec):
    raw = os.urandom((1 << 20) + 5)
    text = codec.encode(raw)
    assert text == binascii.b2a_base64(raw, newline=False)
    assert codec.decode(text) == raw


def test_writable_bytes():
    out, view = b64.writable_bytes(5)
    view[:] = b"hello"
    view.release()
    assert out == b"hello" and isinstance(out, bytes)
    with pytest.raises(LocalError):
        b64.writable_bytes(1)


def test_numpy_backend_needs_no_jit():
    """QSTORE_KERNEL=numpy: base64 works and llvmlite is never even imported."""
    code = (
        "import sys, os, binascii\n"
        "from qstore import b64\n"
        "raw = os.urandom(100_000)\n"
        "assert b64.default_backend() == 'numpy'\n"
        "assert b64.decode(b64.encode(raw)) == raw\n"
        "assert b64.encode(raw) == binascii.b2a_base64(raw, newline=False)\n"
        "print('llvmlite' in sys.modules)\n"
    )
    env = {**os.environ, "QSTORE_KERNEL": "numpy"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
