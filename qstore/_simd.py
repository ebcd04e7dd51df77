"""Machine-code kernels for GF(2^8) linear maps and AES-CTR, generated as LLVM IR.

The linear-map kernel computes, for every byte position p,
``dst[o][p] = XOR_i coef[o * n_in + i] * src[i][p]`` in GF(2^8) mod 0x11B.
Two instruction sets do the multiplication by a broadcast constant:

* ``gfni``: ``vgf2p8mulb`` multiplies 32 or 64 byte pairs in exactly our
  field (the AES polynomial) in one instruction;
* ``avx2``: the split-nibble method of ISA-L and zfec: two 16-entry lookup
  tables per constant, applied with ``vpshufb`` to the low and high nibbles.

Work goes in groups of :data:`GROUP` bytes kept in registers: each output
is written once per group, each source vector loaded once per output.
Sources that are random coefficients are not read from memory: the kernel
generates them per group with AES-256-CTR (AES-NI or VAES) into a small
scratch buffer that stays in L1, so randomness and arithmetic overlap and
no coefficient ever reaches main memory. Random source r of group g is the
keystream at byte ``(g * n_rand + r) * GROUP`` (see :mod:`qstore.rng`).

The IR is text built here and compiled once per process by llvmlite (the
LLVM binding numba is built on) for the host CPU; functions are called
through ctypes (which releases the GIL) with arrays of row addresses, so no
Python runs per byte or per vector.

Hazmat: the functions take raw addresses. :class:`qstore.linmap.LinearMap`
and :class:`qstore.rng.AesCtrRandom` are the checked wrappers; nothing else
should call these.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import numpy as np

from qstore import gf256

GROUP = 512  # bytes per source per kernel step; also the unit of the coefficient stream layout
AES_ROUNDS = 14
AES_UNROLL = 4  # independent AES vectors in flight in the stand-alone keystream loop

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_MAP_PROTO = ctypes.CFUNCTYPE(None, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64)
_AES_PROTO = ctypes.CFUNCTYPE(None, _ptr, _i64, _ptr, _i64)
_WIDTH = {"gfni512": 64, "gfni256": 32, "avx2": 32}
_LANES = {"vaes512": 4, "aesni": 1}
_ENGINES: list[object] = []  # compiled code lives as long as its engine


@dataclass(frozen=True)
class Kernel:
    """A compiled linear map.

    ``fn(srcs, strides, dsts, coef, n_in, n_out, n_groups, scratch, n_rand, round_keys, first_block)``:
    source i of group g is read at ``srcs[i] + g * strides[i]`` (stride 0 with
    a scratch row for random sources); with ``n_rand`` > 0 the kernel first
    writes the keystream of the group's random sources into ``scratch``
    (n_rand * GROUP bytes). ``coef`` is the coefficient bytes, or for avx2 the
    (n_out * n_in, 32) table array of :func:`nibble_tables`.
    """

    name: str
    width: int
    aes: str | None
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]


@dataclass(frozen=True)
class AesKernel:
    """``fn(out, nvec, round_keys, first_block)``: nvec * lanes blocks of keystream."""

    name: str
    lanes: int
    fn: ctypes._CFuncPtr  # type: ignore[name-defined]


@cache
def _features() -> dict[str, bool]:
    import llvmlite.binding as llvm

    return {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}


def _has(*names: str) -> bool:
    try:
        f = _features()
    except (ImportError, RuntimeError):  # no llvmlite, or no usable host target
        return False
    return all(f.get(n) for n in names)


def available() -> list[str]:
    """Linear-map kernels this CPU can run, best first."""
    wanted = {"gfni512": ("gfni", "avx512bw"), "gfni256": ("gfni", "avx"), "avx2": ("avx2",)}
    return [name for name, feats in wanted.items() if _has(*feats)]


def aes_available() -> list[str]:
    """AES kernels this CPU can run, best first."""
    wanted = {"vaes512": ("vaes", "avx512f"), "aesni": ("aes",)}
    return [name for name, feats in wanted.items() if _has(*feats)]


# --- IR pieces -----------------------------------------------------------------


def _aes_decls(lanes: int) -> str:
    n = 2 * lanes
    v = f"<{n} x i64>"
    sfx = ".512" if lanes == 4 else ""
    return (
        f"declare {v} @llvm.x86.aesni.aesenc{sfx}({v}, {v})\n"
        f"declare {v} @llvm.x86.aesni.aesenclast{sfx}({v}, {v})\n"
        f"declare {v} @llvm.bswap.v{n}i64({v})\n"
    )


def _aes_round_keys(lanes: int) -> str:
    """Load the 15 round keys from %rk, each broadcast to every lane."""
    n = 2 * lanes
    mask = f"<{n} x i32> <{', '.join(f'i32 {j % 2}' for j in range(n))}>"
    return "".join(
        f"  %rkp{r} = getelementptr i8, ptr %rk, i64 {16 * r}\n"
        f"  %rk2_{r} = load <2 x i64>, ptr %rkp{r}, align 1\n"
        f"  %k{r} = shufflevector <2 x i64> %rk2_{r}, <2 x i64> poison, {mask}\n"
        for r in range(AES_ROUNDS + 1)
    )


def _aes_blocks(tag: str, lanes: int, nvec: int, counter: str, outptr: str) -> str:
    """Keystream of nvec vectors (lanes blocks each) from block number ``counter`` to ``outptr``.

    A counter block is 8 zero bytes then the 64-bit big-endian block number:
    OpenSSL's CTR with an all-zero IV (for fewer than 2^64 blocks).
    """
    n = 2 * lanes
    v = f"<{n} x i64>"
    sfx = ".512" if lanes == 4 else ""
    out = []
    for u in range(nvec):
        p = f"%{tag}{u}"
        prev = "zeroinitializer"
        for lane in range(lanes):
            out.append(f"  {p}n{lane} = add i64 {counter}, {u * lanes + lane}\n")
            out.append(f"  {p}i{lane} = insertelement {v} {prev}, i64 {p}n{lane}, i64 {2 * lane + 1}\n")
            prev = f"{p}i{lane}"
        out.append(f"  {p}b = call {v} @llvm.bswap.v{n}i64({v} {prev})\n")
        out.append(f"  {p}x0 = xor {v} {p}b, %k0\n")
    for r in range(1, AES_ROUNDS + 1):
        fn = "aesenclast" if r == AES_ROUNDS else "aesenc"
        for u in range(nvec):
            p = f"%{tag}{u}"
            out.append(f"  {p}x{r} = call {v} @llvm.x86.aesni.{fn}{sfx}({v} {p}x{r - 1}, {v} %k{r})\n")
    for u in range(nvec):
        p = f"%{tag}{u}"
        out.append(
            f"  {p}p = getelementptr i8, ptr {outptr}, i64 {u * lanes * 16}\n"
            f"  store {v} {p}x{AES_ROUNDS}, ptr {p}p, align 1\n"
        )
    return "".join(out)


def _map_ir(name: str, streaming: bool, aes: str | None) -> str:
    """IR of a linear-map kernel; ``streaming`` stores bypass the cache and
    need destinations aligned to the vector width."""
    width = _WIDTH[name]
    unroll = GROUP // width
    v = f"<{width} x i8>"
    gfni = name.startswith("gfni")
    out = [
        f"declare {v} @llvm.x86.vgf2p8mulb.{width * 8}({v}, {v})\n"
        if gfni
        else f"declare {v} @llvm.x86.avx2.pshuf.b({v}, {v})\n"
    ]
    if aes:
        out.append(_aes_decls(_LANES[aes]))
    out.append(
        "define void @kernel(ptr noalias %srcs, ptr noalias %strides, ptr noalias %dsts, ptr noalias %coef, "
        "i64 %nin, i64 %nout, i64 %ngroups, ptr noalias %scratch, i64 %nrand, ptr noalias %rk, i64 %ctr0) {\n"
        "entry:\n"
    )
    if aes:
        out.append(_aes_round_keys(_LANES[aes]))
    out.append(
        "  %any = icmp ugt i64 %ngroups, 0\n"
        "  br i1 %any, label %gloop, label %exit\n"
        "gloop:\n"
        "  %g = phi i64 [0, %entry], [%g.next, %glatch]\n"
        f"  %off = mul i64 %g, {GROUP}\n"
    )
    if aes:
        lanes = _LANES[aes]
        out.append(
            "  %hasrand = icmp ugt i64 %nrand, 0\n"
            "  br i1 %hasrand, label %rloop, label %oloop.pre\n"
            "rloop:\n"
            "  %r = phi i64 [0, %gloop], [%r.next, %rloop]\n"
            "  %gr = mul i64 %g, %nrand\n"
            "  %gr2 = add i64 %gr, %r\n"
            f"  %rctr0 = mul i64 %gr2, {GROUP // 16}\n"
            "  %rctr = add i64 %ctr0, %rctr0\n"
            f"  %roff = mul i64 %r, {GROUP}\n"
            "  %rout = getelementptr i8, ptr %scratch, i64 %roff\n"
        )
        out.append(_aes_blocks("ks", lanes, GROUP // (16 * lanes), "%rctr", "%rout"))
        out.append(
            "  %r.next = add i64 %r, 1\n"
            "  %r.more = icmp ult i64 %r.next, %nrand\n"
            "  br i1 %r.more, label %rloop, label %oloop.pre\n"
        )
    else:
        out.append("  br label %oloop.pre\n")
    out.append(
        "oloop.pre:\n"
        "  br label %oloop\n"
        "oloop:\n"
        "  %o = phi i64 [0, %oloop.pre], [%o.next, %olatch]\n"
        "  %crow = mul i64 %o, %nin\n"
        "  br label %iloop\n"
        "iloop:\n"
        "  %i = phi i64 [0, %oloop], [%i.next, %iloop]\n"
    )
    for u in range(unroll):
        out.append(f"  %acc{u} = phi {v} [zeroinitializer, %oloop], [%acc{u}.next, %iloop]\n")
    out.append(
        "  %sp.addr = getelementptr ptr, ptr %srcs, i64 %i\n"
        "  %sp = load ptr, ptr %sp.addr\n"
        "  %st.addr = getelementptr i64, ptr %strides, i64 %i\n"
        "  %st = load i64, ptr %st.addr\n"
        "  %soff = mul i64 %g, %st\n"
        "  %sbase = getelementptr i8, ptr %sp, i64 %soff\n"
        "  %ci = add i64 %crow, %i\n"
    )
    if gfni:
        out.append(
            "  %cp = getelementptr i8, ptr %coef, i64 %ci\n"
            "  %c = load i8, ptr %cp\n"
            f"  %cv0 = insertelement {v} poison, i8 %c, i64 0\n"
            f"  %cv = shufflevector {v} %cv0, {v} poison, <{width} x i32> zeroinitializer\n"
        )
    else:
        rep = f"<{width} x i32> <{', '.join(f'i32 {j % 16}' for j in range(width))}>"
        out.append(
            "  %tofs = mul i64 %ci, 32\n"
            "  %tp = getelementptr i8, ptr %coef, i64 %tofs\n"
            "  %tlo16 = load <16 x i8>, ptr %tp, align 1\n"
            "  %tp2 = getelementptr i8, ptr %tp, i64 16\n"
            "  %thi16 = load <16 x i8>, ptr %tp2, align 1\n"
            f"  %tlo = shufflevector <16 x i8> %tlo16, <16 x i8> poison, {rep}\n"
            f"  %thi = shufflevector <16 x i8> %thi16, <16 x i8> poison, {rep}\n"
        )
        mask = f"<{', '.join(['i8 15'] * width)}>"
        four = f"<{', '.join(['i16 4'] * (width // 2))}>"
    for u in range(unroll):
        out.append(
            f"  %sa{u} = getelementptr i8, ptr %sbase, i64 {u * width}\n"
            f"  %s{u} = load {v}, ptr %sa{u}, align 1\n"
        )
        if gfni:
            out.append(f"  %p{u} = call {v} @llvm.x86.vgf2p8mulb.{width * 8}({v} %s{u}, {v} %cv)\n")
        else:
            out.append(
                f"  %lo{u} = and {v} %s{u}, {mask}\n"
                f"  %w{u} = bitcast {v} %s{u} to <{width // 2} x i16>\n"
                f"  %ws{u} = lshr <{width // 2} x i16> %w{u}, {four}\n"
                f"  %hb{u} = bitcast <{width // 2} x i16> %ws{u} to {v}\n"
                f"  %hi{u} = and {v} %hb{u}, {mask}\n"
                f"  %pl{u} = call {v} @llvm.x86.avx2.pshuf.b({v} %tlo, {v} %lo{u})\n"
                f"  %ph{u} = call {v} @llvm.x86.avx2.pshuf.b({v} %thi, {v} %hi{u})\n"
                f"  %p{u} = xor {v} %pl{u}, %ph{u}\n"
            )
        out.append(f"  %acc{u}.next = xor {v} %acc{u}, %p{u}\n")
    out.append(
        "  %i.next = add i64 %i, 1\n"
        "  %i.more = icmp ult i64 %i.next, %nin\n"
        "  br i1 %i.more, label %iloop, label %olatch\n"
        "olatch:\n"
        "  %dp.addr = getelementptr ptr, ptr %dsts, i64 %o\n"
        "  %dp = load ptr, ptr %dp.addr\n"
        "  %dbase = getelementptr i8, ptr %dp, i64 %off\n"
    )
    store = f"align {width}, !nontemporal !0" if streaming else "align 1"
    for u in range(unroll):
        out.append(
            f"  %da{u} = getelementptr i8, ptr %dbase, i64 {u * width}\n"
            f"  store {v} %acc{u}.next, ptr %da{u}, {store}\n"
        )
    out.append(
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
    return "".join(out)


def _aes_ir(lanes: int) -> str:
    """Stand-alone keystream: nvec vectors from block ctr0, AES_UNROLL at a time."""
    step = lanes * AES_UNROLL
    return "".join([
        _aes_decls(lanes),
        "define void @aesctr(ptr noalias %out, i64 %nvec, ptr noalias %rk, i64 %ctr0) {\n",
        "entry:\n",
        _aes_round_keys(lanes),
        f"  %nmain = udiv i64 %nvec, {AES_UNROLL}\n"
        "  %anymain = icmp ugt i64 %nmain, 0\n"
        "  br i1 %anymain, label %main, label %mainexit\n"
        "main:\n"
        "  %m = phi i64 [0, %entry], [%m.next, %main]\n"
        f"  %mblk = mul i64 %m, {step}\n"
        "  %mctr = add i64 %ctr0, %mblk\n"
        "  %moff = mul i64 %mblk, 16\n"
        "  %mout = getelementptr i8, ptr %out, i64 %moff\n",
        _aes_blocks("a", lanes, AES_UNROLL, "%mctr", "%mout"),
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
        "  %tout = getelementptr i8, ptr %out, i64 %toff\n",
        _aes_blocks("b", lanes, 1, "%tctr", "%tout"),
        "  %t.next = add i64 %t, 1\n"
        "  %t.more = icmp ult i64 %t.next, %nvec\n"
        "  br i1 %t.more, label %rest, label %exit\n"
        "exit:\n"
        "  ret void\n"
        "}\n",
    ])


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
def compile_kernel(name: str, streaming: bool = False, aes: str | None = None) -> Kernel:
    """Compile (once per process) a linear-map kernel for the host CPU.

    With ``streaming`` the destinations must be aligned to the kernel's width;
    with ``aes`` (a name from :func:`aes_available`) it can generate random
    sources itself.
    """
    if name not in available():
        raise ValueError(f"this CPU cannot run the {name} kernel")
    if aes is not None and aes not in aes_available():
        raise ValueError(f"this CPU cannot run the {aes} AES kernel")
    fn = _MAP_PROTO(_jit(_map_ir(name, streaming, aes), "kernel"))
    return Kernel(name=name, width=_WIDTH[name], aes=aes, fn=fn)


@cache
def compile_aes(name: str) -> AesKernel:
    """Compile (once per process) the named AES-CTR kernel for the host CPU."""
    if name not in aes_available():
        raise ValueError(f"this CPU cannot run the {name} AES kernel")
    lanes = _LANES[name]
    return AesKernel(name=name, lanes=lanes, fn=_AES_PROTO(_jit(_aes_ir(lanes), "aesctr")))


def nibble_tables(coef: np.ndarray) -> np.ndarray:
    """(len(coef), 32) tables for the avx2 kernel: c * (0..15) and c * (0..15) << 4."""
    nib = np.arange(16, dtype=np.intp)
    c = coef.astype(np.intp)[:, None]
    return np.ascontiguousarray(np.concatenate([gf256.MUL[c, nib], gf256.MUL[c, nib << 4]], axis=1))
