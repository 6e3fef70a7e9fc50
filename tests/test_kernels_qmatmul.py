"""The int8/int4 kernels on int8 activations (rwkvcpu/kernels/qmatmul.py, idot.py), on every CPU path
this machine can run (kernels/isa.py), against a numpy transcription of their arithmetic:

- exact: the integer group dot products and the canonical float order, written out in numpy, give
  the kernels' results to the bit, on every path, in the row and the tile layouts alike, for any
  number of tokens (so a token alone and the same token in a block or a batch agree to the bit);
- bounded: against the float64 product of the dequantized weights, the error stays within what the
  int8 rounding of the activations (half a step of max|x| / 127 per group) and float32 sums allow.

An AVX2-only CPU is simulated by telling numba to compile for one (a subprocess). The instructions
each path compiles to are checked in tests/test_kernels_simd.py.
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

try:
    from rwkvcpu.formats import FORMATS
except ImportError:  # before the formats moved into the engine
    from rwkvcpu.quant.formats import FORMATS
from rwkvcpu.kernels import isa
from rwkvcpu.kernels import qmatmul as Q

PATHS = isa.usable_paths()
# Widths whose group counts exercise the 16- and 4-group steps and the 1-3 group tails.
SHAPES = [(5, 64), (7, 192), (33, 64 * 13), (20, 64 * 20), (130, 64 * 9)]
TOKENS = sorted({1, 2, Q.ROW_TOKENS, Q.ROW_TOKENS + 1, 8, 11})


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _activations(rng, T, m):
    X = rng.standard_normal((T, m)).astype(np.float32)
    X[:, rng.integers(0, m, max(1, m // 50))] *= 30      # outliers within groups
    return X


def _canonical_sum(p):
    """acc = 0; acc = acc + ((p0 + p2) + (p1 + p3)) per run of 4 groups, in float32 (idot.CANONICAL)."""
    n, ng = p.shape
    p = np.concatenate([p, np.zeros((n, -ng % 4), np.float32)], axis=1).reshape(n, -1, 4)
    runs = (p[:, :, 0] + p[:, :, 2]) + (p[:, :, 1] + p[:, :, 3])
    acc = np.zeros(n, np.float32)
    for k in range(runs.shape[1]):
        acc = acc + runs[:, k]
    return acc


def _expected_int8(parts, X):
    q, scale = parts[""], parts[".scale"].astype(np.float32)
    T, m = X.shape
    xq = np.empty((T, m), np.int8)
    xs = np.empty((T, m // 64), np.float32)
    Q.quantize_i8(X, xq, xs, np.empty((T, m // 64), np.int32))
    out = np.empty((T, q.shape[0]), np.float32)
    for t in range(T):
        dots = (q.reshape(q.shape[0], -1, 64).astype(np.int64) * xq[t].reshape(-1, 64)).sum(axis=2)
        out[t] = _canonical_sum(dots.astype(np.float32) * (scale * xs[t]))
    return out, xq, xs


def _expected_int4(parts, X):
    packed, scale, mins = parts[""], parts[".scale"].astype(np.float32), parts[".min"].astype(np.float32)
    T, m = X.shape
    ng = m // 32
    xq = np.empty((T, m), np.int8)
    xs = np.empty((T, ng), np.float32)
    e = np.empty((T, ng), np.float32)
    Q.quantize_i4(X, xq, xs, e)
    slots = np.array([Q._i4_slot(g, i, ng // 4 * 4) for g in range(ng) for i in range(32)])
    natural = xq[:, slots]
    pk = packed.reshape(packed.shape[0], ng, 16).astype(np.int64)
    levels = np.concatenate([pk & 15, pk >> 4], axis=2)
    out = np.empty((T, packed.shape[0]), np.float32)
    for t in range(T):
        dots = (levels * natural[t].reshape(ng, 32)).sum(axis=2)
        out[t] = _canonical_sum(dots.astype(np.float32) * (scale * xs[t]) + mins * e[t])
    return out, natural, xs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_path_and_layout_gives_the_canonical_bits(path, fmt):
    """Rows (T <= ROW_TOKENS) and tiles (T > ROW_TOKENS) on every path: the numpy transcription's bits."""
    for n, m in SHAPES:
        if fmt == "int4" and m % 32:
            continue
        rng = _rng(path, fmt, n, m)
        parts = FORMATS[fmt].quantize(rng.standard_normal((n, m)).astype(np.float32) * 0.1)
        u16 = {k: (v.view(np.uint16) if v.dtype == np.float16 else v) for k, v in parts.items()}
        for T in TOKENS:
            X = _activations(rng, T, m)
            want = (_expected_int8 if fmt == "int8" else _expected_int4)(parts, X)[0]
            for parallel in ((False, True) if path == PATHS[0] else (False,)):
                out = np.full((T, n), np.nan, np.float32)
                if fmt == "int8":
                    Q.matmul_int8(u16[""], u16[".scale"], X, out, parallel, path=path)
                else:
                    Q.matmul_int4(u16[""], u16[".scale"], u16[".min"], X, out, parallel, path=path)
                assert np.array_equal(out.view(np.int32), want.view(np.int32)), \
                    f"{fmt} {path} {(n, m)} T={T} parallel={parallel}: {np.abs(out - want).max()}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_error_within_the_activation_rounding_bound(fmt):
    """|kernel - W_dequantized @ x| <= |W| @ (half an int8 step of each group) + float32 sums."""
    fmt_cls = FORMATS[fmt]
    for n, m in SHAPES:
        rng = _rng("bound", fmt, n, m)
        parts = fmt_cls.quantize(rng.standard_normal((n, m)).astype(np.float32) * rng.uniform(0.01, 2))
        wd = fmt_cls.dequantize(parts).astype(np.float64)
        X = _activations(rng, 3, m)
        out = (_expected_int8 if fmt == "int8" else _expected_int4)(parts, X)[0]
        for t in range(3):
            x = X[t].astype(np.float64)
            step = np.repeat(np.abs(x).reshape(-1, fmt_cls.group).max(axis=1) / 127.0, fmt_cls.group)
            bound = np.abs(wd) @ (0.5 * step) * 1.001 + 1e-5 * (np.abs(wd) @ np.abs(x)) + 1e-30
            err = np.abs(out[t] - wd @ x)
            assert np.all(err <= bound), f"{fmt} {(n, m)}: worst {np.max(err / bound):.3g}x the bound"


