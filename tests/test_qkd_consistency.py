"""The circuit-level BB84 run agrees with the analytic key-rate model (ARCHITECTURE §6)."""

import math

import numpy as np
import pytest

from qkd_sim import models
from qkd_sim.bb84 import DEFAULT_SAMPLE_FRACTION, run_bb84
from qkd_sim.postprocess import binary_entropy, phase_error_deviation


@pytest.mark.parametrize("noise,transmittance,least", [(0.04, 1.0, 0.6), (0.08, 1.0, 0.6), (0.06, 0.3, 0.45)])
def test_bb84_final_key_matches_shor_preskill_within_finite_size(noise, transmittance, least):
    photons = 400_000
    report = run_bb84(photons, depolarizing=noise, transmittance=transmittance,
                      rng=np.random.default_rng(11))
    assert not report.aborted and report.alice_key == report.bob_key
    e = noise / 2  # a depolarising channel with probability p flips a sifted bit with probability p/2
    assert abs(report.qber_estimate - e) < 0.01
    f = report.leaked_bits / ((report.sifted - report.sample_size) * binary_entropy(report.qber_estimate))
    assert 1.0 <= f < 1.4  # Cascade's measured inefficiency
    # The same link in the analytic model: ideal single photons, transmittance as the channel,
    # the depolarising noise as misalignment error, and the measured f.
    hw = models.Hardware(
        fiber_loss_db_per_km=0.2, detector_efficiency=transmittance, dark_count_prob=0.0,
        misalignment=e, ec_inefficiency=f, repetition_rate_hz=1.0,
    )
    per_pulse = float(models.key_rate("bb84-single-photon", 0.0, hw))
    asymptotic = per_pulse * photons * (1 - DEFAULT_SAMPLE_FRACTION)
    # Finite size: the phase-error rate is bounded by e + mu, and 2 log2(1/eps) bits go to hashing.
    n_key = report.sifted - report.sample_size
    mu = phase_error_deviation(n_key, report.sample_size, 1e-10)
    finite = n_key * (1 - binary_entropy(min(0.5, report.qber_estimate + mu))) - report.leaked_bits
    finite -= 2 * math.log2(1e10)
    assert report.final_key_length <= asymptotic * 1.03  # never more than the asymptotic formula
    assert report.final_key_length >= 0.97 * finite - 8  # and at least the finite-size bound (whole bytes)
    assert report.final_key_length >= least * asymptotic  # the finite-size price shrinks with more bits
