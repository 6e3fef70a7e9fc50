"""How many threads rwkvcpu computes with, and keeping its thread pools from fighting.

Three pools could run our work: numba's (the matrix and elementwise kernels),
the BLAS library's (numpy.matmul), and the workers that split a prompt's GEMMs
(`parallel_for`). They take turns within one forward call, but a pool whose
work has just finished keeps its threads spinning for a while, waiting for
more: measured on a 2-core EPYC, OpenBLAS workers spin for tens of
milliseconds and numba's OpenMP workers for a few. A spinning pool steals the
cores the next pool needs. So:

* BLAS runs on the calling thread only (capped at 1 thread through
  threadpoolctl); a GEMM is split into column blocks by `parallel_for`, whose
  workers sleep on a queue when idle. Nothing of BLAS's own pool is left spinning.
* numba's OpenMP workers spin for GOMP_SPINCOUNT polls before sleeping. Its
  default (300 000, a few ms) is cut to 20 000 (~0.1-0.3 ms): long enough to
  bridge the microseconds between two matvecs of a token, short enough not to
  run into the next GEMM. This is an environment variable that OpenMP reads
  once, when numba first starts its threads; `configure` sets it only if
  neither the user nor an earlier parallel kernel has fixed it.

With `threads=n`, at most n threads compute at any moment, whichever pool
is active. Measured (benchmarks/RESULTS.md, "Threads running at once"): over
a 512-token prompt and 100 decode steps with 2 threads, 3 threads were
runnable in 0.9% of 0.5 ms samples (an OpenMP spin tail meeting a GEMM's
start); 7% with OpenMP's default spin count.

A busy machine hurts: when another process holds a core, each parallel
region waits for the scheduler to run its second thread (about 1 ms on this
Linux), so decode slows many-fold. Give `threads=` no more than the idle cores.

Example:
    >>> from rwkvcpu import threads
    >>> threads.configure(2)
    2
    >>> threads.current()
    2
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from .errors import InvalidArgumentError

_SPINCOUNT = "20000"

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_blas_capped = False


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "core_id") as f1, open(base + "physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def _limit_openmp_spinning() -> None:
    from numba.np.ufunc import parallel
    if not parallel._is_initialized:
        os.environ.setdefault("GOMP_SPINCOUNT", _SPINCOUNT)


def _cap_blas() -> None:
    """BLAS on the calling thread only; our own workers split the GEMMs."""
    global _blas_capped
    if _blas_capped:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        # Without threadpoolctl the BLAS pool keeps its size; results are the same.
        return
    threadpool_limits(limits=1, user_api="blas")
    _blas_capped = True


def configure(threads: Optional[int] = None) -> int:
    """Compute with `threads` threads from now on (in the calling thread).

    Sets numba's thread count for the calling thread, caps BLAS at one thread
    (process-wide: GEMMs are split by `parallel_for` instead), and sizes the
    GEMM workers. Cheap to call again; the engine calls it on load.

    Args:
        threads: a positive int, or None for one per physical core. Values above
            numba's pool size (NUMBA_NUM_THREADS, by default the CPU count) are
            lowered to it.

    Returns:
        the number of threads that will be used.

    Raises:
        InvalidArgumentError (a ValueError): threads is not a positive integer.
    """
    import numba
    if threads is None:
        n = physical_cores()
    else:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError(f"threads must be a positive integer or None, got {threads!r}")
        n = threads
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    with _lock:
        _limit_openmp_spinning()
        _cap_blas()
        _resize_pool(n)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def current() -> int:
    """Threads the calling thread computes with (numba's count for this thread)."""
    import numba
    return numba.get_num_threads()


# Below this many bytes of weights read per token, a model computes on one thread unless told
# otherwise (`for_model`). Measured with the shipped model (29 MB, 2-core EPYC): 1.45 ms/token on
# one thread, 1.07 on two when the machine is quiet but 39 ms at the 90th percentile when another
# process holds a core (each parallel region waits for its second thread); and one thread needs no
# parallel variant of any kernel, which a first start otherwise compiles (~1 s each).
SMALL_MODEL_BYTES = 64 << 20


def for_model(threads: Optional[int], weight_bytes: int) -> Optional[int]:
    """The thread count to configure for a model reading `weight_bytes` per token: `threads` when
    given, one for a model under SMALL_MODEL_BYTES, else None (one per physical core)."""
    if threads is not None:
        return threads
    return 1 if weight_bytes < SMALL_MODEL_BYTES else None


def gemm_threads() -> int:
    """How many blocks to split a GEMM into: current() once `configure` has
    capped BLAS at one thread; before that, 1 (BLAS threads it on its own)."""
    return current() if _blas_capped else 1


def _resize_pool(n: int) -> None:
    global _pool, _pool_size
    # The caller runs one share itself, so n threads need n - 1 workers.
    if n - 1 > _pool_size:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="rwkvcpu-gemm")
        _pool_size = n - 1


def parallel_for(task: Callable[[int], None], count: int) -> None:
    """Run task(0), ..., task(count - 1) on `count` threads: the caller runs
    task(0) and pool workers (started on first use) the others.

    Returns when all are done, re-raising the first exception. Tasks must
    release the GIL for their heavy part (numpy.matmul and nogil numba
    kernels do) and must not write the same memory.
    """
    if count <= 1:
        for k in range(count):
            task(k)
        return
    with _lock:
        _resize_pool(count)
        pool = _pool
    futures = [pool.submit(task, k) for k in range(1, count)]
    try:
        task(0)
    finally:
        for f in futures:
            f.result()
