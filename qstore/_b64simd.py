"""Machine-code base64 kernels (AVX-512 VBMI), generated as LLVM IR.

The method is Muła and Lemire's ("Base64 encoding and decoding at almost the
speed of a memory copy", 2019), one 64-byte vector per step:

* encode, 48 bytes → 64 characters: ``vpermb`` puts the 3 bytes of each
  group where a 4-byte lane wants them, ``vpmultishiftqb`` pulls the four
  6-bit fields out of each lane, and ``vpermb`` maps them through the
  64-character alphabet held in one register;
* decode, 64 characters → 48 bytes: ``vpermi2b`` maps every character
  through a 128-entry table (6-bit value, or 0x80 for anything that is not
  in the alphabet, '=' included), one OR and a sign test reject the whole
  vector, ``vpmaddubsw`` and ``vpmaddwd`` join the fields into 24-bit
  groups and ``vpermb`` packs them.

Kernels see only whole blocks, never padding: :mod:`qstore.b64` cuts every
input into blocks and a short tail. Loads and stores of 48 bytes are masked,
so no kernel reads or writes outside its buffers. The IR is compiled once per
process with :mod:`qstore._simd`'s helper (llvmlite) for the host
CPU and called through ctypes, which releases the GIL.

Hazmat: the functions take raw addresses and trust the lengths;
:mod:`qstore.b64` is the checked wrapper.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

from qstore import _simd

ENCODE_IN = 48  # bytes per encode block
ENCODE_OUT = 64  # characters per encode block (= DECODE_IN)
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_ENCODE_PROTO = ctypes.CFUNCTYPE(None, _ptr, _i64, _ptr)
_DECODE_PROTO = ctypes.CFUNCTYPE(_i64, _ptr, _i64, _ptr)
_V = "<64 x i8>"


@dataclass(frozen=True)
class Kernels:
    """``encode(src, nblocks, dst)``: 48 * nblocks bytes to 64 * nblocks characters.

    ``decode(src, nblocks, dst) -> done``: 64 * nblocks characters to 48 *
    nblocks bytes; ``done`` < nblocks when block ``done`` holds a character
    outside the alphabet (blocks after it are not written).
    """

    name: str
    encode: ctypes._CFuncPtr  # type: ignore[name-defined]
    decode: ctypes._CFuncPtr  # type: ignore[name-defined]


def available() -> list[str]:
    """Base64 kernels this CPU can run, best first."""
    return ["vbmi512"] if _simd._has("avx512vbmi", "avx512bw", "avx512f") else []


def _bytes(values: list[int]) -> str:
    return f"<{', '.join(f'i8 {v}' for v in values)}>"


def _mask(values: list[int]) -> str:
    return f"<{', '.join(f'i32 {v}' for v in values)}>"


def _lanes48() -> str:
    return f"<{', '.join(['i1 true'] * ENCODE_IN + ['i1 false'] * (64 - ENCODE_IN))}>"


def _decode_table() -> list[int]:
    table = [0x80] * 128
    for value, char in enumerate(ALPHABET):
        table[char] = value
    return table


def _ir() -> tuple[str, str]:
    """The IR of the encode and the decode kernel (one module each), one 64-byte vector per step."""
    # Encode: lane i (4 bytes) of the shuffled vector is [b1, b0, b2, b1] of input group i.
    spread = [3 * (j // 4) + (1, 0, 2, 1)[j % 4] for j in range(64)]
    # Byte k of each 64-bit lane takes the 8 bits from this bit offset; the
    # alphabet lookup then uses its low 6 bits.
    shifts = [10, 4, 22, 16, 42, 36, 54, 48] * 8
    # Decode: the 24-bit group of lane i is little-endian in bytes 4i..4i+2.
    pack = [4 * (j // 3) + 2 - j % 3 for j in range(ENCODE_IN)] + [0] * (64 - ENCODE_IN)
    table = _decode_table()
    lo, hi = _bytes(table[:64]), _bytes(table[64:])
    madd1 = _bytes([0x40, 0x01] * 32)  # c0 * 64 + c1 per pair of characters
    madd2 = f"<{', '.join(['i16 4096', 'i16 1'] * 16)}>"  # p0 * 4096 + p1 per pair of pairs
    decls = f"""
