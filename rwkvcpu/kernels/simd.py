"""Vector helpers for numba kernels written as LLVM IR: prefetches and dequantizing a weight group.

(The integer dot products of the int8/int4 kernels are in kernels/idot.py.)

Array arguments must be C-contiguous; offsets are in elements of that array,
flat over all its dimensions. Nothing here checks bounds: the kernels do.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_i32 = ir.IntType(32)


def _lanes(indices):
    """A shufflevector mask picking `indices`."""
    indices = list(indices)
    return ir.Constant(ir.VectorType(_i32, len(indices)), indices)


def _vector_ptr(context, builder, arrty, arr, offset, count):
    """Pointer to <count x elem> starting at element `offset` of a C-contiguous array."""
    data = context.make_array(arrty)(context, builder, arr).data
    elem = context.get_data_type(arrty.dtype)
    return builder.bitcast(builder.gep(data, [offset]), ir.PointerType(ir.VectorType(elem, count)))


def _load(context, builder, arrty, arr, offset, count):
    return builder.load(_vector_ptr(context, builder, arrty, arr, offset, count), align=1)


def _prefetch(builder, context, arrty, arr, off, locality):
    data = context.make_array(arrty)(context, builder, arr).data
    p = builder.bitcast(builder.gep(data, [off]), ir.IntType(8).as_pointer())
    fnty = ir.FunctionType(ir.VoidType(), [p.type, _i32, _i32, _i32])
    fn = builder.module.declare_intrinsic("llvm.prefetch", [p.type], fnty)
    builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


@intrinsic
def prefetch(typingctx, a, off):
    """Hint the CPU to start loading the cache line holding a[off] into L1 (prefetcht0; no effect on results)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        _prefetch(builder, context, sig.args[0], args[0], args[1], 3)
        return context.get_dummy_value()
    return types.none(a, off), codegen


@intrinsic
def prefetch_l2(typingctx, a, off):
    """Hint the CPU to start loading the cache line holding a[off] into L2 (prefetcht1; no effect on results)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        _prefetch(builder, context, sig.args[0], args[0], args[1], 2)
        return context.get_dummy_value()
    return types.none(a, off), codegen


@intrinsic
def dequantize_group(typingctx, q, qoff, scale, minimum, out, ooff):
    """out[ooff : ooff + G] = weights of one group * scale + minimum   (float32)

    q int8: G = 64 weights q[qoff : qoff + 64] (pass minimum = 0);
    q uint8 (int4): G = 32 weights packed in q[qoff : qoff + 16], low nibbles first.
    """
    if not (isinstance(q, types.Array) and q.layout == "C" and q.dtype in (types.int8, types.uint8)
            and isinstance(out, types.Array)
            and out.layout == "C" and out.dtype == types.float32
            and isinstance(scale, types.Float) and isinstance(minimum, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        qa, qo, s, mn, oa, oo = args
        qty = sig.args[0]
        s = context.cast(builder, s, sig.args[2], types.float32)
        mn = context.cast(builder, mn, sig.args[3], types.float32)
        if qty.dtype == types.int8:
            vals = builder.sitofp(_load(context, builder, qty, qa, qo, 64), ir.VectorType(ir.FloatType(), 64))
            n = 64
        else:
            b16 = ir.VectorType(ir.IntType(8), 16)
            packed = _load(context, builder, qty, qa, qo, 16)
            low = builder.and_(packed, ir.Constant(b16, [15] * 16))
            high = builder.lshr(packed, ir.Constant(b16, [4] * 16))
            vals = builder.uitofp(builder.shuffle_vector(low, high, _lanes(range(32))),
                                  ir.VectorType(ir.FloatType(), 32))
            n = 32
        vt = ir.VectorType(ir.FloatType(), n)
        sv = builder.shuffle_vector(builder.insert_element(ir.Constant(vt, None), s, ir.Constant(_i32, 0)),
                                    ir.Constant(vt, None), _lanes([0] * n))
        mv = builder.shuffle_vector(builder.insert_element(ir.Constant(vt, None), mn, ir.Constant(_i32, 0)),
                                    ir.Constant(vt, None), _lanes([0] * n))
        res = builder.fadd(builder.fmul(vals, sv, flags=("contract",)), mv, flags=("contract",))
        builder.store(res, _vector_ptr(context, builder, sig.args[4], oa, oo, n), align=1)
        return context.get_dummy_value()
    return types.none(q, qoff, scale, minimum, out, ooff), codegen