def test_inf_and_nan_propagate():
    """A group of x holding inf or NaN makes every output NaN, as the float product would."""
    rng = _rng("nan")
    for fmt in ("int8", "int4"):
        parts = FORMATS[fmt].quantize(rng.standard_normal((6, 256)).astype(np.float32))
        u16 = {k: (v.view(np.uint16) if v.dtype == np.float16 else v) for k, v in parts.items()}
        for bad in (np.inf, np.nan):
            X = rng.standard_normal((9, 256)).astype(np.float32)
            X[4, 100] = bad
            out = np.zeros((9, 6), np.float32)
            for path in PATHS:
                if fmt == "int8":
                    Q.matmul_int8(u16[""], u16[".scale"], X, out, False, path=path)
                else:
                    Q.matmul_int4(u16[""], u16[".scale"], u16[".min"], X, out, False, path=path)
                assert np.isnan(out[4]).all() and np.isfinite(np.delete(out, 4, axis=0)).all(), (fmt, bad, path)


def test_int8_weights_of_minus_128():
    """-128 is outside the format's range but a file may hold it: every path's integer trick stays exact."""
    rng = _rng("-128")
    q = rng.integers(-128, 128, (6, 192)).astype(np.int8)
    q[:, ::3] = -128
    parts = {"": q, ".scale": np.full((6, 3), 0.5, np.float16)}
    X = _activations(rng, 9, 192)
    want = _expected_int8(parts, X)[0]
    for path in PATHS:
        for T in (1, 9):
            out = np.empty((T, 6), np.float32)
            Q.matmul_int8(q, parts[".scale"].view(np.uint16), X[:T], out, False, path=path)
            assert np.array_equal(out, want[:T]), path


_ISA_CHILD = """
import numpy as np
from rwkvcpu.kernels import isa, qmatmul as Q
try:
    from rwkvcpu.formats import FORMATS
except ImportError:  # before the formats moved into the engine
    from rwkvcpu.quant.formats import FORMATS
print(isa.best_path())
rng = np.random.default_rng(5)
parts = FORMATS["int8"].quantize(rng.standard_normal((40, 320)).astype(np.float32))
X = rng.standard_normal((9, 320)).astype(np.float32)
out = np.empty((9, 40), np.float32)
Q.matmul_int8(parts[""], parts[".scale"].view(np.uint16), X, out, True)
print(out.tobytes().hex())
"""

# Haswell's features: AVX2, FMA, F16C, no AVX-512, no VNNI.
_HASWELL = "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+lzcnt,+movbe,-avx512f,-avx512vnni,-avxvnni"


@pytest.mark.skipif("avx512vnni" not in PATHS, reason="needs a CPU with AVX-512 VNNI to compare against")
def test_an_avx2_only_cpu_gets_the_avx2_path_and_the_same_bits(tmp_path):
    """numba compiling for Haswell (as on an AVX2-only CI machine) selects the AVX2 path, whose
    results equal this CPU's VNNI path to the bit."""
    run = dict(capture_output=True, text=True, check=True)
    native = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "a")),
                            **run).stdout.split()
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_HASWELL, NUMBA_CACHE_DIR=str(tmp_path / "b"))
    haswell = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, **run).stdout.split()
    assert native[0] == "avx512vnni" and haswell[0] == "avx2"
    assert native[1] == haswell[1]
