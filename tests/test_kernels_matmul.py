"""The matrix kernels against rwkvcpu/formats.py (the ground truth of each format), numpy, and each other.

Every test draws its random inputs from its own seed, fixed by the test's name and
parameters (the same inputs on every run); the seed is in the failure message.
Shapes are deliberately odd: row counts that split unevenly between threads,
input widths whose group count is not a multiple of the 8 groups the SIMD
kernels take at a time, single rows and single groups.
"""

import zlib

import numpy as np
import pytest

from rwkvcpu import matrix as M
from rwkvcpu.kernels import qmatmul as Q
from rwkvcpu.formats import FORMATS

FORMAT_NAMES = ("fp32", "fp16", "int8", "int4")

# (rows, input width): widths are multiples of 64 so that every format applies.
SHAPES = [(1, 64), (3, 64 * 3), (7, 128), (33, 64 * 13), (130, 64 * 9), (257, 1024), (64, 64 * 16 + 64)]


@pytest.fixture
def seeded(request):
    """(generator, seed): the seed is a checksum of the test's name with its parameters."""
    seed = zlib.crc32(request.node.name.encode())
    return np.random.default_rng(seed), seed


def _matrix(fmt, w):
    parts = FORMATS[fmt].quantize(w)
    return M.from_parts(fmt, parts), FORMATS[fmt].dequantize(parts).astype(np.float64)


def _activation_bound(fmt, wd, x):
    """How far the kernel may be from wd @ x (float64): float32 rounding, plus for
    int8/int4 the int8 rounding of x (half a step of max|x over its group| / 127)."""
    bound = 1e-5 * (np.abs(wd) @ np.abs(x)) + 1e-30
    group = FORMATS[fmt].group
    if fmt in ("int8", "int4"):
        step = np.repeat(np.abs(x).reshape(-1, group).max(axis=1) / 127.0, group)
        bound += np.abs(wd) @ (0.5 * step) * 1.01
    return bound


def _x(rng, k):
    # Mixed magnitudes within a group, as activations with outliers have.
    x = rng.standard_normal(k).astype(np.float32)
    x[rng.integers(0, k, max(1, k // 50))] *= 30
    return x


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matvec_matches_dequantized_product(fmt, shape, seeded):
    rng, seed = seeded
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2)).astype(np.float32)
    m, wd = _matrix(fmt, w)
    x = _x(rng, shape[1])
    out = np.full(shape[0], np.nan, np.float32)
    assert M.matvec(m, x, out) is out
    ref = wd @ x.astype(np.float64)
    err = np.abs(out - ref)
    bound = _activation_bound(fmt, wd, x.astype(np.float64))
    assert np.all(err <= bound), f"seed {seed}: worst excess {np.max(err / bound):.3g}x the bound"


@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernel_matches_its_plain_reference(shape, T, seeded):
    """The int8 product (rows for one token, 8-token tiles for more; the CPU's widest integer
    multiply-add) gives, to the bit, what matmul_int8_reference computes plainly: the same int8
    activations, exact group dot products and float32 sums in the same order."""
    rng, seed = seeded
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2)).astype(np.float32)
    m, _ = _matrix("int8", w)
    X = np.stack([_x(rng, shape[1]) for _ in range(T)])
    ref = np.empty((T, shape[0]), np.float32)
    Q.matmul_int8_reference(m.q, m.scale, X, ref)
    out = M.matmul(m, X, np.empty((T, shape[0]), np.float32))
    np.testing.assert_array_equal(out, ref, err_msg=f"seed {seed}")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("T", [1, 5])
def test_serial_and_parallel_kernels_agree_to_the_bit(fmt, T, seeded):
    """The same kernel code runs on one thread for small products and on all for big ones;
    matrix.matmul picks by the amount of work, which must not change a single bit."""
    rng, seed = seeded
    w = rng.standard_normal((301, 64 * 11)).astype(np.float32)
    m, _ = _matrix(fmt, w)
    X = np.stack([_x(rng, w.shape[1]) for _ in range(T)])
    a = np.empty((T, 301), np.float32)
    b = np.empty((T, 301), np.float32)
    FORMATS[fmt].matmul(m, X, a, parallel=True)
    FORMATS[fmt].matmul(m, X, b, parallel=False)
    np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_one_token_equals_its_row_of_a_block(fmt, seeded):
    """What makes the engine's two paths agree: row t of a T-token product is, to the bit,
    the product of token t alone (int8/int4: each row is rounded to int8 on its own)."""
    rng, seed = seeded
    w = rng.standard_normal((257, 64 * 9)).astype(np.float32)
    m, _ = _matrix(fmt, w)
    X = np.stack([_x(rng, w.shape[1]) for _ in range(7)])
    block = M.matmul(m, X, np.empty((7, 257), np.float32))
    for t in range(7):
        one = M.matvec(m, X[t], np.empty(257, np.float32))
        np.testing.assert_array_equal(one, block[t], err_msg=f"seed {seed}, token {t}")


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_quantized_matvec_propagates_nan_and_inf(fmt, seeded):
    rng, _ = seeded
    m, _ = _matrix(fmt, rng.standard_normal((40, 256)).astype(np.float32))
    for bad in (np.nan, np.inf):
        x = rng.standard_normal(256).astype(np.float32)
        x[100] = bad
        out = np.zeros(40, np.float32)
        M.matvec(m, x, out)
        assert np.all(np.isnan(out)), bad


