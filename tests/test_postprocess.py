"""Cascade, Toeplitz hashing and key length: exact on small cases, efficient on large ones."""

import math
import os

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from qkd_sim import postprocess
from qkd_sim.postprocess import (
    CascadeAlice,
    QueryError,
    ReconciliationError,
    binary_entropy,
    cascade,
    final_key_length,
    phase_error_deviation,
    toeplitz_hash,
    toeplitz_hash_reference,
)
from qstore.errors import LocalError, RemoteError

bits = st.integers(0, 2**32 - 1).map(np.random.default_rng)


def noisy_pair(rng, n, qber):
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    errors = (rng.random(n) < qber).astype(np.uint8)
    return alice, alice ^ errors, int(errors.sum())


# --- binary entropy -----------------------------------------------------------


def test_binary_entropy_values():
    assert binary_entropy(0) == 0.0
    assert binary_entropy(1) == 0.0
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-4)  # the BB84 11 % threshold
    p = np.linspace(0, 1, 101)
    h = binary_entropy(p)
    assert h.shape == p.shape
    np.testing.assert_allclose(h, h[::-1], atol=1e-12)
    with pytest.raises(LocalError):
        binary_entropy(1.5)


# --- Toeplitz hashing -----------------------------------------------------------


@st.composite
def hash_inputs(draw, max_n=80, max_m=80):
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(1, max_m))
    rng = draw(bits)
    return rng.integers(0, 2, n, dtype=np.uint8), m, rng.integers(0, 2, n + m - 1, dtype=np.uint8)


@given(hash_inputs())
def test_toeplitz_equals_matrix_product(case):
    x, m, seed = case
    n = len(x)
    expected = toeplitz_hash_reference(x, m, seed)
    # Independently: scipy's Toeplitz from first column and first row.
    t = scipy.linalg.toeplitz(seed[n - 1 :], seed[n - 1 :: -1]).astype(np.int64)
    assert np.array_equal(expected, (t @ x) % 2)
    assert np.array_equal(toeplitz_hash(x, m, seed), expected)


@given(hash_inputs(max_n=200, max_m=200))
def test_toeplitz_blockwise_path_equals_matrix_product(case):
    x, m, seed = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(postprocess, "_TOEPLITZ_BLOCK", 8)  # small inputs then span many blocks
        got = toeplitz_hash(x, m, seed)
    assert np.array_equal(got, toeplitz_hash_reference(x, m, seed))


@given(hash_inputs(), bits)
def test_toeplitz_is_linear(case, rng):
    x, m, seed = case
    y = rng.integers(0, 2, len(x), dtype=np.uint8)
    assert np.array_equal(
        toeplitz_hash(x ^ y, m, seed), toeplitz_hash(x, m, seed) ^ toeplitz_hash(y, m, seed)
    )


def test_toeplitz_large_rows_are_exact():
    rng = np.random.default_rng(7)
    n, m = 300_000, 150_000
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    y = toeplitz_hash(x, m, seed)
    j = np.arange(n)
    for i in (0, 1, 12345, m // 2, m - 1):
        assert y[i] == (seed[i - j + n - 1].astype(np.int64) @ x) % 2
    assert 0.45 < y.mean() < 0.55


def test_toeplitz_rejects_wrong_seed_length_and_allows_empty_output():
    x = np.ones(10, dtype=np.uint8)
    with pytest.raises(LocalError):
        toeplitz_hash(x, 4, np.zeros(12, dtype=np.uint8))
    assert toeplitz_hash(x, 0, np.zeros(9, dtype=np.uint8)).size == 0
    with pytest.raises(LocalError):
        toeplitz_hash(np.array([0, 2]), 1, np.zeros(2, dtype=np.uint8))


# --- Cascade ------------------------------------------------------------------


@given(st.integers(1, 4000), st.floats(0.01, 0.08), bits)
def test_cascade_corrects_random_errors(n, qber, rng):
    alice_key, bob_key, _ = noisy_pair(rng, n, qber)
    alice = CascadeAlice(alice_key)
    result = cascade(bob_key, alice, qber, rng=rng)
    assert np.array_equal(result.key, alice_key)
    # Bob's ledger and Alice's agree: every disclosed bit is counted once.
    assert result.leaked_bits == alice.leaked_bits
    assert result.n_queries == alice.n_queries


@pytest.mark.parametrize("qber", [0.01, 0.02, 0.05, 0.08])
def test_cascade_leak_is_close_to_shannon_limit(qber):
    rng = np.random.default_rng(int(qber * 1000))
    n = 200_000
    alice_key, bob_key, errors = noisy_pair(rng, n, qber)
    result = cascade(bob_key, CascadeAlice(alice_key), qber, rng=rng)
    assert np.array_equal(result.key, alice_key)
    ratio = result.leaked_bits / (n * binary_entropy(errors / n))
    print(f"QBER {qber:.0%}: leak {result.leaked_bits} = {ratio:.3f} × n·h(e), {result.n_queries} messages")
    assert 1.0 <= ratio <= 1.3
    assert result.n_queries < 200  # lock-step binary searches: messages don't grow with errors


@pytest.mark.slow
def test_cascade_leak_at_a_million_bits():
    n = 1_000_000 if os.environ.get("QSTORE_SLOW") else 400_000
    for qber in (0.01, 0.05, 0.08):
        rng = np.random.default_rng(int(qber * 1000))
        alice_key, bob_key, errors = noisy_pair(rng, n, qber)
        result = cascade(bob_key, CascadeAlice(alice_key), qber, rng=rng)
        assert np.array_equal(result.key, alice_key)
        assert 1.0 <= result.leaked_bits / (n * binary_entropy(errors / n)) <= 1.25


def test_cascade_without_errors_leaks_little_and_changes_nothing():
    rng = np.random.default_rng(1)
    key = rng.integers(0, 2, 100_000, dtype=np.uint8)
    result = cascade(key, CascadeAlice(key), 0.0, rng=rng)
    assert np.array_equal(result.key, key)
    assert result.leaked_bits < 0.005 * len(key)


def test_cascade_survives_an_underestimated_qber():
    rng = np.random.default_rng(2)
    alice_key, bob_key, _ = noisy_pair(rng, 50_000, 0.06)
    result = cascade(bob_key, CascadeAlice(alice_key), 0.01, rng=rng)
    assert np.array_equal(result.key, alice_key)


def test_cascade_leaves_bob_key_untouched_and_handles_empty():
    rng = np.random.default_rng(3)
    alice_key, bob_key, _ = noisy_pair(rng, 1000, 0.05)
    before = bob_key.copy()
    cascade(bob_key, CascadeAlice(alice_key), 0.05, rng=rng)
    assert np.array_equal(bob_key, before)
    empty = np.zeros(0, dtype=np.uint8)
    result = cascade(empty, CascadeAlice(empty), 0.05, rng=rng)
    assert result.key.size == 0 and result.leaked_bits == 0 and result.n_queries == 0


class RecordingChannel:
    """A transport between Bob and Alice that only sees messages (sans-IO check)."""

    def __init__(self, alice):
        self.alice = alice
        self.parity_bits = 0
        self.hash_bits = 0

    def parities(self, indices, starts):
        self.parity_bits += len(starts)
        return self.alice.parities(indices, starts)

    def hash_tag(self, seed_bits, tag_bits):
        self.hash_bits += tag_bits
        return self.alice.hash_tag(seed_bits, tag_bits)


def test_cascade_leak_is_exactly_what_crossed_the_channel():
    rng = np.random.default_rng(4)
    alice_key, bob_key, _ = noisy_pair(rng, 20_000, 0.03)
    channel = RecordingChannel(CascadeAlice(alice_key))
    result = cascade(bob_key, channel, 0.03, rng=rng, verify_bits=64)
    assert result.leaked_bits == channel.parity_bits + channel.hash_bits
    assert channel.hash_bits == 64


class LyingHash(CascadeAlice):
    """Answers parities honestly but hashes a different key."""

    def hash_tag(self, seed_bits, tag_bits):
        self.leaked_bits += tag_bits
        self.n_queries += 1
        return 1 - super().hash_tag(seed_bits, tag_bits)


def test_cascade_verification_catches_a_mismatch():
    rng = np.random.default_rng(5)
    alice_key, bob_key, _ = noisy_pair(rng, 5000, 0.03)
    with pytest.raises(ReconciliationError) as info:
        cascade(bob_key, LyingHash(alice_key), 0.03, rng=rng, max_extra_passes=2)
    assert isinstance(info.value, RemoteError)


@given(st.lists(st.integers(-5, 30), max_size=20), st.lists(st.integers(-5, 30), max_size=6))
def test_alice_rejects_garbage_queries_with_remote_errors_only(indices, starts):
    alice = CascadeAlice(np.ones(20, dtype=np.uint8))
    try:
        answer = alice.parities(np.array(indices, dtype=np.intp), np.array(starts, dtype=np.intp))
    except QueryError:
        assert alice.leaked_bits == 0
    else:
        assert len(answer) == len(starts) == alice.leaked_bits


def test_alice_answers_segment_parities():
    key = np.array([1, 0, 1, 1, 0, 1], dtype=np.uint8)
    alice = CascadeAlice(key)
    answer = alice.parities(np.array([0, 1, 3, 5, 4]), np.array([0, 2, 4]))
    assert answer.tolist() == [1, 0, 0]
    assert alice.leaked_bits == 3 and alice.n_queries == 1


# --- key length -------------------------------------------------------------------


def test_asymptotic_length_is_shor_preskill():
    n, e, leak = 1_000_000, 0.05, 330_000
    assert final_key_length(n, e, leak) == math.floor(n * (1 - binary_entropy(e)) - leak)
    assert final_key_length(n, 0.11, int(1.2 * n * binary_entropy(0.11))) == 0
    assert final_key_length(n, 0.5, 0) == 0
    assert final_key_length(0, 0.01, 0) == 0


@pytest.mark.parametrize("qber", [0.0, 0.02, 0.05])
def test_finite_size_length_approaches_asymptotic(qber):
    gaps = []
    for n in (10**5, 10**6, 10**7, 10**8):
        k = n // 9  # a 10 % sample of the sifted bits
        leak = int(1.15 * n * binary_entropy(qber))
        asym = final_key_length(n, qber, leak)
        fin = final_key_length(n, qber, leak, n_sample=k)
        mu = phase_error_deviation(n, k, 1e-10)
        correction = n * (binary_entropy(min(qber + mu, 0.5)) - binary_entropy(qber)) + 2 * math.log2(1e10)
        assert 0 <= asym - fin <= correction + 1
        gaps.append((asym - fin) / n)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < gaps[0] / 10


def test_phase_error_deviation_shrinks_like_one_over_root_k():
    mu1 = phase_error_deviation(10**6, 10**4, 1e-10)
    mu2 = phase_error_deviation(10**6, 4 * 10**4, 1e-10)
    assert mu2 == pytest.approx(mu1 / 2, rel=0.02)
    assert phase_error_deviation(10**6, 10**4, 1e-10) == pytest.approx(
        math.sqrt((10**6 + 10**4) / (10**6 * 10**4) * (10**4 + 1) / 10**4 * math.log(1e10))
    )
