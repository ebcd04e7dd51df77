"""Asymptotic secret key rates of QKD over optical fiber, and the PLOB bound.

Sans-IO and vectorised: every rate takes a distance in km (a scalar or a numpy
array) and a :class:`Hardware` profile, and returns a numpy float or array of
secret bits per pulse (per second from :func:`key_rate_bps`); 0 where no key
can be made. No statistics of finite keys: these are the infinite-key limits
in which the decoy-state papers draw their figures.

The channel and detector model of Lo–Ma–Chen (LMC, PRL 94, 230504 (2005)) and
Ma–Qi–Zhao–Lo (MQZL, PRA 72, 012326 (2005)), Sec. II:

* transmittance ``η = 10^(-α L / 10) · η_Bob`` (fiber loss α dB/km, length L,
  Bob's detection efficiency η_Bob including his optics);
* an n-photon pulse is detected with ``Y_n = Y0 + η_n``, ``η_n = 1 - (1-η)^n``,
  and is wrong with ``e_n Y_n = e0 Y0 + e_det η_n`` (e0 = 1/2: a dark count is
  a coin toss; e_det: misalignment);
* so a coherent pulse of mean photon number μ gives the gain and QBER
  ``Q_μ = Y0 + 1 - e^(-ημ)``, ``E_μ Q_μ = e0 Y0 + e_det (1 - e^(-ημ))``.

Keys follow GLLP: ``R = q {-Q_μ f H2(E_μ) + Q_1 [1 - H2(e_1)]}``, where Q_1
and e_1 (gain and error of the single-photon pulses) are what each protocol
knows or bounds. ``q = 1/2`` is the sifting factor of standard BB84 (half of
Bob's bases match Alice's), as in LMC and MQZL; error correction costs f times
the Shannon limit (f = :attr:`Hardware.ec_inefficiency`, a constant).

Protocols (:data:`PROTOCOLS`, dispatched by :func:`key_rate`):

``bb84-single-photon``  an ideal single-photon source (Shor–Preskill).
``bb84-wcp``            weak coherent pulses without decoys (GLLP): every
                        multi-photon pulse is assumed tagged.
``decoy-bb84``          infinitely many decoys (LMC): Y1 and e1 known exactly.
``decoy-bb84-vw``       vacuum + one weak decoy ν (MQZL): Y1 ≥ Y1^L,
                        e1 ≤ e1^U.
``tf-qkd``              twin-field, sending-or-not-sending (SNS) variant
                        (Wang, Yu, Hu, PRA 98, 062323 (2018)), asymptotic,
                        infinite decoys: its rate scales with √η.

:func:`plob` is the repeaterless bound ``-log2(1 - η_ch)`` of Pirandola,
Laurenza, Ottaviani, Banchi, Nat. Commun. 8, 15043 (2017): no point-to-point
protocol beats it; twin-field does, at long distance, because its detectors
sit in the middle of the channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from qstore.errors import LocalError

FloatArray = npt.NDArray[np.float64]
Rates = FloatArray | np.float64  # a numpy float for a scalar distance, else an array
Distance = npt.ArrayLike  # km: a number or an array of them

PROTOCOLS = ("bb84-single-photon", "bb84-wcp", "decoy-bb84", "decoy-bb84-vw", "tf-qkd")

SIFTING = 0.5  # q: standard BB84 keeps the half of the pulses measured in Alice's basis
E0 = 0.5  # error probability of a background count
NU_MIN = 0.01  # weakest decoy intensity assumed preparable, for decoy-bb84-vw's optimal ν

_MU_RANGE = (1e-7, 2.0)  # search range of optimal_mu (WCP wants μ ~ η, decoys μ ~ 0.5)
_EPSILON_RANGE = (1e-5, 0.5)  # SNS sending probability
_MAX_SEARCH_KM = 1e4  # max_distance gives up (returns inf) beyond this


class ModelError(LocalError):
    """Parameters outside a model's domain (a ValueError, HTTP 400)."""


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """A QKD link's devices, validated on construction.

    ``dark_count_prob`` is Y0, the background count probability per pulse of
    the whole detection system (both detectors). ``mu`` is the signal
    intensity; None means the rate-maximising one at each distance
    (:func:`optimal_mu`), which is what a link operator would tune to.
    """

    fiber_loss_db_per_km: float  # α
    detector_efficiency: float  # η_Bob, including Bob's optical losses
    dark_count_prob: float  # Y0 per pulse
    misalignment: float  # e_det
    ec_inefficiency: float  # f ≥ 1
    repetition_rate_hz: float
    mu: float | None = None

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, Callable[[float], bool], str], ...] = (
            ("fiber_loss_db_per_km", lambda v: v >= 0, ">= 0"),
            ("detector_efficiency", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("dark_count_prob", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("misalignment", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            ("ec_inefficiency", lambda v: v >= 1, ">= 1 (1 is the Shannon limit)"),
            ("repetition_rate_hz", lambda v: v > 0, "> 0"),
        )
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or not ok(value):
                raise ModelError(f"Hardware.{name} must be a finite number {rule}, got {value!r}")
        if self.mu is not None and not (_is_real(self.mu) and math.isfinite(self.mu) and self.mu > 0):
            raise ModelError(f"Hardware.mu must be a finite number > 0 or None, got {self.mu!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


PRESETS: dict[str, Hardware] = {
    # Gobby, Yuan, Shields, Appl. Phys. Lett. 84, 3762 (2004), 122 km of fiber:
    # the parameter set LMC (Fig. 1) and MQZL (table of experiments) simulate,
    # α = 0.21 dB/km, η_Bob = 4.5 %, Y0 = 1.7e-6, e_det = 3.3 %, f = 1.22, 2 MHz.
    "gys": Hardware(
        fiber_loss_db_per_km=0.21, detector_efficiency=4.5e-2, dark_count_prob=1.7e-6,
        misalignment=3.3e-2, ec_inefficiency=1.22, repetition_rate_hz=2e6,
    ),
    # Illustrative, not a reproduction: a GHz-clocked InGaAs avalanche
    # photodiode system of the kind of Dixon et al., Opt. Express 16, 18790
    # (2008) / Lucamarini et al., Opt. Express 21, 24550 (2013), on standard
    # fiber.
    "apd-ghz": Hardware(
        fiber_loss_db_per_km=0.2, detector_efficiency=0.2, dark_count_prob=1e-6,
        misalignment=0.02, ec_inefficiency=1.16, repetition_rate_hz=1e9,
    ),
    # Illustrative, not a reproduction: superconducting nanowire detectors on
    # ultra-low-loss fiber, in the range of Boaron et al., PRL 121, 190502
    # (2018) and the twin-field experiments since (η_det 60 %, dark counts of
    # order 1e-8 per gate, 2 % phase/polarisation misalignment).
    "snspd": Hardware(
        fiber_loss_db_per_km=0.17, detector_efficiency=0.6, dark_count_prob=1e-8,
        misalignment=0.02, ec_inefficiency=1.1, repetition_rate_hz=1e9,
    ),
}


# --------------------------------------------------------------------------- channel


def _distance(distance_km: Distance) -> FloatArray:
    d = np.asarray(distance_km, dtype=np.float64)
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ModelError("distance_km must be finite and >= 0")
    return d


def channel_transmittance(distance_km: Distance, hardware: Hardware) -> FloatArray:
    """Fiber transmittance 10^(-α L / 10) alone."""
    return 10.0 ** (-hardware.fiber_loss_db_per_km * _distance(distance_km) / 10.0)


def transmittance(distance_km: Distance, hardware: Hardware) -> FloatArray:
    """Overall transmittance η = 10^(-α L / 10) · η_Bob (MQZL Sec. II)."""
    return channel_transmittance(distance_km, hardware) * hardware.detector_efficiency


def gain_and_qber(eta: npt.ArrayLike, mu: npt.ArrayLike, hardware: Hardware) -> tuple[FloatArray, FloatArray]:
    """Gain Q_μ = Y0 + 1 - e^(-ημ) and QBER E_μ, E_μ Q_μ = e0 Y0 + e_det (1 - e^(-ημ)) (MQZL Sec. II)."""
    y0 = hardware.dark_count_prob
    detected = -np.expm1(-np.asarray(eta) * np.asarray(mu))
    gain = y0 + detected
    errors = E0 * y0 + hardware.misalignment * detected
    return gain, _ratio(errors, gain)


def _ratio(num: FloatArray, den: FloatArray, empty: float = E0) -> FloatArray:
    """num / den, or ``empty`` where nothing was detected (den = 0: an error rate of 1/2, no key)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _h2(p: npt.ArrayLike) -> FloatArray:
    """Binary entropy of an error rate, clipped to [0, 1/2] (a rate ≥ 1/2 carries no key)."""
    q = np.clip(np.asarray(p, dtype=np.float64), 0.0, 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -q * np.log2(q) - (1 - q) * np.log2(1 - q)
    return np.where(q > 0, h, 0.0)


# --------------------------------------------------------------------------- raw rates
# Unclipped (possibly negative) rates per pulse: smooth in μ and L, so the
# optimisers and root finders below work on them; the public functions clip.


def _single_photon_raw(d: FloatArray, hw: Hardware) -> FloatArray:
    eta = transmittance(d, hw)
    y1 = hw.dark_count_prob + eta
    e1 = _ratio(E0 * hw.dark_count_prob + hw.misalignment * eta, y1)
    return SIFTING * y1 * (1 - hw.ec_inefficiency * _h2(e1) - _h2(e1))


def _wcp_raw(d: FloatArray, hw: Hardware, mu: FloatArray) -> FloatArray:
    eta = transmittance(d, hw)
    gain, qber = gain_and_qber(eta, mu, hw)
    p_multi = -np.expm1(-mu) - mu * np.exp(-mu)  # P(n ≥ 2) of a Poisson source
    omega = 1 - _ratio(p_multi, gain, 1.0)  # worst case: every multi-photon pulse detected and tagged
    untagged = np.where(omega > 0, omega, 0.0)
    private = gain * untagged * (1 - _h2(_ratio(qber, untagged)))
    return SIFTING * (-gain * hw.ec_inefficiency * _h2(qber) + private)


def _decoy_raw(d: FloatArray, hw: Hardware, mu: FloatArray) -> FloatArray:
    eta = transmittance(d, hw)
    gain, qber = gain_and_qber(eta, mu, hw)
    y1 = hw.dark_count_prob + eta
    e1 = _ratio(E0 * hw.dark_count_prob + hw.misalignment * eta, y1)
    q1 = y1 * mu * np.exp(-mu)
    return SIFTING * (-gain * hw.ec_inefficiency * _h2(qber) + q1 * (1 - _h2(e1)))


def _decoy_vw_bounds(
    d: FloatArray, hw: Hardware, mu: FloatArray, nu: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Y1^L and e1^U of vacuum + weak decoy ν < μ (MQZL, vacuum + weak section); the vacuum gives Y0."""
    eta = transmittance(d, hw)
    y0 = hw.dark_count_prob
    q_mu, _ = gain_and_qber(eta, mu, hw)
    q_nu, e_nu = gain_and_qber(eta, nu, hw)
    y1_low = mu / (mu * nu - nu**2) * (
        q_nu * np.exp(nu) - q_mu * np.exp(mu) * nu**2 / mu**2 - (mu**2 - nu**2) / mu**2 * y0
    )
    e1_up = _ratio(e_nu * q_nu * np.exp(nu) - E0 * y0, y1_low * nu)
    return y1_low, e1_up


def _decoy_vw_raw(d: FloatArray, hw: Hardware, mu: FloatArray, nu: FloatArray) -> FloatArray:
    eta = transmittance(d, hw)
    gain, qber = gain_and_qber(eta, mu, hw)
    y1_low, e1_up = _decoy_vw_bounds(d, hw, mu, nu)
    q1_low = np.maximum(y1_low, 0.0) * mu * np.exp(-mu)
    return SIFTING * (-gain * hw.ec_inefficiency * _h2(qber) + q1_low * (1 - _h2(e1_up)))


def _sns_raw(d: FloatArray, hw: Hardware, mu: FloatArray, epsilon: FloatArray) -> FloatArray:
    """SNS twin-field rate per time window; see :func:`tf_qkd`."""
    eta = channel_transmittance(d / 2, hw) * hw.detector_efficiency  # one arm
    pd = hw.dark_count_prob / 2
    none = 2 * pd * (1 - pd)  # neither sends: one dark count
    one = 2 * (1 - pd) * (np.exp(-eta * mu / 2) - (1 - pd) * np.exp(-eta * mu))
    from scipy.special import i0e  # only twin-field needs it; scipy costs 0.3 s to import

    both = 2 * (1 - pd) * (i0e(eta * mu) - (1 - pd) * np.exp(-2 * eta * mu))  # random relative phase
    s_z = (1 - epsilon) ** 2 * none + 2 * epsilon * (1 - epsilon) * one + epsilon**2 * both
    wrong = (1 - epsilon) ** 2 * none + epsilon**2 * both  # "both" and "neither" give the wrong bit
    e_z = _ratio(wrong, s_z)
    s1 = (1 - pd) * (eta + 2 * pd * (1 - eta))
    e1 = _ratio((1 - pd) * (hw.misalignment * eta + pd * (1 - eta)), s1)
    n1 = 2 * epsilon * (1 - epsilon) * mu * np.exp(-mu) * s1
    return n1 * (1 - _h2(e1)) - hw.ec_inefficiency * s_z * _h2(e_z)


# --------------------------------------------------------------------------- optimisation


def _grid(lo: FloatArray, hi: FloatArray, n: int) -> FloatArray:
    """n points per parameter between lo and hi (shape (k, *s)): all n^k combinations, (k, n^k, *s)."""
    k = lo.shape[0]
    t = np.linspace(0.0, 1.0, n)
    mesh = np.stack(np.meshgrid(*([t] * k), indexing="ij")).reshape((k, n**k) + (1,) * (lo.ndim - 1))
    return lo[:, None] + mesh * (hi - lo)[:, None]


def _maximise(
    fun: Callable[..., FloatArray], lo: FloatArray, hi: FloatArray,
    first: int = 24, zoom: int = 7, rounds: int = 16,
) -> tuple[FloatArray, FloatArray]:
    """Elementwise max of ``fun(*x)`` over the box lo ≤ x ≤ hi, each of shape (k, *s); returns (x, max).

    Vectorised over s (the distances): a log-spaced grid of ``first`` points
    per parameter finds the best cell, then ``rounds`` grids of ``zoom``
    points around the best point so far shrink it by (zoom - 1)/2 each.
    Exact for unimodal functions; ``fun`` gets arrays of shape (n, *s).
    """
    lo, hi = np.log(lo), np.log(hi)
    best_x, best_f = lo, np.full(lo.shape[1:], -np.inf)
    a, b, n = lo, hi, first
    step = (hi - lo) / (first - 1)
    for _ in range(rounds + 1):
        x = _grid(a, b, n)
        f = fun(*np.exp(x))
        i = np.argmax(f, axis=0)[None]
        cand_x, cand_f = np.take_along_axis(x, i[None], 1)[:, 0], np.take_along_axis(f, i, 0)[0]
        better = cand_f > best_f
        best_x, best_f = np.where(better, cand_x, best_x), np.where(better, cand_f, best_f)
        a, b, n = np.maximum(best_x - step, lo), np.minimum(best_x + step, hi), zoom
        step = 2 * step / (zoom - 1)
    return np.exp(best_x), best_f


# --------------------------------------------------------------------------- protocol table


def _vw_raw(d: FloatArray, hw: Hardware, mu: FloatArray, nu: FloatArray | None = None) -> FloatArray:
    return _decoy_vw_raw(d, hw, mu, _nu_or_optimal(nu, mu))


def _nu_or_optimal(nu: FloatArray | None, mu: FloatArray) -> FloatArray:
    """ν given, or the optimal ν: the weakest preparable, NU_MIN (μ/2 for a signal fainter than that).

    Asymptotically the vacuum + weak rate only grows as ν shrinks (MQZL:
    Y1^L → Y1 and e1^U → e1 as ν → 0, since the dropped n ≥ 3 terms scale
    with ν), so the optimum over [NU_MIN, μ) is its lower end; a test checks
    the monotonicity numerically.
    """
    return np.minimum(NU_MIN, mu / 2) if nu is None else nu


# protocol -> (unclipped rate per pulse (d, hw, mu, **params), its parameters besides mu,
#              those of them optimised when not given)
_TABLE: dict[str, tuple[Callable[..., FloatArray], tuple[str, ...], tuple[str, ...]]] = {
    "bb84-single-photon": (lambda d, hw, mu: _single_photon_raw(d, hw), (), ()),
    "bb84-wcp": (_wcp_raw, (), ()),
    "decoy-bb84": (_decoy_raw, (), ()),
    "decoy-bb84-vw": (_vw_raw, ("nu",), ()),
    "tf-qkd": (_sns_raw, ("epsilon",), ("epsilon",)),
}
_RANGES = {"mu": _MU_RANGE, "epsilon": _EPSILON_RANGE}


def _lookup(protocol: str) -> tuple[Callable[..., FloatArray], tuple[str, ...], tuple[str, ...]]:
    try:
        return _TABLE[protocol]
    except (KeyError, TypeError):
        raise ModelError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}") from None


def _check_params(protocol: str, params: dict[str, Any]) -> dict[str, FloatArray | None]:
    """Validate keyword parameters: names, then ranges (mu > 0, nu > 0, 0 < epsilon < 1)."""
    allowed = ({"mu"} if protocol != "bb84-single-photon" else set()) | set(_lookup(protocol)[1])
    unknown = sorted(set(params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no parameters"
        raise ModelError(f"protocol {protocol!r} takes {takes}; got {', '.join(unknown)}")
    checked: dict[str, FloatArray | None] = {}
    for name, value in params.items():
        arr = None if value is None else np.asarray(value, dtype=np.float64)
        if arr is not None and not np.all(np.isfinite(arr)):
            raise ModelError(f"{name} must be finite, got {value!r}")
        checked[name] = arr
    rules = {
        "mu": ("mu (signal intensity)", lambda v: v > 0, "> 0"),
        "nu": ("nu (weak decoy)", lambda v: v > 0, "> 0"),
        "epsilon": ("epsilon (sending probability)", lambda v: (v > 0) & (v < 1), "in (0, 1)"),
    }
    for name, (label, ok, rule) in rules.items():
        if checked.get(name) is not None and not np.all(ok(checked[name])):
            raise ModelError(f"{label} must be {rule}, got {params[name]!r}")
    return checked


def _best(
    protocol: str, d: FloatArray, hardware: Hardware, params: dict[str, FloatArray | None]
) -> tuple[FloatArray, FloatArray]:
    """(μ, unclipped rate) at each distance: μ as given (params or hardware.mu), else optimal.

    Free parameters (μ if not given, and ε of tf-qkd if not given) are
    optimised jointly.
    """
    raw, _, optimisable = _lookup(protocol)
    if protocol == "bb84-single-photon":
        return np.full(d.shape, np.nan), raw(d, hardware, None)
    fixed = {k: v for k, v in params.items() if v is not None}
    if "mu" not in fixed and hardware.mu is not None:
        fixed["mu"] = np.asarray(hardware.mu, dtype=np.float64)
    if protocol == "decoy-bb84-vw" and "nu" in fixed and "mu" in fixed and np.any(fixed["mu"] <= fixed["nu"]):
        raise ModelError(f"vacuum + weak decoy needs nu < mu, got nu={fixed['nu']!r} mu={fixed['mu']!r}")
    shape = np.broadcast_shapes(d.shape, *(v.shape for v in fixed.values()))
    d = np.broadcast_to(d, shape)
    fixed = {k: np.broadcast_to(v, shape) for k, v in fixed.items()}
    free = [name for name in ("mu", *optimisable) if name not in fixed]
    if not free:
        return fixed["mu"], raw(d, hardware, **fixed)
    lo = np.stack([np.full(shape, _RANGES[name][0]) for name in free])
    hi = np.stack([np.full(shape, _RANGES[name][1]) for name in free])
    if protocol == "decoy-bb84-vw" and "nu" in fixed:  # the signal must outshine the decoy
        lo[0] = np.maximum(lo[0], fixed["nu"] * (1 + 1e-9))

    def rate(*values: FloatArray) -> FloatArray:
        return raw(d, hardware, **fixed, **dict(zip(free, values, strict=True)))

    x, best = _maximise(rate, lo, hi)
    return (x[0] if free[0] == "mu" else fixed["mu"]), best


def _scalar_or_array(x: FloatArray) -> Rates:
    return x[()] if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------- public API


def key_rate(protocol: str, distance_km: Distance, hardware: Hardware, **params: Any) -> Rates:
    """Secret key bits per pulse of ``protocol`` at each distance (0 where no key).

    Parameters: ``mu`` (signal intensity; default ``hardware.mu``, None = the
    optimal one at each distance), ``nu`` for ``decoy-bb84-vw`` (default: the
    optimal, :data:`NU_MIN`), ``epsilon`` for ``tf-qkd`` (default: optimal).
    Raises :class:`ModelError` (a ValueError) for anything out of range.
    """
    checked = _check_params(protocol, params)
    _, raw = _best(protocol, _distance(distance_km), hardware, checked)
    return _scalar_or_array(np.maximum(raw, 0.0))


def key_rate_bps(protocol: str, distance_km: Distance, hardware: Hardware, **params: Any) -> Rates:
    """Secret key bits per second: :func:`key_rate` × the repetition rate."""
    return key_rate(protocol, distance_km, hardware, **params) * hardware.repetition_rate_hz


def bb84_single_photon(distance_km: Distance, hardware: Hardware) -> Rates:
    """Ideal single-photon BB84 (Shor–Preskill): ``R = q Y1 [1 - f H2(e1) - H2(e1)]``, Y1 = Y0 + η."""
    return key_rate("bb84-single-photon", distance_km, hardware)


def bb84_wcp(distance_km: Distance, hardware: Hardware, mu: npt.ArrayLike | None = None) -> Rates:
    """GLLP without decoys: ``R = q {-Q_μ f H2(E_μ) + Q_μ Ω [1 - H2(E_μ / Ω)]}``, Ω = 1 - P(n≥2)/Q_μ.

    (GLLP, Quantum Inf. Comput. 4, 325 (2004), as in LMC: the untagged
    fraction Ω is bounded by assuming every multi-photon pulse is detected.)
    """
    return key_rate("bb84-wcp", distance_km, hardware, mu=mu)


def decoy_bb84(distance_km: Distance, hardware: Hardware, mu: npt.ArrayLike | None = None) -> Rates:
    """Infinite decoys (LMC): ``R = q {-Q_μ f H2(E_μ) + Q_1 [1 - H2(e_1)]}``, Q_1 = Y1 μ e^(-μ) exact."""
    return key_rate("decoy-bb84", distance_km, hardware, mu=mu)


def decoy_bb84_vw(
    distance_km: Distance, hardware: Hardware, mu: npt.ArrayLike | None = None,
    nu: npt.ArrayLike | None = None,
) -> Rates:
    """Vacuum + weak decoy ν (MQZL): the infinite-decoy formula with Y1 ≥ Y1^L and e1 ≤ e1^U."""
    return key_rate("decoy-bb84-vw", distance_km, hardware, mu=mu, nu=nu)


def tf_qkd(
    distance_km: Distance, hardware: Hardware, mu: npt.ArrayLike | None = None,
    epsilon: npt.ArrayLike | None = None,
) -> Rates:
    """Sending-or-not-sending twin-field QKD (Wang, Yu, Hu, PRA 98, 062323 (2018)), asymptotic.

    Alice and Bob each send a phase-randomised pulse μ with probability ε (else
    nothing) over L/2 of fiber to Charlie's beam splitter; a window counts when
    exactly one of his two detectors clicks, and its bit is wrong when both or
    neither sent. ``R = 2ε(1-ε) μ e^(-μ) s1 [1 - H2(e1_ph)] - f S_Z H2(E_Z)``
    with s1 the single-photon yield of one arm (∝ √η of the whole link) and
    e1_ph its phase error, both exact with infinitely many decoys; e1_ph is
    the misalignment of the X windows. Asymptotically Z windows are almost
    all windows (no sifting factor). Y0 is split evenly between the two
    detectors. For a fixed μ far from optimal the rate need not fall
    monotonically with distance (E_Z depends on ημ).
    """
    return key_rate("tf-qkd", distance_km, hardware, mu=mu, epsilon=epsilon)


def plob(distance_km: Distance, hardware: Hardware) -> Rates:
    """PLOB repeaterless bound ``-log2(1 - η_ch)`` bits per channel use, η_ch the fiber's transmittance.

    Only the fiber counts (the detectors are the users' devices); folding
    η_Bob in gives a tighter bound that point-to-point protocols obey too:
    ``-np.log2(1 - transmittance(L, hw))``.
    """
    eta = channel_transmittance(distance_km, hardware)
    with np.errstate(divide="ignore"):  # η = 1 (no loss): unbounded, inf
        return _scalar_or_array(-np.log1p(-eta) / math.log(2))


def optimal_mu(protocol: str, distance_km: Distance, hardware: Hardware, **params: Any) -> Rates:
    """The signal intensity that maximises the rate at each distance (nan where no key is possible).

    Other free parameters (ν, ε) take their defaults or optimal values;
    ``bb84-single-photon`` has no intensity.
    """
    if protocol == "bb84-single-photon":
        raise ModelError("bb84-single-photon sends one photon per pulse: there is no intensity to optimise")
    if "mu" in params:
        raise ModelError("optimal_mu chooses mu itself; do not pass one")
    checked = _check_params(protocol, params)
    mu, raw = _best(protocol, _distance(distance_km), replace(hardware, mu=None), checked)
    return _scalar_or_array(np.where(raw > 0, mu, np.nan))


def max_distance(protocol: str, hardware: Hardware, *, tol_km: float = 1e-4, **params: Any) -> float:
    """Largest distance in km with a positive rate (root of the rate; 0.0 if none, inf if unbounded).

    The intensity is the one given (``mu`` or ``hardware.mu``) or optimal at
    each distance. Assumes the rate falls with distance: log-spaced probes
    find the first distance without key, then sections of 32 probes at once
    (a vectorised bisection) bracket the root to ``tol_km``.
    """
    checked = _check_params(protocol, params)
    if not (math.isfinite(tol_km) and tol_km > 0):
        raise ModelError(f"tol_km must be > 0, got {tol_km!r}")

    def positive(d: FloatArray) -> npt.NDArray[np.bool_]:
        return _best(protocol, d, hardware, checked)[1] > 0

    if not positive(np.array([0.0]))[0]:
        return 0.0
    probes = np.geomspace(1.0, _MAX_SEARCH_KM, 64)
    ok = positive(probes)
    if ok.all():
        return math.inf
    first_bad = int(np.argmin(ok))
    lo, hi = (0.0 if first_bad == 0 else float(probes[first_bad - 1])), float(probes[first_bad])
    while hi - lo > tol_km:
        inner = np.linspace(lo, hi, 34)[1:-1]
        ok = positive(inner)
        if ok.all():
            lo = float(inner[-1])
        else:
            k = int(np.argmin(ok))
            lo, hi = (lo if k == 0 else float(inner[k - 1])), float(inner[k])
    return (lo + hi) / 2