declare {_V} @llvm.x86.avx512.permvar.qi.512({_V}, {_V})
declare {_V} @llvm.x86.avx512.pmultishift.qb.512({_V}, {_V})
declare {_V} @llvm.x86.avx512.vpermi2var.qi.512({_V}, {_V}, {_V})
declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512({_V}, {_V})
declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)
declare {_V} @llvm.masked.load.v64i8.p0(ptr, i32, <64 x i1>, {_V})
declare void @llvm.masked.store.v64i8.p0({_V}, ptr, i32, <64 x i1>)
"""
    encode = f"""
define void @b64encode(ptr noalias %src, i64 %n, ptr noalias %dst) {{
entry:
  %any = icmp sgt i64 %n, 0
  br i1 %any, label %loop, label %exit
loop:
  %i = phi i64 [0, %entry], [%i.next, %loop]
  %soff = mul i64 %i, {ENCODE_IN}
  %sp = getelementptr i8, ptr %src, i64 %soff
  %in = call {_V} @llvm.masked.load.v64i8.p0(ptr %sp, i32 1, <64 x i1> {_lanes48()}, {_V} zeroinitializer)
  %spread = shufflevector {_V} %in, {_V} poison, <64 x i32> {_mask(spread)}
  %idx = call {_V} @llvm.x86.avx512.pmultishift.qb.512({_V} {_bytes(shifts)}, {_V} %spread)
  %chars = call {_V} @llvm.x86.avx512.permvar.qi.512({_V} {_bytes(list(ALPHABET))}, {_V} %idx)
  %doff = mul i64 %i, 64
  %dp = getelementptr i8, ptr %dst, i64 %doff
  store {_V} %chars, ptr %dp, align 1
  %i.next = add i64 %i, 1
  %more = icmp slt i64 %i.next, %n
  br i1 %more, label %loop, label %exit
exit:
  ret void
}}
"""
    decode = f"""
define i64 @b64decode(ptr noalias %src, i64 %n, ptr noalias %dst) {{
entry:
  %any = icmp sgt i64 %n, 0
  br i1 %any, label %loop, label %exit
loop:
  %i = phi i64 [0, %entry], [%i.next, %store]
  %soff = mul i64 %i, 64
  %sp = getelementptr i8, ptr %src, i64 %soff
  %in = load {_V}, ptr %sp, align 1
  %val = call {_V} @llvm.x86.avx512.vpermi2var.qi.512({_V} {lo}, {_V} %in, {_V} {hi})
  %both = or {_V} %val, %in
  %neg = icmp slt {_V} %both, zeroinitializer
  %bits = bitcast <64 x i1> %neg to i64
  %bad = icmp ne i64 %bits, 0
  br i1 %bad, label %exit, label %store
store:
  %pairs = call <32 x i16> @llvm.x86.avx512.pmaddubs.w.512({_V} %val, {_V} {madd1})
  %quads = call <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16> %pairs, <32 x i16> {madd2})
  %qb = bitcast <16 x i32> %quads to {_V}
  %packed = shufflevector {_V} %qb, {_V} poison, <64 x i32> {_mask(pack)}
  %doff = mul i64 %i, {ENCODE_IN}
  %dp = getelementptr i8, ptr %dst, i64 %doff
  call void @llvm.masked.store.v64i8.p0({_V} %packed, ptr %dp, i32 1, <64 x i1> {_lanes48()})
  %i.next = add i64 %i, 1
  %more = icmp slt i64 %i.next, %n
  br i1 %more, label %loop, label %exit
exit:
  %done = phi i64 [0, %entry], [%i, %loop], [%n, %store]
  ret i64 %done
}}
"""
    return decls + encode, decls + decode


@cache
def compile_kernels(name: str) -> Kernels:
    """Compile (once per process) the named base64 kernels for the host CPU."""
    if name not in available():
        raise ValueError(f"this CPU cannot run the {name} base64 kernels")
    encode_ir, decode_ir = _ir()
    return Kernels(name=name, encode=_ENCODE_PROTO(_simd._jit(encode_ir, "b64encode")),
                   decode=_DECODE_PROTO(_simd._jit(decode_ir, "b64decode")))
