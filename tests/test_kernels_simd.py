"""The hot loops use the SIMD instructions the design relies on: the generated machine code of
the kernels, compiled afresh (cached kernels cannot be inspected), for this CPU and, in
subprocesses, for CPUs a CI machine may have (the code is compiled there, not run). No timing.
"""

import os
import platform
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

from rwkvcpu.kernels import isa
from rwkvcpu.kernels import matmul as K

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="checks x86 instruction names")


def _asm(kernel, *args):
    fresh = numba.njit(fastmath=True)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_asm(fresh.signatures[0])


def _vector_ops(asm):
    return set(re.findall(r"^\s+(?:\{vex\}\s+)?(v[a-z0-9]+)\s+[^\n]*[xyz]mm", asm, re.M))


def test_dequantize_is_vectorised():
    q = np.zeros((4, 256), np.int8)
    s = np.zeros((4, 4), np.uint16)
    ops = _vector_ops(_asm(K.dequantize_rows_i8_serial, q, s, 0, np.zeros((4, 256), np.float32)))
    assert "vcvtdq2ps" in ops and ops & {"vpmovsxbd"}, sorted(ops)


_ASM_CHILD = """
import sys
from numba import types
from rwkvcpu.kernels import qmatmul as Q
ks = Q.kernels(sys.argv[1])
a8, u8 = types.Array(types.int8, 2, "C"), types.Array(types.uint8, 2, "C")
u16, f32, i32 = (types.Array(t, 2, "C") for t in (types.uint16, types.float32, types.int32))
i8, f32_3, i32_4 = types.Array(types.int8, 2, "C"), types.Array(types.float32, 3, "C"), types.Array(types.int32, 4, "C")
sigs = {"rows_i8": (a8, u16, f32, i8, f32, i32, f32), "rows_i4": (u8, u16, u16, f32, i8, f32, f32, f32),
        "tiles_i8": (a8, u16, i32, f32, i8, f32, i32, types.boolean, i32_4, f32_3, f32),
        "tiles_i4": (u8, u16, u16, f32, i8, f32, f32, i32_4, f32_3, f32_3, f32)}
for name, sig in sigs.items():
    fn = ks.get(name, False)
    fn.compile(sig)
    print("#KERNEL", name)
    print(fn.inspect_asm(sig))
"""


def _kernel_asm(tmp_path, path, env=()):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), **dict(env))
    out = subprocess.run([sys.executable, "-c", _ASM_CHILD, path], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(part.split("\n", 1) for part in out.split("#KERNEL ")[1:])


# Haswell's features: AVX2, FMA, F16C, no AVX-512, no VNNI.
HASWELL = "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+lzcnt,+movbe,-avx512f,-avx512vnni,-avxvnni"
ALDER_LAKE = "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+avxvnni,-avx512f,-avx512vnni"


@pytest.mark.skipif("avx512vnni" not in isa.usable_paths(), reason="this CPU has no AVX-512 VNNI")
def test_avx512_vnni_path(tmp_path):
    """Rows: 64 u8 x s8 products per vpdpbusd on zmm; tiles: a weight word broadcast to 8 token lanes."""
    asm = _kernel_asm(tmp_path, "avx512vnni")
    assert re.search(r"vpdpbusd\s[^\n]*zmm", asm["rows_i8"]) and re.search(r"vpdpbusd\s[^\n]*zmm", asm["rows_i4"])
    for name in ("tiles_i8",):
        assert re.search(r"vpdpbusd\s+[^\n]*\{1to8\}[^\n]*ymm", asm[name]), name
    assert "vpdpbusd" in asm["tiles_i4"]


@pytest.mark.parametrize("cpu,features,path,want,forbidden", [
    ("haswell", HASWELL, "avx2", {"vpmaddubsw", "vpmaddwd", "vpsignb"}, ("zmm", "vpdpbusd")),
    ("alderlake", ALDER_LAKE, "avxvnni", {"vpdpbusd"}, ("zmm",)),
])
def test_paths_of_cpus_without_avx512(tmp_path, cpu, features, path, want, forbidden):
    """Compiled for Haswell (AVX2 only) and Alder Lake (AVX-VNNI, no AVX-512): each path's
    instructions, none wider than the CPU has; AVX-VNNI's are the VEX-encoded ones."""
    asm = _kernel_asm(tmp_path, path, {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features})
    for name, code in asm.items():
        ops = _vector_ops(code)
        assert want & ops, (name, sorted(ops))
        for word in forbidden:
            assert word not in code, (name, word)
        if path == "avxvnni":
            assert re.search(r"\{vex\}\s+vpdpbusd", code), name
    assert want <= set().union(*(_vector_ops(code) for code in asm.values()))
