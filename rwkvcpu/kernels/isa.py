"""Which integer multiply-add instructions the quantized kernels use on this CPU (kernels/idot.py).

numba compiles for one target: the host CPU, or NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
when they are set (numba reads them itself; CI sets them to compile for an
AVX2-only CPU). The path is chosen from exactly the features numba compiles
with, so a path is only ever compiled where LLVM can emit its instructions
and the CPU can run them:

    avx512vnni   AVX-512 F/BW/VL with VNNI (Ice Lake and later Xeons, Zen 4 and later)
    avxvnni      AVX-VNNI (Alder Lake and later client cores, Zen 5 without AVX-512)
    avx2         AVX2 (Haswell and later, Zen 1-3)
    generic      anything else (LLVM's own vectorisation; other architectures)

Every path computes the same numbers to the bit (kernels/idot.py), so the
choice changes speed only.

Example:
    >>> from rwkvcpu.kernels import isa
    >>> isa.best_path()
    'avx512vnni'
"""

from __future__ import annotations

import functools
import platform

_BASE = frozenset({"avx2", "fma", "f16c"})
# What each path needs from the target (any one of the sets), besides the x86-64 architecture.
# The 256-bit vpdpbusd of "avxvnni" is also there, EVEX-encoded, on AVX-512 VNNI CPUs.
REQUIRES = {
    "avx512vnni": (_BASE | {"avx512f", "avx512bw", "avx512vl", "avx512vnni"},),
    "avxvnni": (_BASE | {"avxvnni"}, _BASE | {"avx512f", "avx512vl", "avx512vnni"}),
    "avx2": (_BASE,),
    "generic": (frozenset(),),
}


def target_features() -> frozenset:
    """The CPU features numba compiles for (its NUMBA_CPU_FEATURES, else the host's), as names
    without the leading '+' ("avx2", "avx512vnni", ...)."""
    from llvmlite import binding
    from numba.core import config
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else binding.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))


def usable_paths(features=None) -> tuple:
    """The paths the target can compile and run, fastest first; always ends with "generic"."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("generic",)
    features = target_features() if features is None else frozenset(features)
    return tuple(p for p, options in REQUIRES.items() if any(need <= features for need in options))


@functools.cache
def best_path() -> str:
    """The fastest path for the target numba compiles for (fixed for the process)."""
    return usable_paths()[0]
