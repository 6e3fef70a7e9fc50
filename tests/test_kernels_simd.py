"""The hot loops are vectorised: the generated machine code of each quantized
kernel uses the SIMD instructions the design relies on.

Compiled afresh (the cached kernels cannot be inspected), for the CPU this
runs on. No timing is measured.
"""

import platform
import re

import numba
import numpy as np
import pytest

from rwkvcpu.kernels import matmul as K

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="checks x86 instruction names")


def _asm(kernel, *args):
    fresh = numba.njit(fastmath=True)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_asm(fresh.signatures[0])


def _vector_ops(asm):
    return set(re.findall(r"^\s+(v[a-z0-9]+)\s+[^\n]*[xyz]mm", asm, re.M))


def _int8_args():
    q = np.zeros((4, 512), np.int8)
    s = np.zeros((4, 8), np.uint16)
    return q, s, np.ones((1, 512), np.float32), np.zeros((1, 512), np.int16), np.zeros((1, 8), np.float32), \
        np.zeros((1, 4), np.float32)


def _int4_args():
    q = np.zeros((4, 256), np.uint8)
    s = np.zeros((4, 16), np.uint16)
    return q, s, s, np.ones((1, 512), np.float32), np.zeros((1, 512), np.int16), np.zeros((1, 16), np.float32), \
        np.zeros((1, 16), np.float32), np.zeros((1, 4), np.float32)


@pytest.mark.parametrize("kernel,args", [(K.matmul_i8_serial, _int8_args), (K.matmul_i4_serial, _int4_args)])
def test_quantized_matmul_uses_integer_multiply_add(kernel, args):
    ops = _vector_ops(_asm(kernel, *args()))
    # int16 pair multiply-add (AVX2 vpmaddwd; AVX-512/AVX-VNNI fuse it with the add: vpdpwssd)
    assert ops & {"vpmaddwd", "vpdpwssd"}, sorted(ops)
    # the group scales: fp16 -> fp32 (F16C) and int32 -> float on whole vectors
    assert "vcvtph2ps" in ops and "vcvtdq2ps" in ops, sorted(ops)
    assert ops & {"vfmadd231ps", "vfmadd213ps", "vfmadd132ps", "vmulps"}, sorted(ops)


def test_dequantize_is_vectorised():
    q = np.zeros((4, 256), np.int8)
    s = np.zeros((4, 4), np.uint16)
    ops = _vector_ops(_asm(K.dequantize_rows_i8_serial, q, s, 0, np.zeros((4, 256), np.float32)))
    assert "vcvtdq2ps" in ops and ops & {"vpmovsxbd"}, sorted(ops)


_AVX2_CHECK = """
import re, numpy as np, numba
from rwkvcpu.kernels import matmul as K
q = np.zeros((4, 256), np.uint8); s = np.zeros((4, 16), np.uint16)
f = numba.njit(fastmath=True)(K._matmul_i4)
f(q, s, s, np.ones((1, 512), np.float32), np.zeros((1, 512), np.int16), np.zeros((1, 16), np.float32),
  np.zeros((1, 16), np.float32), np.zeros((1, 4), np.float32))
print(f.inspect_asm(f.signatures[0]))
"""


def test_avx2_only_cpus_get_256_bit_integer_multiply_add(tmp_path):
    """Compiled for an AVX2-only CPU (Haswell), the int4 kernel still uses vpmaddwd, and no AVX-512."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+lzcnt,+movbe")
    asm = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True, text=True,
                         check=True).stdout
    ops = _vector_ops(asm)
    assert "vpmaddwd" in ops and "vcvtph2ps" in ops and "vpsrlw" in ops, sorted(ops)
    assert "zmm" not in asm and "vpdpwssd" not in ops
