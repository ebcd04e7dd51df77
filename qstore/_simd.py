"""Machine-code kernels for GF(2^8) linear maps, generated as LLVM IR.

The kernel computes, for every byte position p,
``dst[o][p] = XOR_i coef[o * n_in + i] * src[i][p]`` in GF(2^8) mod 0x11B.
Two instruction sets do the multiplication by a broadcast constant:

* ``gfni``: ``vgf2p8mulb`` multiplies 16/32/64 byte pairs in exactly our
  field (the AES polynomial) in one instruction.
* ``avx2``: the split-nibble method of ISA-L and zfec: two 16-entry lookup
  tables per constant, applied with ``vpshufb`` to the low and high nibbles.

The IR is text built here and compiled once per process by llvmlite (the
LLVM binding numba is built on) for the host CPU; the function is called
through ctypes with arrays of row addresses, so no Python runs per byte or
per vector. U vectors are kept in registers per pass (outputs are written
once, each source vector is loaded once per output), and the caller handles
the last ``len % (U * W)`` bytes with numpy tables.

Hazmat: the functions take raw addresses. :class:`qstore.linmap.LinearMap`
is the checked wrapper; nothing else should call these.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import numpy as np

from qstore import gf256

UNROLL = 8

_ARGS = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
_PROTO = ctypes.CFUNCTYPE(None, *_ARGS)


@dataclass(frozen=True)
class Kernel:
    """A compiled kernel: ``fn(srcs, dsts, coef, n_in, n_out, n_groups)``.

    ``srcs``/``dsts`` are addresses of int64 arrays of row addresses, ``coef``
    the address of the coefficient bytes (the avx2 kernel wants the
    address of a (n_out * n_in, 32) table array instead, see
    :func:`nibble_tables`). One group is ``width * UNROLL`` bytes.
    """

    name: str
    width: int
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]
    group: int


@cache
def _features() -> dict[str, bool]:
    import llvmlite.binding as llvm

    return {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}


def available() -> list[str]:
    """Kernels this CPU can run, best first."""
    try:
        f = _features()
    except (ImportError, RuntimeError):  # no llvmlite, or no usable host target: numpy only
        return []
    names = []
    if f.get("gfni") and f.get("avx512bw"):
        names.append("gfni512")
    if f.get("gfni") and f.get("avx"):
        names.append("gfni256")
    if f.get("avx2"):
        names.append("avx2")
    return names


def _mul_gfni(width: int, s: str, c: str, out: str) -> str:
    v = f"<{width} x i8>"
    return f"  {out} = call {v} @llvm.x86.vgf2p8mulb.{width * 8}({v} {s}, {v} {c})\n"


def _ir(name: str, width: int, streaming: bool) -> str:
    """IR of one kernel. ``width`` is bytes per vector; ``streaming`` stores
    bypass the cache (the outputs are many and not read back soon), which
    needs destinations aligned to ``width``."""
    v = f"<{width} x i8>"
    gfni = name.startswith("gfni")
    decl = (
        f"declare {v} @llvm.x86.vgf2p8mulb.{width * 8}({v}, {v})\n"
        if gfni
        else f"declare {v} @llvm.x86.avx2.pshuf.b({v}, {v})\n"
    )
    group = width * UNROLL
    lines = [decl]
    lines.append(
        "define void @kernel(ptr noalias %srcs, ptr noalias %dsts, ptr noalias %coef, "
        "i64 %nin, i64 %nout, i64 %ngroups) {\n"
        "entry:\n"
        "  %any = icmp ugt i64 %ngroups, 0\n"
        "  br i1 %any, label %gloop, label %exit\n"
        "gloop:\n"
        "  %g = phi i64 [0, %entry], [%g.next, %glatch]\n"
        f"  %off = mul i64 %g, {group}\n"
        "  br label %oloop\n"
        "oloop:\n"
        "  %o = phi i64 [0, %gloop], [%o.next, %olatch]\n"
        "  %crow = mul i64 %o, %nin\n"
        "  br label %iloop\n"
        "iloop:\n"
        "  %i = phi i64 [0, %oloop], [%i.next, %iloop]\n"
    )
    for u in range(UNROLL):
        lines.append(f"  %acc{u} = phi {v} [zeroinitializer, %oloop], [%acc{u}.next, %iloop]\n")
    lines.append(
        "  %sp.addr = getelementptr ptr, ptr %srcs, i64 %i\n"
        "  %sp = load ptr, ptr %sp.addr\n"
        "  %sbase = getelementptr i8, ptr %sp, i64 %off\n"
        "  %ci = add i64 %crow, %i\n"
    )
    if gfni:
        lines.append(
            "  %cp = getelementptr i8, ptr %coef, i64 %ci\n"
            "  %c = load i8, ptr %cp\n"
            f"  %cv0 = insertelement {v} poison, i8 %c, i64 0\n"
            f"  %cv = shufflevector {v} %cv0, {v} poison, <{width} x i32> zeroinitializer\n"
        )
    else:
        # 32-byte rows of the table: 16 low-nibble products, 16 high-nibble products.
        lines.append(
            "  %tofs = mul i64 %ci, 32\n"
            "  %tp = getelementptr i8, ptr %coef, i64 %tofs\n"
            "  %tlo16 = load <16 x i8>, ptr %tp, align 1\n"
            "  %tp2 = getelementptr i8, ptr %tp, i64 16\n"
            "  %thi16 = load <16 x i8>, ptr %tp2, align 1\n"
            f"  %tlo = shufflevector <16 x i8> %tlo16, <16 x i8> poison, <{width} x i32> "
            f"<{', '.join(f'i32 {j % 16}' for j in range(width))}>\n"
            f"  %thi = shufflevector <16 x i8> %thi16, <16 x i8> poison, <{width} x i32> "
            f"<{', '.join(f'i32 {j % 16}' for j in range(width))}>\n"
        )
        mask = f"<{', '.join(['i8 15'] * width)}>"
        four = f"<{', '.join(['i16 4'] * (width // 2))}>"
    for u in range(UNROLL):
        lines.append(
            f"  %sa{u} = getelementptr i8, ptr %sbase, i64 {u * width}\n"
            f"  %s{u} = load {v}, ptr %sa{u}, align 1\n"
        )
        if gfni:
            lines.append(_mul_gfni(width, f"%s{u}", "%cv", f"%p{u}"))
        else:
            lines.append(
                f"  %lo{u} = and {v} %s{u}, {mask}\n"
                f"  %w{u} = bitcast {v} %s{u} to <{width // 2} x i16>\n"
                f"  %ws{u} = lshr <{width // 2} x i16> %w{u}, {four}\n"
                f"  %hb{u} = bitcast <{width // 2} x i16> %ws{u} to {v}\n"
                f"  %hi{u} = and {v} %hb{u}, {mask}\n"
                f"  %pl{u} = call {v} @llvm.x86.avx2.pshuf.b({v} %tlo, {v} %lo{u})\n"
                f"  %ph{u} = call {v} @llvm.x86.avx2.pshuf.b({v} %thi, {v} %hi{u})\n"
                f"  %p{u} = xor {v} %pl{u}, %ph{u}\n"
            )
        lines.append(f"  %acc{u}.next = xor {v} %acc{u}, %p{u}\n")
    lines.append(
        "  %i.next = add i64 %i, 1\n"
        "  %i.more = icmp ult i64 %i.next, %nin\n"
        "  br i1 %i.more, label %iloop, label %olatch\n"
        "olatch:\n"
        "  %dp.addr = getelementptr ptr, ptr %dsts, i64 %o\n"
        "  %dp = load ptr, ptr %dp.addr\n"
        "  %dbase = getelementptr i8, ptr %dp, i64 %off\n"
    )
    store = f"align {width}, !nontemporal !0" if streaming else "align 1"
    for u in range(UNROLL):
        lines.append(
            f"  %da{u} = getelementptr i8, ptr %dbase, i64 {u * width}\n"
            f"  store {v} %acc{u}.next, ptr %da{u}, {store}\n"
        )
    lines.append(
        "  %o.next = add i64 %o, 1\n"
        "  %o.more = icmp ult i64 %o.next, %nout\n"
        "  br i1 %o.more, label %oloop, label %glatch\n"
        "glatch:\n"
        "  %g.next = add i64 %g, 1\n"
        "  %g.more = icmp ult i64 %g.next, %ngroups\n"
        "  br i1 %g.more, label %gloop, label %exit\n"
        "exit:\n"
        "  ret void\n"
        "}\n"
        "!0 = !{i32 1}\n"
    )
    return "".join(lines)


_WIDTH = {"gfni512": 64, "gfni256": 32, "avx2": 32}
_ENGINES: list[object] = []  # compiled code lives as long as its engine


@cache
def compile_kernel(name: str, streaming: bool = False) -> Kernel:
    """Compile (once per process) the named kernel for the host CPU.

    With ``streaming`` the destinations must be aligned to the kernel's width.
    """
    if name not in _WIDTH:
        raise ValueError(f"unknown kernel {name!r}")
    if name not in available():
        raise ValueError(f"this CPU cannot run the {name} kernel")
    width = _WIDTH[name]
    fn = _PROTO(_jit(_ir(name, width, streaming), "kernel"))
    return Kernel(name=name, width=width, fn=fn, group=width * UNROLL)


def nibble_tables(coef: np.ndarray) -> np.ndarray:
    """(len(coef), 32) tables for the avx2 kernel: c * (0..15) and c * (0..15) << 4."""
    nib = np.arange(16, dtype=np.intp)
    c = coef.astype(np.intp)[:, None]
    return np.ascontiguousarray(np.concatenate([gf256.MUL[c, nib], gf256.MUL[c, nib << 4]], axis=1))


# --- AES-256 in counter mode -------------------------------------------------
#
# The coefficient generator (qstore.rng.AesCtrRandom) needs several GB/s of
# keystream; OpenSSL gives about 5.8 GB/s here but holds the GIL, so it
# cannot overlap the sharing kernel. This is the same AES-256-CTR keystream
# (counter block = 8 zero bytes || 64-bit big-endian block number, exactly
# what `cryptography`'s CTR mode produces from an all-zero IV) computed with
# AES-NI / VAES, called with the GIL released. Tests compare it with
# OpenSSL's output.

AES_UNROLL = 4
_ROUNDS = 14


@dataclass(frozen=True)
class AesKernel:
    """``fn(out, nvec, round_keys, first_block)``: nvec * lanes blocks of keystream."""

    name: str
    lanes: int
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]


_AES_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def aes_available() -> list[str]:
    """AES kernels this CPU can run, best first."""
    try:
        f = _features()
    except (ImportError, RuntimeError):
        return []
    names = []
    if f.get("vaes") and f.get("avx512f"):
        names.append("vaes512")
    if f.get("aes"):
        names.append("aesni")
    return names


def _aes_ir(lanes: int) -> str:
    n = 2 * lanes
    v = f"<{n} x i64>"
    suffix = ".512" if lanes == 4 else ""
    out = [
        f"declare {v} @llvm.x86.aesni.aesenc{suffix}({v}, {v})\n",
        f"declare {v} @llvm.x86.aesni.aesenclast{suffix}({v}, {v})\n",
        f"declare {v} @llvm.bswap.v{n}i64({v})\n",
        "define void @aesctr(ptr noalias %out, i64 %nvec, ptr noalias %rk, i64 %ctr0) {\n",
        "entry:\n",
    ]
    bcast = f"<{n} x i32> <{', '.join(f'i32 {j % 2}' for j in range(n))}>"
    for r in range(_ROUNDS + 1):
        out.append(
            f"  %rkp{r} = getelementptr i8, ptr %rk, i64 {16 * r}\n"
            f"  %rk2_{r} = load <2 x i64>, ptr %rkp{r}, align 1\n"
            f"  %k{r} = shufflevector <2 x i64> %rk2_{r}, <2 x i64> poison, {bcast}\n"
        )
    step = lanes * AES_UNROLL
    out.append(
        f"  %nmain = udiv i64 %nvec, {AES_UNROLL}\n"
        "  %anymain = icmp ugt i64 %nmain, 0\n"
        "  br i1 %anymain, label %main, label %mainexit\n"
    )

    def body(label: str, unroll: int, counter: str, offset: str) -> None:
        for u in range(unroll):
            pre = f"%{label}{u}"
            out.append(f"  {pre}c = add i64 {counter}, {u * lanes}\n")
            prev = "zeroinitializer"
            for lane in range(lanes):
                out.append(f"  {pre}l{lane} = add i64 {pre}c, {lane}\n")
                # Odd i64 of each block: the big-endian block number (after bswap).
                elem = f"i64 {pre}l{lane}, i64 {2 * lane + 1}"
                out.append(f"  {pre}i{lane} = insertelement {v} {prev}, {elem}\n")
                prev = f"{pre}i{lane}"
            out.append(f"  {pre}b = call {v} @llvm.bswap.v{n}i64({v} {prev})\n")
            out.append(f"  {pre}x0 = xor {v} {pre}b, %k0\n")
        for r in range(1, _ROUNDS + 1):
            fn = "aesenclast" if r == _ROUNDS else "aesenc"
            for u in range(unroll):
                pre = f"%{label}{u}"
                call = f"@llvm.x86.aesni.{fn}{suffix}({v} {pre}x{r - 1}, {v} %k{r})"
                out.append(f"  {pre}x{r} = call {v} {call}\n")
        for u in range(unroll):
            pre = f"%{label}{u}"
            out.append(
                f"  {pre}o = add i64 {offset}, {u * lanes * 16}\n"
                f"  {pre}p = getelementptr i8, ptr %out, i64 {pre}o\n"
                f"  store {v} {pre}x{_ROUNDS}, ptr {pre}p, align 1\n"
            )

    out.append(
        "main:\n"
        "  %m = phi i64 [0, %entry], [%m.next, %main]\n"
        f"  %mblk = mul i64 %m, {step}\n"
        "  %mctr = add i64 %ctr0, %mblk\n"
        "  %moff = mul i64 %mblk, 16\n"
    )
    body("a", AES_UNROLL, "%mctr", "%moff")
    out.append(
        "  %m.next = add i64 %m, 1\n"
        "  %m.more = icmp ult i64 %m.next, %nmain\n"
        "  br i1 %m.more, label %main, label %mainexit\n"
        "mainexit:\n"
        f"  %done = mul i64 %nmain, {AES_UNROLL}\n"
        "  %anyrest = icmp ult i64 %done, %nvec\n"
        "  br i1 %anyrest, label %rest, label %exit\n"
        "rest:\n"
        "  %t = phi i64 [%done, %mainexit], [%t.next, %rest]\n"
        f"  %tblk = mul i64 %t, {lanes}\n"
        "  %tctr = add i64 %ctr0, %tblk\n"
        "  %toff = mul i64 %tblk, 16\n"
    )
    body("b", 1, "%tctr", "%toff")
    out.append(
        "  %t.next = add i64 %t, 1\n"
        "  %t.more = icmp ult i64 %t.next, %nvec\n"
        "  br i1 %t.more, label %rest, label %exit\n"
        "exit:\n"
        "  ret void\n"
        "}\n"
    )
    return "".join(out)


def _jit(ir: str, symbol: str) -> int:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(ir)
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    _ENGINES.append(engine)
    return engine.get_function_address(symbol)


@cache
def compile_aes(name: str) -> AesKernel:
    """Compile (once per process) the named AES-CTR kernel for the host CPU."""
    lanes = {"vaes512": 4, "aesni": 1}.get(name)
    if lanes is None or name not in aes_available():
        raise ValueError(f"this CPU cannot run the {name} AES kernel")
    return AesKernel(name=name, lanes=lanes, fn=_AES_PROTO(_jit(_aes_ir(lanes), "aesctr")))
