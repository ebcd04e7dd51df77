"""Speed of the F_p kernels (qstore.field, p = 2^127 - 1) against their Python-integer references.

Every figure times one public function of :mod:`qstore.field` on uniform random field vectors
(``field.random``) and, in the same run, its ``_ref_*`` twin (exact Python integers in numpy
object arrays: what the field falls back to without llvmlite). The reference runs on fewer
elements where the full size would take too long (``reference_elements``); the comparison is
per element. Figures:

* ``add``, ``sub``, ``mul``, ``neg``, ``scale``, ``add_const``: elementwise, N elements;
* ``dot`` and ``total``: one row of N elements to one element;
* ``lincomb``: 5 vectors of N elements with random coefficients (Lagrange recombination), and
  ``lincomb_small``: the same with coefficients below 2^64 (polynomial evaluation at x = 1..9);
* ``sqrt`` (a^((p+1)/4), 125 squarings), ``power`` (a random 127-bit exponent), ``inverse``
  (Montgomery's batch inversion; its reference is a^(p-2), which is what the field did before);
* ``random`` (os.urandom), ``check``, ``from_ints`` (int64), ``to_ints`` and ``to_signed``
  (small values).

Each line: ``{"figure", "elements", "seconds", "per_element_ns", "reference_elements",
"reference_seconds", "reference_per_element_ns", "speedup"}`` plus ``target_per_element_ns`` and
``meets_target`` for the figures with a target (per element at N = 10^6: mul 10 ns, dot 5 ns,
lincomb 20 ns per output element, sqrt 1 µs, add 5 ns). Seconds are the best of ``--repeat``
runs after one untimed run (first touch of memory). The first line describes the environment,
how long compiling the kernels took and the load average (other processes on a small machine
inflate every figure); progress goes to stderr.

Run::

    python bench/field.py                # N = 10^6
    python bench/field.py --quick        # N = 2000, for a smoke test
    python bench/field.py --elements 100000 --repeat 9
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import cpu_model, emit, log, pkg_version

from qstore import field
from qstore.field import P

TARGET_NS = {"add": 5.0, "mul": 10.0, "dot": 5.0, "lincomb": 20.0, "sqrt": 1000.0}
REFERENCE_BUDGET_S = 3.0  # per reference figure, roughly


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def environment(n: int, repeats: int, compile_seconds: float) -> dict[str, Any]:
    return {
        "figure": "environment",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llvmlite": pkg_version("llvmlite"),
        "backend": field.backend(),
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "elements": n,
        "repeats": f"1 untimed + best of {repeats}",
        "compile_seconds": round(compile_seconds, 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


class Case:
    """One figure: the kernel on n elements, its reference on a prefix of them."""

    def __init__(self, name: str, fast: Callable[[int], Callable[[], object]],
                 ref: Callable[[int], Callable[[], object]] | None, ref_cost_ns: float):
        self.name, self.fast, self.ref, self.ref_cost_ns = name, fast, ref, ref_cost_ns


def cases(n: int) -> list[Case]:
    rng = np.random.default_rng()
    a, b = field.random(n), field.random(n)
    vecs = [field.random(n) for _ in range(5)]
    coefs = [int(c) for c in field.to_ints(field.random(5))]
    small = [pow(9, j) for j in range(5)]
    c = int(field.to_ints(field.random(1))[0])
    e = int(field.to_ints(field.random(1))[0])
    squares = field.mul(a, a)
    ints64 = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64, endpoint=True)
    signed = field.from_ints(rng.integers(-(10**9), 10**9, size=n))

    def pair(fn: Callable[[np.ndarray, np.ndarray], object]) -> Callable[[int], Callable[[], object]]:
        def make(m: int) -> Callable[[], object]:
            x, y = a[:m], b[:m]
            return lambda: fn(x, y)

        return make

    def one(fn: Callable[[np.ndarray], object], src: np.ndarray = a) -> Callable[[int], Callable[[], object]]:
        def make(m: int) -> Callable[[], object]:
            x = src[:m]
            return lambda: fn(x)

        return make

    def lin(cs: list[int], fn: Callable[..., object]) -> Callable[[int], Callable[[], object]]:
        def make(m: int) -> Callable[[], object]:
            vs = [v[:m] for v in vecs]
            return lambda: fn(cs, vs)

        return make

    def signed_ref(x: np.ndarray) -> object:
        o = field._objs(x)
        return np.where(o > P // 2, o - P, o).tolist()

    def objects_ref(x: np.ndarray) -> object:
        return field._from_objs(x.astype(object))

    sqrt_e = (P + 1) // 4
    return [
        Case("add", pair(field.add), pair(field._ref_add), 1500),
        Case("sub", pair(field.sub), pair(field._ref_sub), 1500),
        Case("mul", pair(field.mul), pair(field._ref_mul), 1500),
        Case("neg", one(field.neg), one(lambda x: field._ref_sub(field.zeros(x.shape[:-1]), x)), 1500),
        Case("scale", one(lambda x: field.scale(x, c)), one(lambda x: field._ref_scale(x, c)), 1500),
        Case("add_const", one(lambda x: field.add_const(x, c)),
             one(lambda x: field._ref_add(x, field.from_int(c, x.shape[:-1]))), 1500),
        Case("dot", pair(field.dot), pair(field._ref_dot), 1000),
        Case("total", one(field.total), one(field._ref_sum), 500),
        Case("lincomb", lin(coefs, field.lincomb), lin(coefs, field._ref_lincomb), 6000),
        Case("lincomb_small", lin(small, field.lincomb), lin(small, field._ref_lincomb), 6000),
        Case("sqrt", one(field.sqrt, squares), one(lambda x: field._ref_pow(x, sqrt_e), squares), 10000),
        Case("power", one(lambda x: field.power(x, e)), one(lambda x: field._ref_pow(x, e)), 10000),
        Case("inverse", one(field.inverse), one(lambda x: field._ref_pow(x, P - 2)), 10000),
        Case("random", lambda m: (lambda: field.random(m)), None, 0),
        Case("check", one(field.check), None, 0),
        Case("from_ints", one(field.from_ints, ints64), one(objects_ref, ints64), 500),
        Case("to_ints", one(field.to_ints), one(lambda x: field._objs(x).tolist()), 500),
        Case("to_signed", one(field.to_signed, signed), one(signed_ref, signed), 800),
    ]


def measure(case: Case, n: int, repeats: int, ref_cap: int) -> dict[str, Any]:
    seconds = best_of(case.fast(n), repeats)
    record: dict[str, Any] = {
        "figure": case.name,
        "elements": n,
        "seconds": round(seconds, 6),
        "per_element_ns": round(seconds / n * 1e9, 3),
    }
    if case.name.startswith("lincomb"):
        record["vectors"] = 5
    if case.ref is not None:
        m = min(n, ref_cap, max(64, int(REFERENCE_BUDGET_S / (case.ref_cost_ns * 1e-9) / (repeats + 1))))
        ref_seconds = best_of(case.ref(m), repeats=1 if case.ref_cost_ns * m > 1e9 else min(repeats, 3))
        ref_ns = ref_seconds / m * 1e9
        record.update({
            "reference_elements": m,
            "reference_seconds": round(ref_seconds, 6),
            "reference_per_element_ns": round(ref_ns, 3),
            "speedup": round(ref_ns / record["per_element_ns"], 1),
        })
    if case.name in TARGET_NS:
        record["target_per_element_ns"] = TARGET_NS[case.name]
        record["meets_target"] = record["per_element_ns"] <= TARGET_NS[case.name]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--elements", type=int, default=None, help="N (default 10^6; 2000 quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (best is reported)")
    parser.add_argument("--reference-cap", type=int, default=100_000, help="most elements of a reference run")
    args = parser.parse_args(argv)
    n = args.elements or (2000 if args.quick else 10**6)
    repeats = 2 if args.quick else max(1, args.repeat)
    ref_cap = min(args.reference_cap, 500) if args.quick else args.reference_cap

    t0 = time.perf_counter()
    field.backend()  # compiles the kernels (or settles on the reference paths)
    emit(environment(n, repeats, time.perf_counter() - t0))
    for case in cases(n):
        log(f"{case.name} ...")
        emit(measure(case, n, repeats, ref_cap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
