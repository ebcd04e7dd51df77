"""Circuit-level BB84: QBERs match the channel model, keys agree, lengths match the bound."""

import math
import os
import time

import numpy as np
import pytest

from qkd_sim.bb84 import (
    EVE_NONE,
    EVE_X,
    EVE_Z,
    group_circuit,
    outcome_probabilities,
    run_bb84,
    transmit_and_sift,
)
from qkd_sim.postprocess import binary_entropy, final_key_length, phase_error_deviation
from qstore.errors import LocalError


def within(measured: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    """|measured - expected| within `sigmas` binomial standard deviations (floored at one count)."""
    sd = math.sqrt(max(expected * (1 - expected), 1 / n) / n)
    return abs(measured - expected) <= sigmas * sd


def test_group_probabilities_follow_the_quantum_rules():
    p = 0.1
    table = outcome_probabilities(p)
    for bit in (0, 1):
        for a in (0, 1):
            for b in (0, 1):
                code = ((bit * 2 + a) * 3 + EVE_NONE) * 2 + b
                want = (1 - p / 2 if bit else p / 2) if a == b else 0.5
                assert table[code] == pytest.approx(want)
                # Eve in Alice's basis: undisturbed; in the other one: a coin for Bob.
                eve_same = EVE_Z if a == 0 else EVE_X
                eve_other = EVE_X if a == 0 else EVE_Z
                code_same = ((bit * 2 + a) * 3 + eve_same) * 2 + b
                code_other = ((bit * 2 + a) * 3 + eve_other) * 2 + b
                assert table[code_same] == pytest.approx(want)
                if a == b:
                    assert table[code_other] == pytest.approx(0.5)


def test_circuits_are_genuine_gate_sequences():
    qc = group_circuit(1, 1, EVE_Z, 0, 0.05)
    names = [inst.operation.name for inst in qc.data]
    assert names[:3] == ["x", "h", "cx"]
    assert qc.num_qubits == 2


def test_no_noise_no_errors_and_equal_keys():
    report = run_bb84(200_000, rng=np.random.default_rng(1))
    assert not report.aborted, report.abort_reason
    assert report.qber_estimate == 0.0 and report.qber_true == 0.0
    assert report.errors_corrected == 0
    assert report.alice_key == report.bob_key
    assert len(report.alice_key) * 8 == report.final_key_length > 0
    assert within(report.sifted / report.detected, 0.5, report.detected)


def test_full_intercept_resend_gives_a_quarter_and_aborts():
    report = run_bb84(200_000, eve_fraction=1.0, rng=np.random.default_rng(2))
    assert within(report.qber_estimate, 0.25, report.sample_size)
    assert within(report.qber_true, 0.25, report.key_bits)
    assert report.aborted and "threshold" in report.abort_reason
    assert report.final_key_length == 0 and report.alice_key == report.bob_key == b""


@pytest.mark.parametrize("p", [0.02, 0.06, 0.1, 0.16])
def test_depolarizing_channel_gives_qber_p_over_2(p):
    sifted = transmit_and_sift(400_000, depolarizing=p, rng=np.random.default_rng(int(p * 100)))
    qber = np.mean(sifted.alice != sifted.bob)
    assert within(qber, p / 2, len(sifted.alice))


@pytest.mark.parametrize(("f", "p"), [(0.2, 0.0), (0.4, 0.04), (1.0, 0.1)])
def test_partial_eavesdropping_adds_f_over_4(f, p):
    sifted = transmit_and_sift(400_000, depolarizing=p, eve_fraction=f, rng=np.random.default_rng(3))
    assert within(np.mean(sifted.alice != sifted.bob), p / 2 + (1 - p) * f / 4, len(sifted.alice))


def test_loss_thins_detections_only():
    sifted = transmit_and_sift(400_000, transmittance=0.05, depolarizing=0.04, rng=np.random.default_rng(4))
    assert within(sifted.detected / 400_000, 0.05, 400_000)
    assert within(np.mean(sifted.alice != sifted.bob), 0.02, len(sifted.alice))


@pytest.mark.parametrize("p", [0.02, 0.08, 0.12])
def test_key_length_agrees_with_the_bound(p):
    report = run_bb84(600_000, depolarizing=p, rng=np.random.default_rng(5))
    assert not report.aborted, report.abort_reason
    assert report.alice_key == report.bob_key
    n, e = report.key_bits, report.qber_true
    assert within(report.qber_estimate, p / 2, report.sample_size)
    assert report.errors_corrected == round(e * n)
    # Cascade leaks a little above the Shannon limit.
    ratio = report.leaked_bits / (n * binary_entropy(e))
    assert 1.0 <= ratio <= 1.3
    # Final length = n(1 - h(e)) - leak, less at most the finite-size correction.
    asymptotic = n * (1 - binary_entropy(e)) - report.leaked_bits
    mu = phase_error_deviation(n, report.sample_size, 1e-10)
    correction = n * (binary_entropy(report.qber_estimate + mu) - binary_entropy(e)) + 2 * math.log2(1e10)
    assert asymptotic - correction - 8 <= report.final_key_length <= asymptotic
    assert report.final_key_length == 8 * (
        final_key_length(n, report.qber_estimate, report.leaked_bits, n_sample=report.sample_size) // 8
    )
    print(
        f"p={p}: QBER {report.qber_estimate:.4f} (true {e:.4f}), leak {ratio:.3f}×n·h(e), "
        f"key {report.final_key_length} of {n} bits (asymptotic {asymptotic:.0f})"
    )


def test_above_threshold_aborts_and_below_keeps_going():
    assert run_bb84(100_000, depolarizing=0.3, rng=np.random.default_rng(6)).aborted
    low = run_bb84(100_000, depolarizing=0.3, qber_threshold=0.2, rng=np.random.default_rng(6))
    assert "finite-size" in low.abort_reason  # past Cascade, but no secret key at 15 %


def test_tiny_runs_abort_cleanly():
    assert run_bb84(0, rng=np.random.default_rng(0)).aborted
    report = run_bb84(2000, rng=np.random.default_rng(0))
    assert report.aborted and report.final_key_length == 0


def test_seeded_runs_repeat_and_reports_hide_keys():
    a = run_bb84(50_000, depolarizing=0.04, rng=np.random.default_rng(9))
    b = run_bb84(50_000, depolarizing=0.04, rng=np.random.default_rng(9))
    assert a == b and a.alice_key
    assert a.alice_key.hex() not in repr(a) and "alice_key" not in repr(a)


def test_rejects_impossible_parameters():
    for kw in ({"transmittance": 1.5}, {"depolarizing": -0.1}, {"eve_fraction": 2.0}):
        with pytest.raises(LocalError):
            run_bb84(10, rng=np.random.default_rng(0), **kw)


def test_a_million_photons_in_seconds():
    photons = 10**6
    start = time.perf_counter()
    report = run_bb84(photons, depolarizing=0.06, rng=np.random.default_rng(10))
    elapsed = time.perf_counter() - start
    print(
        f"{photons} photons: {elapsed:.2f} s, QBER {report.qber_estimate:.4f}, key {report.final_key_length}"
    )
    assert report.alice_key == report.bob_key and not report.aborted


@pytest.mark.slow
def test_ten_million_photons():
    photons = 10**7 if os.environ.get("QSTORE_SLOW") else 2 * 10**6
    report = run_bb84(photons, depolarizing=0.1, eve_fraction=0.1, rng=np.random.default_rng(11))
    assert within(report.qber_true, 0.05 + 0.9 * 0.1 / 4, report.key_bits)
    assert report.alice_key == report.bob_key and not report.aborted
