"""MPyC 0.11 baseline of the MPC statistics benchmark (bench/mpc.py): wall time of six statistics.

MPyC in its fastest configuration: ``mpyc`` 0.11 with ``gmpy2`` (and ``uvloop``, when installed),
3 parties on 127.0.0.1, threshold t = 1 (MPyC's default for 3 parties), secure fixed-point
``mpc.SecFxp(64, 32)`` (64-bit, 32 fractional bits) arrays through MPyC's numpy array API.

The data is :func:`mpc_data.dataset` (``rows``, ``seed``); every party generates it from the public
seed but only party 0's copy is used: party 0 inputs each column the operation needs with
``mpc.input(secfxp.array(column, integral=...), senders=0)`` (the others pass zeros of the same
shape; the public ``integral`` flag, True for age and sex, False for weight and height, is the
column's type and must be the same on all parties, or their protocols diverge and hang). The
operations (weight in kg, see bench/mpc_data.py):

* ``sum``: ``w.sum()``;
* ``var``: ``d = w - w.sum() / n``, ``(d @ d) / (n - 1)`` (centred: Σw² would overflow 64/32 at 10^5 rows;
  division by a public n as ``mpyc.statistics.mean`` does it, ``* (2^e / n) * 2^-e``, to keep digits);
* ``filtered_mean``: the category sex is a secret fixed-point column (codes 0/1); ``f = (sex == 1)``,
  one secure equality test per row, then ``(f * w).sum() / f.sum()`` (a secure division);
* ``lt_count``: ``(w < c).sum()``, one secure comparison per row with the public c = 75.0 kg;
* ``median``: ``method=sort`` (default): ``mpc.np_sort`` (Batcher's merge-exchange network, vectorised
  comparisons) and the mean of the two middle elements; ``method=quickselect``:
  ``mpyc.statistics.median`` on a list of secure numbers (MPyC's randomised quickselect, which may
  leak a little about ties). At 10^3 rows the sort is the faster of the two, so it is the default;
* ``linreg``: weight ~ b0 + b1·height + b2·age by the normal equations on centred columns: five
  inner products, divided by n (covariances), Cramer's rule for the 2x2 system (two secure
  divisions by the determinant), b0 = mean(w) - b1·mean(h) - b2·mean(a). (``mpyc.statistics``
  offers only a 1-variable ``linear_regression`` on lists.)

What is timed: from just after the inputs are secret-shared (their shares received by all parties,
then ``mpc.barrier()``) to party 0 holding the opened result (``mpc.output``), i.e. the computation
and the opening, not the input sharing nor the connection setup, as the issue's MPyC figures.

Two ways to run it::

    # one party (MPyC's own command line; what run() starts three times)
    python bench/mpyc_baseline.py --party --op lt_count --rows 1000 -M3 -I0 -B 11365 --no-log
    # the launcher: 3 parties per (op, rows), one JSON line each on stdout
    python bench/mpyc_baseline.py --all --rows 1000,10000 --timeout 300
    python bench/mpyc_baseline.py --op median --rows 1000

JSON line of a party run (party 0): {"impl": "mpyc", "op", "rows", "seconds", "value",
"cpu_seconds_party0"} (the last: party 0's own CPU time over the timed span, a hint of how much of
the wall time a busy machine added); the launcher
adds the exact answer, the relative error and the configuration; a run that fails or exceeds the
timeout gives {"impl": "mpyc", "op", "rows", "seconds": null, "reason": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mpc_data  # bench scripts import their siblings by name

HERE = Path(__file__).resolve()
PARTIES = 3
FXP_BITS = (64, 32)
INTEGRAL_COLUMNS = ("age", "sex")  # whole numbers: MPyC skips truncations after products with them
MEDIAN_METHODS = ("sort", "quickselect")
COLUMNS = {
    "sum": ("weight",),
    "var": ("weight",),
    "filtered_mean": ("weight", "sex"),
    "lt_count": ("weight",),
    "median": ("weight",),
    "linreg": ("weight", "height", "age"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one party


def _div_public(a: Any, n: int) -> Any:
    """a / n for a public integer n, as mpyc.statistics.mean does it: a * (2^e / n) * 2^-e with
    2^e <= n < 2^(e+1), so that the constant keeps all 32 fractional bits (1/n itself would not)."""
    e = n.bit_length() - 1
    return a * (2**e / n) * 2**-e


def _compute(mpc: Any, op: str, x: dict[str, Any], rows: int, data: dict[str, Any],
             median_method: str) -> Any:
    """The secure result(s) of ``op`` (a secure number or a list of them), not yet opened."""
    w = x["weight"]
    n = rows
    if op == "sum":
        return w.sum()
    if op == "var":
        d = w - _div_public(w.sum(), n)
        return _div_public(d @ d, n - 1)
    if op == "filtered_mean":
        f = x["sex"] == data["filter_code"]
        return (f * w).sum() / f.sum()
    if op == "lt_count":
        return (w < data["lt_threshold"]).sum()
    if op == "median":
        if median_method == "quickselect":
            from mpyc import statistics as mstats

            return mstats.median([w[i] for i in range(n)])
        s = mpc.np_sort(w)
        if n % 2:
            return s[(n - 1) // 2]
        return (s[n // 2 - 1] + s[n // 2]) * 0.5
    if op == "linreg":
        h, a = x["height"], x["age"]
        wbar, hbar, abar = _div_public(w.sum(), n), _div_public(h.sum(), n), _div_public(a.sum(), n)
        wc, hc, ac = w - wbar, h - hbar, a - abar
        shh, sha, saa = _div_public(hc @ hc, n), _div_public(hc @ ac, n), _div_public(ac @ ac, n)
        shw, saw = _div_public(hc @ wc, n), _div_public(ac @ wc, n)
        det = shh * saa - sha * sha
        b1 = (saa * shw - sha * saw) / det
        b2 = (shh * saw - sha * shw) / det
        b0 = wbar - b1 * hbar - b2 * abar
        return [b0, b1, b2]
    raise ValueError(f"unknown op {op!r}")


async def _party(op: str, rows: int, seed: int, median_method: str) -> None:
    from mpyc.runtime import mpc

    secfxp = mpc.SecFxp(*FXP_BITS)
    data = mpc_data.dataset(rows, seed)
    await mpc.start()
    x = {}
    for col in COLUMNS[op]:
        values = data[col].astype(np.float64) if mpc.pid == 0 else np.zeros(rows)
        # The integral flag is public (the column's type) and must agree on all parties.
        x[col] = mpc.input(secfxp.array(values, integral=col in INTEGRAL_COLUMNS), senders=0)
    await mpc.gather(list(x.values()))  # the shares have arrived (input sharing is not timed)
    await mpc.barrier("inputs shared")

    t0, c0 = time.perf_counter(), time.process_time()
    result = _compute(mpc, op, x, rows, data, median_method)
    opened = await mpc.output(result)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    await mpc.shutdown()
    if isinstance(opened, list):
        value: Any = [float(v) for v in opened]
    else:
        value = float(opened)
        if op == "lt_count":
            value = round(value)
    if mpc.pid == 0:
        record = {"impl": "mpyc", "op": op, "rows": rows, "seconds": round(seconds, 4), "value": value,
                  "cpu_seconds_party0": round(cpu_seconds, 4)}
        if op == "median":
            record["median_method"] = median_method
        print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- launcher


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on this host right now (bound, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def run_detailed(op: str, rows: int, timeout_s: float, *, seed: int = mpc_data.DEFAULT_SEED,
                 median_method: str = "sort") -> tuple[dict[str, Any] | None, str]:
    """Run ``op`` on ``rows`` rows with 3 MPyC parties; (record, "") or (None, reason)."""
    if op not in COLUMNS:
        raise ValueError(f"unknown op {op!r}")
    ports = _free_ports(PARTIES)
    addresses = [arg for port in ports for arg in ("-P", f"127.0.0.1:{port}")]
    base = [sys.executable, str(HERE), "--party", "--op", op, "--rows", str(rows), "--seed", str(seed),
            "--median-method", median_method, *addresses, "--no-log"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    t_start = time.monotonic()
    try:
        # MPyC: party i listens (i > 0) and connects to the parties j > i, retrying: any start order.
        for i in range(PARTIES):
            procs.append(subprocess.Popen([*base, "-I", str(i)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env))
        outs: list[tuple[str, str]] = []
        for p in procs:
            left = max(0.1, timeout_s - (time.monotonic() - t_start))
            outs.append(p.communicate(timeout=left))
    except subprocess.TimeoutExpired:
        _kill_all(procs)
        tails = []
        for i, p in enumerate(procs):
            try:
                err = p.communicate(timeout=5)[1] or ""
            except (subprocess.TimeoutExpired, ValueError):
                err = ""
            if err.strip():
                tails.append(f"party {i} stderr: {err.strip()[-300:]}")
        return None, f"timeout after {timeout_s:g} s (all {PARTIES} parties killed)" + "".join(
            f"; {t}" for t in tails)
    finally:
        _kill_all(procs)
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0:
            return None, f"party {i} exited with {p.returncode}: {err.strip()[-1500:]}"
    lines = [line for line in outs[0][0].splitlines() if line.startswith("{")]
    if not lines:
        return None, f"party 0 printed no JSON line: {outs[0][0][-500:]!r} {outs[0][1][-1000:]!r}"
    record = json.loads(lines[-1])
    exact = mpc_data.expected(op, mpc_data.dataset(rows, seed))
    record.update({
        "expected": exact,
        "rel_error": mpc_data.relative_error(record["value"], exact),
        "parties": PARTIES,
        "threshold": 1,
        "secfxp": list(FXP_BITS),
        "seed": seed,
        "wall_seconds_total": round(time.monotonic() - t_start, 2),
    })
    return record, ""


def run(op: str, rows: int, timeout_s: float, *, seed: int = mpc_data.DEFAULT_SEED,
        median_method: str = "sort") -> dict[str, Any] | None:
    """Run ``op`` on ``rows`` rows with 3 MPyC parties on 127.0.0.1 and check the opened value.

    Returns party 0's record (``impl``, ``op``, ``rows``, ``seconds`` (the timed computation, see the
    module docstring), ``value``) with ``expected`` (bench/mpc_data.expected) and ``rel_error`` added,
    or None when the parties fail or do not finish within ``timeout_s`` (all three are then killed;
    the reason goes to stderr).
    """
    record, reason = run_detailed(op, rows, timeout_s, seed=seed, median_method=median_method)
    if record is None:
        log(f"mpyc {op} rows={rows}: {reason}")
    return record


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "impl": "mpyc",
        "figure": "environment",
        "mpyc": ver("mpyc"),
        "gmpy2": ver("gmpy2"),
        "uvloop": ver("uvloop"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "parties": PARTIES,
        "threshold": 1,
        "secfxp": list(FXP_BITS),
        "timed": "after input sharing + barrier, until party 0 holds the opened result",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--party", action="store_true", help="run as one MPyC party (with -M/-I/-P/-B)")
    parser.add_argument("--op", choices=mpc_data.OPS, action="append", help="operation (repeatable)")
    parser.add_argument("--all", action="store_true", help="all operations")
    parser.add_argument("--rows", default="1000", help="comma-separated row counts, e.g. 1000,10000")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run (launcher)")
    parser.add_argument("--seed", type=int, default=mpc_data.DEFAULT_SEED)
    parser.add_argument("--median-method", choices=MEDIAN_METHODS, default="sort")
    parser.add_argument("--quick", action="store_true", help="sum and lt_count at 200 rows (smoke test)")
    args, extra = parser.parse_known_args(argv)  # a party's extra arguments are MPyC's own
    if extra and not args.party:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]

    if args.party:
        from mpyc.runtime import mpc

        if not args.op or len(args.op) != 1 or len(rows_list) != 1:
            parser.error("--party takes one --op and one --rows")
        mpc.run(_party(args.op[0], rows_list[0], args.seed, args.median_method))
        return 0

    if args.quick:
        ops, rows_list = ["sum", "lt_count"], [200]
    else:
        ops = list(mpc_data.OPS) if args.all else (args.op or parser.error("give --op or --all"))
    print(json.dumps(environment()), flush=True)
    failed = 0
    for rows in rows_list:
        for op in ops:
            log(f"mpyc {op} rows={rows} ...")
            record, reason = run_detailed(op, rows, args.timeout, seed=args.seed,
                                          median_method=args.median_method)
            if record is None:
                failed += 1
                record = {"impl": "mpyc", "op": op, "rows": rows, "seconds": None, "reason": reason}
            log(f"  -> {record.get('seconds')} s")
            print(json.dumps(record), flush=True)
    return 1 if failed and args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