def test_zero_activations_give_zero(seeded):
    rng, _ = seeded
    for fmt in ("int8", "int4"):
        m, wd = _matrix(fmt, rng.standard_normal((20, 128)).astype(np.float32))
        x = np.zeros(128, np.float32)
        x[:64] = rng.standard_normal(64)   # the second group is all zeros
        out = np.empty(20, np.float32)
        M.matvec(m, x, out)
        xd = x.astype(np.float64)
        assert np.all(np.abs(out - wd @ xd) <= _activation_bound(fmt, wd, xd))


def test_activation_quantization(seeded):
    """int8 levels per group: scale max|x| / 127, within half a step of x; int4's row layout holds
    the same levels in its own order, with xs * sum(levels) per group."""
    rng, seed = seeded
    X = np.stack([_x(rng, 32 * 14) for _ in range(2)])
    xq, xs, xc = np.empty(X.shape, np.int8), np.empty((2, 7), np.float32), np.empty((2, 7), np.int32)
    Q.quantize_i8(X, xq, xs, xc)
    g = X.reshape(2, 7, 64)
    np.testing.assert_allclose(xs, np.abs(g).max(axis=2) / 127, rtol=1e-6, err_msg=f"seed {seed}")
    assert np.abs(xq.astype(int)).max() <= 127
    assert np.all(np.abs(xq.reshape(2, 7, 64) * xs[:, :, None] - g) <= xs[:, :, None] * 0.5001), f"seed {seed}"
    np.testing.assert_array_equal(xc, 128 * xq.reshape(2, 7, 64).astype(np.int32).sum(axis=2))
    q4, xs4, e4 = np.empty(X.shape, np.int8), np.empty((2, 14), np.float32), np.empty((2, 14), np.float32)
    Q.quantize_i4(X, q4, xs4, e4)
    slots = [Q._i4_slot(gr, i, 12) for gr in range(14) for i in range(32)]
    assert sorted(slots) == list(range(32 * 14))
    natural = q4[:, slots].reshape(2, 14, 32)
    np.testing.assert_allclose(xs4, np.abs(X.reshape(2, 14, 32)).max(axis=2) / 127, rtol=1e-6)
    assert np.all(np.abs(natural * xs4[:, :, None] - X.reshape(2, 14, 32)) <= xs4[:, :, None] * 0.5001)
    np.testing.assert_array_equal(e4, xs4 * natural.astype(np.int32).sum(axis=2).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_dequantize_rows_matches_format(fmt, seeded):
    rng, seed = seeded
    w = rng.standard_normal((150, 64 * 5)).astype(np.float32)
    parts = FORMATS[fmt].quantize(w)
    m = M.from_parts(fmt, parts)
    ref = FORMATS[fmt].dequantize(parts)
    whole = M.dequantize(m)
    np.testing.assert_allclose(whole, ref, rtol=1e-6, atol=1e-7, err_msg=f"seed {seed}")
    # One row (the embedding lookup), and a block in the middle, serial and parallel sizes.
    for r0, rows in ((0, 1), (149, 1), (17, 3), (5, 140)):
        out = np.empty((rows, w.shape[1]), np.float32)
        M.dequantize_rows(m, r0, out)
        np.testing.assert_allclose(out, ref[r0:r0 + rows], rtol=1e-6, atol=1e-7, err_msg=f"seed {seed}")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("T,n,k", [(2, 33, 64), (7, 300, 192), (40, 517, 256), (64, 1024, 320)])
def test_matmul_matches_dequantized_gemm(fmt, T, n, k, seeded):
    rng, seed = seeded
    w = rng.standard_normal((n, k)).astype(np.float32)
    m, wd = _matrix(fmt, w)
    X = np.stack([_x(rng, k) for _ in range(T)])
    for product in (M.matmul, M.gemm):
        out = np.full((T, n), np.nan, np.float32)
        assert product(m, X, out) is out
        for t in range(T):
            x = X[t].astype(np.float64)
            # int8/int4 matmul rounds activations to int8; gemm multiplies the float32 ones
            bound = _activation_bound(fmt if product is M.matmul else "fp32", wd, x)
            err = np.abs(out[t] - wd @ x)
            assert np.all(err <= bound), f"seed {seed}, {product.__name__}, token {t}"


def test_from_parts_rejects_mismatched_scales():
    from rwkvcpu.errors import ModelFormatError
    parts = FORMATS["int8"].quantize(np.ones((4, 128), np.float32))
    with pytest.raises(ModelFormatError, match="int8"):
        M.from_parts("int8", {"": parts[""], ".scale": parts[".scale"][:, :1]})
    parts = FORMATS["int4"].quantize(np.ones((4, 64), np.float32))
    with pytest.raises(ModelFormatError, match="int4"):
        M.from_parts("int4", {"": parts[""], ".scale": parts[".scale"], ".min": parts[".min"][:3]})


def test_nbytes_counts_every_part():
    parts = FORMATS["int4"].quantize(np.ones((8, 64), np.float32))
    m = M.from_parts("int4", parts)
    assert M.nbytes(m) == 8 * 32 + 2 * (8 * 2 * 2)
    assert M.format_of(m) == "int4"
