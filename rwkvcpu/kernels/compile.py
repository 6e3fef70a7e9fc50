"""Serial and parallel variants of one kernel, written once as a Python function.

A kernel whose outer loop is a `prange` runs that loop on numba's thread team
when compiled with parallel=True, and as a plain loop otherwise. The engine
wants both: the parallel one for large calls, the serial one for calls so
small that waking the thread team costs more than it saves.

Example:
    >>> def _scale(x, a):
    ...     for i in prange(x.shape[0]):
    ...         x[i] *= a
    >>> scale = compile_kernel(_scale, parallel=True)           # numba name _scale_parallel
    >>> scale_serial = compile_kernel(_scale, parallel=False)   # numba name _scale_serial
"""

from types import FunctionType

from numba import njit


def compile_kernel(f, parallel: bool, fastmath=True):
    """The kernel `f` compiled to run in parallel over its prange, or serially
    on the calling thread (without the GIL, so other Python threads can run
    meanwhile).

    numba's on-disk cache is keyed by a function's name and bytecode, not by the
    compile options: compiling one Python function twice, parallel and serial,
    would load one variant's machine code for the other. So each variant gets a
    function object of its own name (f's name + "_parallel" or "_serial").

    Args:
        f: a plain Python function, valid numba nopython code.
        parallel: run its prange loops on numba's threads.
        fastmath: numba's fastmath option (True, or a set of LLVM flags).

    Returns:
        the numba dispatcher, cached on disk.
    """
    suffix = "_parallel" if parallel else "_serial"
    g = FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__doc__ = f.__doc__
    if parallel:
        return njit(parallel=True, fastmath=fastmath, cache=True)(g)
    return njit(nogil=True, fastmath=fastmath, cache=True)(g)
