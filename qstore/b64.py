"""Base64 (RFC 4648 §4: standard alphabet, '=' padding) at memory speed, without I/O.

ETSI GS QKD 014 carries every key as base64 in JSON, so a KME and its SAEs
encode and decode each key byte once per delivery: CPython's ``binascii``
(about 250 MB/s decoding, 450 MB/s encoding here) would bound key delivery
far below what TLS and the key pools sustain.

Backends:

* ``vbmi512``: AVX-512 VBMI kernels (:mod:`qstore._b64simd`, compiled by
  llvmlite), 5 to 7 GB/s;
* ``numpy``: table lookups over arrays, for CPUs without VBMI or with
  ``QSTORE_KERNEL=numpy`` (which never loads llvmlite).

Both cut the input into whole blocks for the fast path and hand the last few
characters, where padding lives, to ``binascii`` itself. The decoder is
never more lenient than ``binascii.a2b_base64(text, strict_mode=True)`` and
gives the same bytes: it accepts exactly the RFC's texts, a multiple of 4
characters of the alphabet with '=' only as the last one or two (like
binascii, it ignores the unused bits of the last character). Python 3.11's
binascii also accepts '='s after a complete final quad (``"QUJD="``); we
refuse those. Anything refused raises :class:`Base64Error`, whose message
never quotes the input.
"""

from __future__ import annotations

import binascii
import ctypes
import os
from functools import cache
from typing import Literal

import numpy as np

from qstore.errors import LocalError, RemoteError

Backend = Literal["vbmi512", "numpy"]
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BLOCK_IN, _BLOCK_OUT = 48, 64  # bytes and characters per kernel block
# Below these many (decoded) bytes the few microseconds of a kernel call cost more than binascii.
_SMALL_ENCODE = 8192
_SMALL_DECODE = 2048
_NUMPY_PIECE = 3 << 14  # bytes per numpy step (multiple of 48): bounds the temporaries
_PAD = 0x3D  # "="

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_at = ctypes.pythonapi.PyBytes_AsString
_bytes_at.restype = ctypes.c_void_p
_bytes_at.argtypes = (ctypes.py_object,)


