"""`qstore qkd ...`: key rates, a BB84 run and network simulation from the command line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from qstore.errors import LocalError


def distance_range(text: str) -> np.ndarray:
    """'0:200:10' -> 0, 10, ..., 200 km; '25' -> [25]; '5,10,40' -> those."""
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > 100_000:
                raise argparse.ArgumentTypeError("at most 100000 distances")
            return start + step * np.arange(count)
        values = np.array([float(p) for p in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a distance or START:STOP:STEP range: {text!r}") from None
    if (values < 0).any() or not np.isfinite(values).all():
        raise argparse.ArgumentTypeError("distances must be finite and >= 0")
    return values


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from qkd_sim import models

    q = sub.add_parser("qkd", help="QKD simulator: key rates, BB84, network simulation")
    qs = q.add_subparsers(dest="qkd_command", metavar="QKD_COMMAND")
    qs.required = True

    r = qs.add_parser("rate", help="secure key rate versus fiber length (with the PLOB bound)")
    r.add_argument("--protocol", choices=models.PROTOCOLS, default="decoy-bb84")
    r.add_argument("--distance", type=distance_range, default="0:200:10",
                   help="km: START:STOP:STEP or a comma list")
    r.add_argument("--preset", choices=sorted(models.PRESETS), default="gys", help="hardware parameter set")
    r.add_argument("--mu", type=float, help="signal intensity (default: optimal at each distance)")
    r.add_argument("--loss", type=float, help="fiber loss in dB/km (overrides the preset)")
    r.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    r.add_argument("--plot", type=Path, help="write a PNG plot (log scale) to this file")
    r.set_defaults(handler=run_rate)

    b = qs.add_parser("bb84", help="circuit-level BB84 (qiskit): sifting, QBER, Cascade, amplification")
    b.add_argument("--photons", type=_count, default=1_000_000, help="photons sent (e.g. 1e6)")
    b.add_argument("--noise", type=_fraction, default=0.0, help="depolarising probability of the channel")
    b.add_argument("--loss", type=_fraction, default=0.0, help="fraction of photons lost in the channel")
    b.add_argument("--eve", nargs="?", type=_fraction, const=1.0, default=0.0,
                   help="intercept-resend eavesdropper on this fraction of photons (default 1)")
    b.add_argument("--threshold", type=_fraction, default=0.11, help="abort above this QBER (default 0.11)")
    b.add_argument("--seed", type=int, help="random seed, for a reproducible run")
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=run_bb84)

    m = qs.add_parser("simulate", help="key pool levels of every link of a cluster file on a simulated clock")
    m.add_argument("config", type=Path, nargs="?", default=Path("deploy/local.toml"), help="cluster file")
    m.add_argument("--hours", type=float, default=24.0, help="simulated time (default 24)")
    m.add_argument("--step", type=float, default=60.0, help="seconds per step (default 60)")
    m.add_argument("--demand", action="append", default=[], metavar="SITE-SITE=BPS",
                   help="key demand between two sites in bits/s (relayed if not linked); repeatable")
    m.add_argument("--full", action="store_true", help="start with full pools (default: empty)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--plot", type=Path, help="write a PNG plot of pool levels to this file")
    m.set_defaults(handler=run_simulate)


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer() or not 1 <= value <= 1e9:
        raise argparse.ArgumentTypeError("photons must be a whole number from 1 to 1e9")
    return int(value)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def run_bb84(args: argparse.Namespace) -> int:
    from qkd_sim.bb84 import run_bb84 as simulate_bb84

    rng = np.random.default_rng(args.seed)
    report = simulate_bb84(
        args.photons, transmittance=1.0 - args.loss, depolarizing=args.noise, eve_fraction=args.eve,
        qber_threshold=args.threshold, rng=rng,
    )
    fields = {
        "photons": report.photons, "detected": report.detected, "sifted_bits": report.sifted,
        "sample_bits": report.sample_size, "qber": report.qber_estimate, "leaked_bits": report.leaked_bits,
        "final_key_bits": report.final_key_length, "aborted": report.aborted,
        "abort_reason": report.abort_reason or None,
        "keys_equal": report.alice_key == report.bob_key,
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for name, value in fields.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{name.replace('_', ' '):>14}: {shown}")
    return 0  # an aborted run is a result of the simulation, reported above, not a failure


def _demand(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        pair, sep, value = item.partition("=")
        try:
            bps = float(value)
        except ValueError:
            bps = -1.0
        if not sep or "-" not in pair or not bps >= 0:
            raise LocalError(f"--demand {item!r}: write SITE-SITE=BITS_PER_SECOND, e.g. client-site1=1e6")
        out[pair] = out.get(pair, 0.0) + bps
    return out


def run_simulate(args: argparse.Namespace) -> int:
    from qkd_sim.network import Network, simulate

    net = Network.from_toml(args.config)
    demand = _demand(args.demand)
    for pair in demand:
        a, _, b = pair.partition("-")
        net.route(a, b)  # a clear error for unknown or unreachable sites
    trace = simulate(net, args.hours, step_s=args.step, demand_bps=demand, start_full=args.full)
    rows = []
    for lk in net.links:
        levels = trace.levels[lk.name]
        rate = net.rates[lk.name]
        rows.append({
            "link": lk.name, "rate_bps": rate if math.isfinite(rate) else None,
            "capacity_bits": lk.capacity_bits, "final_bits": levels[-1], "min_bits": min(levels),
            "starved_seconds": trace.starved[lk.name],
        })
    if args.plot:
        _plot_levels(args, trace, net)
    if args.json:
        print(json.dumps({"network": net.name, "hours": args.hours, "links": rows}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{net.name}: key pools after {args.hours:g} h (simulated)")
    for col in ("link", "key rate", "pool at end", "lowest", "demand unmet"):
        table.add_column(col, justify="right")
    for row in rows:
        rate = "unlimited" if row["rate_bps"] is None else _bps(row["rate_bps"])
        table.add_row(row["link"], rate, _bits(row["final_bits"]), _bits(row["min_bits"]),
                      f"{row['starved_seconds']:.0f} s" if row["starved_seconds"] else "-")
    Console().print(table)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _bits(v: float) -> str:
    for unit, scale in (("GiB", 8 * 2**30), ("MiB", 8 * 2**20), ("KiB", 8 * 2**10)):
        if v >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} bit"


def _plot_levels(args: argparse.Namespace, trace, net) -> None:
    plt = _pyplot(args.plot)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    hours = np.array(trace.times_s) / 3600
    for lk in net.links:
        ax.plot(hours, np.array(trace.levels[lk.name]) / 8 / 2**20, label=lk.name)
    ax.set_xlabel("simulated time (h)")
    ax.set_ylabel("key in pool (MiB)")
    ax.set_title(f"{net.name}: QKD key pools")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)


def _pyplot(path: Path):
    if path.suffix.lower() != ".png":
        raise LocalError("--plot writes PNG: give a file name ending in .png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_rate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qkd_sim import models

    hw = models.PRESETS[args.preset]
    if args.loss is not None:
        hw = replace(hw, fiber_loss_db_per_km=args.loss)
    params = {} if args.mu is None else {"mu": args.mu}
    d = np.atleast_1d(args.distance)
    with np.errstate(divide="ignore"):  # PLOB is infinite at 0 km
        per_pulse = np.atleast_1d(models.key_rate(args.protocol, d, hw, **params))
        plob = np.atleast_1d(models.plob(d, hw))
    bps = per_pulse * hw.repetition_rate_hz
    rows = [
        {"distance_km": float(x), "rate_per_pulse": float(r), "rate_bps": float(b),
         "plob_per_pulse": float(p) if math.isfinite(p) else None}  # JSON has no infinity
        for x, r, b, p in zip(d, per_pulse, bps, plob, strict=True)
    ]
    if args.plot:
        _plot(args, d, per_pulse, plob, hw)
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.protocol}, hardware {args.preset}, {hw.repetition_rate_hz / 1e6:g} MHz")
    for col in ("km", "key / pulse", "key bits/s", "PLOB / pulse"):
        table.add_column(col, justify="right")
    for row in rows:
        plob_text = "∞" if row["plob_per_pulse"] is None else f"{row['plob_per_pulse']:.3e}"
        table.add_row(f"{row['distance_km']:g}", f"{row['rate_per_pulse']:.3e}", _bps(row["rate_bps"]),
                      plob_text)
    Console().print(table)
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _bps(v: float) -> str:
    for unit, scale in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.2f} b/s"


def _plot(args: argparse.Namespace, d: np.ndarray, rate: np.ndarray, plob: np.ndarray, hw) -> None:
    plt = _pyplot(args.plot)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.semilogy(d, np.where(plob > 0, plob, np.nan), "k--", label="PLOB bound (repeaterless)")
    ax.semilogy(d, np.where(rate > 0, rate, np.nan), label=args.protocol)
    ax.set_xlabel("fiber length (km)")
    ax.set_ylabel("secret key bits per pulse")
    ax.set_title(f"{args.protocol}, {args.preset}: {hw.fiber_loss_db_per_km} dB/km, "
                 f"η_det={hw.detector_efficiency}, Y0={hw.dark_count_prob:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)
