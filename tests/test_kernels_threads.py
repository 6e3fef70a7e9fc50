"""Thread control: rwkvcpu.threads.configure and the GEMM workers of matrix.matmul."""

import threading

import numba
import numpy as np
import pytest

from rwkvcpu import matrix as M
from rwkvcpu import threads
from rwkvcpu.formats import FORMATS


@pytest.fixture
def restore_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_configure_sets_numba_threads(restore_threads):
    assert threads.configure(1) == 1
    assert numba.get_num_threads() == 1 == threads.current()
    n = threads.configure(None)
    assert n == min(threads.physical_cores(), numba.config.NUMBA_NUM_THREADS)
    assert threads.configure(10_000) == numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_configure_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads"):
        threads.configure(bad)


def test_configure_caps_blas_at_one_thread(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads.configure(2)
    for lib in threadpoolctl.threadpool_info():
        if lib["user_api"] == "blas":
            assert lib["num_threads"] == 1, lib


def test_parallel_for_runs_every_task_once(restore_threads):
    threads.configure(2)
    seen = []
    lock = threading.Lock()

    def task(k):
        with lock:
            seen.append(k)

    threads.parallel_for(task, 5)
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_parallel_for_reraises(restore_threads):
    threads.configure(2)

    def task(k):
        if k == 1:
            raise RuntimeError("task 1 failed")

    with pytest.raises(RuntimeError, match="task 1"):
        threads.parallel_for(task, 2)


@pytest.mark.parametrize("fmt", ("fp32", "int8", "int4"))
def test_matmul_same_result_on_any_thread_count(restore_threads, fmt):
    """Our kernels give the same bits on 1 and 2 threads (each output row is one thread's work,
    summed in the same order). BLAS GEMMs split between threads give the dequantized product
    within float32 summation error: k roundings of sum |x w| per output (k = 512 inputs)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((700, 512)).astype(np.float32)
    parts = FORMATS[fmt].quantize(w)
    m = M.from_parts(fmt, parts)
    X = rng.standard_normal((32, 512)).astype(np.float32)
    wd = FORMATS[fmt].dequantize(parts).astype(np.float64)
    ref = X.astype(np.float64) @ wd.T
    bound = 512 * 2.0 ** -24 * (np.abs(X.astype(np.float64)) @ np.abs(wd).T)
    results = []
    for n_threads in (1, 2):
        threads.configure(n_threads)
        out = np.empty((32, 700), np.float32)
        FORMATS[fmt].matmul(m, X, out, parallel=True)
        results.append(out)
        blas = M.gemm(m, X, np.empty((32, 700), np.float32))
        assert np.all(np.abs(blas - ref) <= bound)
    np.testing.assert_array_equal(results[0], results[1])


_CACHE_CHECK = """
import numpy as np
from numba.np.ufunc import parallel
from rwkvcpu.kernels import matmul as K
w = np.ones((64, 64), np.float32); x = np.ones((1, 64), np.float32); out = np.empty((1, 64), np.float32)
K.matmul_f32_serial(w, x, out)   # compiled and written to the (empty) cache first
assert not parallel._is_initialized
K.matmul_f32(w, x, out)          # must not load the serial variant's machine code
print(parallel._is_initialized)
"""


def test_parallel_kernels_are_not_served_from_the_serial_variants_cache(tmp_path):
    """numba caches by function name and bytecode: the two variants of a kernel must not collide."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for _ in range(2):      # the second time, both variants come from the cache
        out = subprocess.run([sys.executable, "-c", _CACHE_CHECK], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "True", "the parallel kernel never started numba's threads"
