"""Half-precision loads for Numba kernels.

Numba has no float16 type on the CPU, so fp16 data is kept as uint16 and
widened with this intrinsic: a bitcast to LLVM `half` and an `fpext`, which
LLVM turns into `vcvtph2ps` (F16C) and vectorises.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def f16_to_f32(typingctx, h):
    """float32 value of the IEEE half whose bits are the uint16 `h`."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen
