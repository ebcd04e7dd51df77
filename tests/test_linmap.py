"""Every kernel equals the plain reference: byte-wise GF(2^8) arithmetic, one scalar at a time."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstore import _simd, gf256, linmap
from qstore.rng import AesCtrRandom

# Around the kernels' group sizes (256 and 512 bytes) and a random segment.
LENGTHS = [0, 1, 63, 255, 256, 257, 511, 512, 513, 5000, linmap.SEGMENT + 77]


def reference(matrix, sources):
    """Scalar GF(2^8) at sampled positions plus the numpy product table everywhere."""
    out = []
    for row in matrix:
        acc = np.zeros(len(sources[0]), dtype=np.uint8)
        for c, s in zip(row, sources, strict=True):
            acc ^= gf256.MUL[c][s]
        out.append(acc)
    for p in {0, len(sources[0]) // 2, len(sources[0]) - 1} if len(sources[0]) else ():
        for o, row in enumerate(matrix):
            v = 0
            for c, s in zip(row, sources, strict=True):
                v ^= gf256.mul(c, int(s[p]))
            assert out[o][p] == v
    return np.array(out).reshape(len(matrix), -1)


@pytest.mark.parametrize("length", LENGTHS)
def test_linear_map_matches_reference(backend, length):
    rng = np.random.default_rng(length)
    matrix = rng.integers(0, 256, size=(4, 3)).tolist()
    matrix[0] = [1, 0, 0]
    matrix[1] = [0, 0, 0]
    sources = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(3)]
    out = linmap.empty_rows(4, length)
    linmap.LinearMap(matrix, backend).apply(sources, out)
    assert np.array_equal(out, reference(matrix, sources))
    assert out[0].tobytes() == sources[0].tobytes()
    assert not out[1].any()


@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(0, 3000), st.integers(0, 2**32 - 1)
)
def test_all_backends_agree(n_out, n_in, length, seed):
    rng = np.random.default_rng(seed)
    matrix = rng.integers(0, 256, size=(n_out, n_in)).tolist()
    sources = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(n_in)]
    expect = reference(matrix, sources)
    for backend in linmap.available_backends():
        out = linmap.empty_rows(n_out, length)
        linmap.LinearMap(matrix, backend).apply(sources, out)
        assert np.array_equal(out, expect), backend


def test_random_sources_are_drawn_per_segment_and_wiped(backend):
    length = 2 * linmap.SEGMENT + 5
    secret = np.arange(length, dtype=np.uint64).astype(np.uint8)
    matrix = [[1, 1], [1, 0], [0, 1]]
    out = linmap.empty_rows(3, length)
    linmap.LinearMap(matrix, backend).apply([secret, None], out, AesCtrRandom(bytes(32)))
    stream = bytearray(-(-length // 512) * 512)
    AesCtrRandom(bytes(32)).fill(memoryview(stream))
    assert out[1].tobytes() == secret.tobytes()
    assert out[2].tobytes() == bytes(stream[:length])  # one random row: the stream in order
    assert np.array_equal(out[0], secret ^ out[2])


def test_backend_selection(monkeypatch):
    have = linmap.available_backends()
    assert have[-1] == "numpy"
    monkeypatch.setenv("QSTORE_KERNEL", "numpy")
    assert linmap.default_backend() == "numpy"
    monkeypatch.setenv("QSTORE_KERNEL", "quantum-annealer")
    with pytest.raises(ValueError):
        linmap.default_backend()
    monkeypatch.delenv("QSTORE_KERNEL")
    assert linmap.default_backend() == have[0]


def test_cpu_features_decide_kernels():
    assert set(_simd.available()) <= {"gfni512", "gfni256", "avx2"}
    assert set(_simd.aes_available()) <= {"vaes512", "aesni"}


@pytest.mark.parametrize("length", [1, 511, 512, 3 * 512 + 1, linmap.SEGMENT + 1000])
@pytest.mark.parametrize("n_rand", [1, 2, 4])
def test_in_kernel_randomness_equals_drawn_stream(length, n_rand):
    """Every backend (AES made inside the kernel, or the stream drawn outside) gives the same bytes."""
    rng = np.random.default_rng(length + n_rand)
    matrix = rng.integers(0, 256, size=(5, 1 + n_rand)).tolist()
    secret = rng.integers(0, 256, length, dtype=np.uint8)
    key = bytes(range(32))
    outs = {}
    for backend in linmap.available_backends():
        out = linmap.empty_rows(5, length)
        gen = AesCtrRandom(key)
        gen.reserve(4096)  # the stream position must come from reserve(), not from 0
        linmap.LinearMap(matrix, backend).apply([secret] + [None] * n_rand, out, gen)
        outs[backend] = out.copy()
    # The documented layout, computed by hand from the keystream.
    units = -(-length // 512)
    stream = bytearray(units * n_rand * 512)
    AesCtrRandom(key).fill(memoryview(stream), 4096)
    coeffs = np.frombuffer(bytes(stream), np.uint8).reshape(units, n_rand, 512).transpose(1, 0, 2)
    coeffs = coeffs.reshape(n_rand, -1)[:, :length]
    expect = reference(matrix, [secret, *coeffs])
    for backend, out in outs.items():
        assert np.array_equal(out, expect), backend


def test_one_generator_never_repeats_coefficients(backend):
    gen = AesCtrRandom(bytes(32))
    matrix = [[1, 1], [1, 2]]
    zeros = np.zeros(3000, dtype=np.uint8)
    a, b = linmap.empty_rows(2, 3000), linmap.empty_rows(2, 3000)
    lm = linmap.LinearMap(matrix, backend)
    lm.apply([zeros, None], a, gen)
    lm.apply([zeros, None], b, gen)
    assert not np.array_equal(a, b)


def test_apply_rejects_bad_shapes():
    lm = linmap.LinearMap([[1, 2]], "numpy")
    a = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError):
        lm.apply([a], linmap.empty_rows(1, 10))
    with pytest.raises(ValueError):
        lm.apply([a, np.zeros(11, dtype=np.uint8)], linmap.empty_rows(1, 10))
    with pytest.raises(ValueError):
        lm.apply([a, None], linmap.empty_rows(1, 10))  # randomness without an rng
    with pytest.raises(ValueError):
        lm.apply([a, a], np.zeros((1, 20), dtype=np.uint8)[:, ::2])  # rows not contiguous
    with pytest.raises(ValueError):
        linmap.LinearMap([[1, 256]])
    with pytest.raises(ValueError):
        linmap.LinearMap([[1, 2]], "gpu")  # type: ignore[arg-type]


def test_unaligned_and_strided_outputs(backend):
    """Rows that are not 64-byte aligned take the cached-store kernel and give the same bytes."""
    rng = np.random.default_rng(11)
    matrix = rng.integers(0, 256, size=(3, 2)).tolist()
    length = 4000
    sources = [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(2)]
    raw = np.zeros((3, length + 9), dtype=np.uint8)
    out = raw[:, 3 : 3 + length]
    linmap.LinearMap(matrix, backend).apply(sources, out)
    assert np.array_equal(out, reference(matrix, sources))
    assert not raw[:, :3].any() and not raw[:, 3 + length :].any()  # nothing written outside


def test_pure_numpy_path_needs_no_jit():
    """QSTORE_KERNEL=numpy: sharing works and llvmlite is never even imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from qstore import sharing\n"
        "data = bytes(range(256)) * 5000\n"
        "shares = sharing.split(data, 5, 3)\n"
        "assert sharing.combine(shares[2:]) == data\n"
        "assert sharing.combine(shares) == data\n"
        "print('llvmlite' in sys.modules)\n"
    )
    env = {**__import__("os").environ, "QSTORE_KERNEL": "numpy"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