class _PyBuffer(ctypes.Structure):
    """``Py_buffer`` (part of the stable ABI since Python 3.11)."""

    _fields_ = (("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p))


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)


class Base64Error(RemoteError):
    """Text that is not strict base64 (RFC 4648 with padding). Names the fault, never the input."""


def writable_bytes(n: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``n`` uninitialised bytes, and a writable view of its memory.

    Hazmat. This is ``PyBytes_FromStringAndSize(NULL, n)``, the C API's way to
    build a bytes object in place: results handed out as ``bytes`` (keys,
    decoded text) are written once, where they live, instead of being built
    in a buffer and copied. Fill it completely before the bytes object is
    shared or hashed, drop the view then, and keep the bytes object alive as
    long as the view.
    """
    if not isinstance(n, int) or n < 2:
        raise LocalError("writable_bytes needs n >= 2 (shorter bytes objects may be shared singletons)")
    out = _new_bytes(None, n)
    return out, memoryview((ctypes.c_ubyte * n).from_address(_bytes_at(out))).cast("B")


def encoded_length(nbytes: int) -> int:
    """Characters of the base64 of ``nbytes`` bytes, padding included."""
    return 4 * -(-nbytes // 3)


def decoded_length(text: bytes | bytearray | memoryview) -> int:
    """Bytes that ``text`` decodes to, judged by its length and final '='s only (not validated)."""
    view = _view(text)
    n = len(view)
    if n % 4:
        raise Base64Error("base64 length is not a multiple of 4")
    if n == 0:
        return 0
    pad = (view[-1] == _PAD) + (view[-1] == _PAD and view[-2] == _PAD)
    return n // 4 * 3 - pad


def _view(data: object) -> memoryview:
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise LocalError("base64 works on bytes-like objects") from None
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise LocalError("base64 needs a C-contiguous buffer") from None
    return view


def _out(out: object, need: int) -> memoryview:
    view = _view(out)
    if view.readonly:
        raise LocalError("output buffer is read-only")
    if len(view) < need:
        raise LocalError(f"output buffer holds {len(view)} bytes, {need} needed")
    return view


def _address(view: memoryview) -> int:
    """Where the (C-contiguous, non-empty) buffer starts; the caller keeps it alive and unresized."""
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    if type(view.obj) is bytes and len(view) == len(view.obj):
        return _bytes_at(view.obj)  # type: ignore[no-any-return]
    info = _PyBuffer()
    _get_buffer(view, ctypes.byref(info), 0)  # PyBUF_SIMPLE
    try:
        return info.buf  # type: ignore[no-any-return]
    finally:
        _release_buffer(ctypes.byref(info))


def _tail_decode(text: bytes | bytearray | memoryview) -> bytes:
    """The last characters (where padding lives), by binascii, minus its one leniency (see above)."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise Base64Error("not valid base64 (characters, padding or length)") from None
    n = len(text)
    # '='s after a complete last quad make no bytes: binascii then gives fewer than the length says
    if n % 4 or len(raw) != n // 4 * 3 - (n > 0 and text[-1] == _PAD) - (n > 1 and text[-2] == _PAD):
        raise Base64Error("not valid base64 (padding after the last quad)")
    return raw


class Codec:
    """Encoder and decoder of one backend (see the module docstring)."""

    def __init__(self, backend: Backend):
        self.backend: Backend = backend
        if backend == "numpy":
            self._kernels = None
        elif backend == "vbmi512":
            from qstore import _b64simd

            self._kernels = _b64simd.compile_kernels(backend)
        else:
            raise LocalError(f"unknown base64 backend {backend!r}")

    def __repr__(self) -> str:
        return f"Codec({self.backend})"

    # -- encoding ------------------------------------------------------------

    def encode_into(self, data: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
        """Write the base64 of ``data`` at the start of ``out``; the number of characters written."""
        src = _view(data)
        n = len(src)
        need = encoded_length(n)
        dst = _out(out, need)
        body = n // _BLOCK_IN if n >= _SMALL_ENCODE else 0
        if body:
            if self._kernels is not None:
                self._kernels.encode(_address(src), body, _address(dst))
            else:
                _numpy_encode(src[: body * _BLOCK_IN], dst[: body * _BLOCK_OUT])
        done_in, done_out = body * _BLOCK_IN, body * _BLOCK_OUT
        if done_in < n:
            dst[done_out:need] = binascii.b2a_base64(src[done_in:], newline=False)
        return need

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """The base64 of ``data`` (as ``binascii.b2a_base64(data, newline=False)``)."""
        if type(data) is bytes and len(data) < _SMALL_ENCODE:
            return binascii.b2a_base64(data, newline=False)  # short: straight to binascii
        n = len(_view(data))
        if n < _SMALL_ENCODE:
            return binascii.b2a_base64(data, newline=False)
        out, view = writable_bytes(encoded_length(n))
        with view:
            self.encode_into(data, view)
        return out

    # -- decoding ------------------------------------------------------------

    def decode_into(self, text: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
        """Decode ``text`` (strict, see the module docstring) to the start of ``out``; bytes written."""
        src = _view(text)
        n = len(src)
        need = decoded_length(src)
        dst = _out(out, need)
        body = (n - 4) // _BLOCK_OUT if n >= 4 * _SMALL_DECODE // 3 else 0  # the tail keeps the last quad
        if body:
            if self._kernels is not None:
                if self._kernels.decode(_address(src), body, _address(dst)) != body:
                    raise Base64Error("not valid base64 (a character outside the alphabet)")
            else:
                _numpy_decode(src[: body * _BLOCK_OUT], dst[: body * _BLOCK_IN])
        done_in, done_out = body * _BLOCK_OUT, body * _BLOCK_IN
        tail = _tail_decode(src[done_in:])
        dst[done_out : done_out + len(tail)] = tail
        return done_out + len(tail)

    def decode(self, text: bytes | bytearray | memoryview) -> bytes:
        """The bytes ``text`` encodes (as ``binascii.a2b_base64(text, strict_mode=True)``)."""
        short = len(text) < _SMALL_DECODE
        if short and (type(text) is bytes or (type(text) is memoryview and text.format == "B")):
            return _tail_decode(text)  # straight to binascii
        need = decoded_length(text)
        if need < _SMALL_DECODE:
            return _tail_decode(_view(text))
        out, view = writable_bytes(need)
        with view:
            self.decode_into(text, view)
        return out


# -- the numpy backend ----------------------------------------------------------

_ENCODE_TABLE = np.frombuffer(ALPHABET, dtype=np.uint8)
_DECODE_TABLE = np.full(256, 0xFF, dtype=np.uint8)
_DECODE_TABLE[_ENCODE_TABLE] = np.arange(64, dtype=np.uint8)


def _numpy_encode(src: memoryview, dst: memoryview) -> None:
    """Whole 3-byte groups to 4 characters, piece by piece."""
    a = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    for at in range(0, len(a), _NUMPY_PIECE):
        g = a[at : at + _NUMPY_PIECE].reshape(-1, 3).astype(np.uint32)
        v = (g[:, 0] << 16) | (g[:, 1] << 8) | g[:, 2]
        fields = np.stack([v >> 18, (v >> 12) & 63, (v >> 6) & 63, v & 63], axis=1)
        out = d[at // 3 * 4 : (at + len(g) * 3) // 3 * 4]
        out[:] = _ENCODE_TABLE[fields].reshape(-1)


def _numpy_decode(src: memoryview, dst: memoryview) -> None:
    """Whole quads of alphabet characters (no padding) to 3 bytes each, piece by piece."""
    a = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    step = _NUMPY_PIECE // 3 * 4
    for at in range(0, len(a), step):
        vals = _DECODE_TABLE[a[at : at + step]]
        if vals.max(initial=0) > 63:
            raise Base64Error("not valid base64 (a character outside the alphabet)")
        q = vals.reshape(-1, 4).astype(np.uint32)
        v = (q[:, 0] << 18) | (q[:, 1] << 12) | (q[:, 2] << 6) | q[:, 3]
        out = d[at // 4 * 3 : at // 4 * 3 + len(q) * 3].reshape(-1, 3)
        out[:, 0] = v >> 16
        out[:, 1] = v >> 8
        out[:, 2] = v


# -- choosing a backend -------------------------------------------------------------


def available_backends() -> list[Backend]:
    """Backends this machine can run, best first (numpy always last)."""
    from qstore import _b64simd

    return [*_b64simd.available(), "numpy"]  # type: ignore[list-item]


def default_backend() -> Backend:
    """The best backend here; ``numpy`` when ``QSTORE_KERNEL=numpy`` (llvmlite is then never loaded).

    Other values of ``QSTORE_KERNEL`` name GF(2^8) kernels (:mod:`qstore.linmap`)
    and leave the base64 choice alone.
    """
    if os.environ.get("QSTORE_KERNEL", "").strip().lower() == "numpy":
        return "numpy"
    return available_backends()[0]


@cache
def codec(backend: Backend | None = None) -> Codec:
    """The codec of ``backend`` (default: :func:`default_backend`), built once per process."""
    return Codec(backend or default_backend())


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """Base64 of ``data`` with the default backend."""
    if type(data) is bytes and len(data) < _SMALL_ENCODE:
        return binascii.b2a_base64(data, newline=False)  # short: no backend needed
    return codec().encode(data)


def encode_into(data: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
    """Base64 of ``data`` written to the start of ``out`` with the default backend; characters written."""
    return codec().encode_into(data, out)


def decode(text: bytes | bytearray | memoryview) -> bytes:
    """Strictly decode ``text`` with the default backend (:class:`Base64Error` if it is not base64)."""
    return codec().decode(text)


def decode_into(text: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
    """Strictly decode ``text`` to the start of ``out`` with the default backend; bytes written."""
    return codec().decode_into(text, out)
