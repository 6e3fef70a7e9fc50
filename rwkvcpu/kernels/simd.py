"""Explicit 8-lane vectors for the quantized matrix kernels (kernels/matmul.py).

Why not leave it to LLVM's loop vectoriser: it does not vectorise the int4
nibble unpack (it builds vectors a byte at a time), and an int8 or int4 group is
so short (64 or 32 weights) that summing each group's products down to one
number costs as much as the products themselves. These intrinsics keep the
running sums of a row in an 8-lane float vector (`f32x8`) that lives in a
register for the whole row, and emit target-independent LLVM vector IR: the
backend lowers it to AVX2 (`vpmaddwd`, `vcvtph2ps`, `vfmadd`), AVX-512 / AVX-VNNI
(`vpdpwssd`) or NEON, whichever the CPU numba compiles for has.

Integer products: activations are quantized to int16 per weight group (see
kernels/matmul.py), so one group's dot product is exact in int32 lanes: the
multiply-add of adjacent int16 pairs (the `pmaddwd` shape) followed by lane-wise
adds. Bounds: |int8 q| <= 128, |xq| <= 32767: 64 products sum to < 2^28; int4:
32 products of at most 15 * 32767 sum to < 2^24.

Array arguments must be C-contiguous; offsets are in elements of that array,
flat over all its dimensions. Nothing here checks bounds: the kernels do.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

LANES = 8

_i32 = ir.IntType(32)
_f32v = ir.VectorType(ir.FloatType(), LANES)


class F32x8(types.Type):
    """Eight float32 lanes held in a register (LLVM <8 x float>)."""

    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _f32v)


# --- IR helpers -------------------------------------------------------------

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


def _pairs_then_halves(builder, v, n):
    """Lane-wise sums of an n-lane int32 vector down to LANES lanes: first
    even + odd lanes (with the sign-extended int16 products feeding it, LLVM
    emits pmaddwd / vpdpwssd), then upper half + lower half."""
    v = builder.add(builder.shuffle_vector(v, v, _lanes(range(0, n, 2))),
                    builder.shuffle_vector(v, v, _lanes(range(1, n, 2))))
    n //= 2
    while n > LANES:
        v = builder.add(builder.shuffle_vector(v, v, _lanes(range(n // 2))),
                        builder.shuffle_vector(v, v, _lanes(range(n // 2, n))))
        n //= 2
    return v


def _splat(builder, scalar):
    v = builder.insert_element(ir.Constant(_f32v, None), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, _lanes([0] * LANES))


def _lane(builder, v, k):
    """All lanes = lane k of v."""
    return builder.shuffle_vector(v, v, _lanes([k] * LANES))


def _tree_sum(builder, vs):
    """Pairwise sum. Only "contract" (mul + add -> fma) is allowed here: with
    "fast", LLVM re-associates the tree into one chain of dependent FMAs, and
    their latency, not the memory, then bounds the kernel."""
    while len(vs) > 1:
        vs = [builder.fadd(vs[k], vs[k + 1], flags=("contract",)) if k + 1 < len(vs) else vs[k]
              for k in range(0, len(vs), 2)]
    return vs[0]


def _dot_i8_group(context, builder, qty, q, qoff, xty, xq, xoff):
    """int32 lanes of q[qoff:qoff+64] (int8) . xq[xoff:xoff+64] (int16)"""
    v32 = ir.VectorType(_i32, 64)
    qv = builder.sext(_load(context, builder, qty, q, qoff, 64), v32)
    xv = builder.sext(_load(context, builder, xty, xq, xoff, 64), v32)
    return _pairs_then_halves(builder, builder.mul(qv, xv), 64)


def _dot_u4_group(context, builder, qty, q, qoff, xty, xq, xoff):
    """int32 lanes of the 32 weights packed in q[qoff:qoff+16] . xq[xoff:xoff+32]
    (activations in natural order). Byte b holds weight b (low nibble) and
    weight b + 16 (high nibble): each half is a 16-wide dot product on its own."""
    b16 = ir.VectorType(ir.IntType(8), 16)
    v32 = ir.VectorType(_i32, 16)
    packed = _load(context, builder, qty, q, qoff, 16)
    low = builder.zext(builder.and_(packed, ir.Constant(b16, [15] * 16)), v32)
    high = builder.zext(builder.lshr(packed, ir.Constant(b16, [4] * 16)), v32)
    x_low = builder.sext(_load(context, builder, xty, xq, xoff, 16), v32)
    x_high = builder.sext(_load(context, builder, xty, xq, builder.add(xoff, ir.Constant(xoff.type, 16)), 16), v32)
    return builder.add(_pairs_then_halves(builder, builder.mul(low, x_low), 16),
                       _pairs_then_halves(builder, builder.mul(high, x_high), 16))


# Where weight j of a group of 32 sits among the four 16-lane nibble vectors of
# a pair of groups (see _dot_u4_pair): (vector, lane within the group's 8 lanes).
INT4_PAIR_SLOT = tuple(((j % 2) * 2 + j // 16, (j % 16) // 2) for j in range(32))


def _dot_u4_pair(context, builder, qty, q, qoff, xty, xq, xoff):
    """int32 lanes 0-3 of the first group of 32 weights packed in q[qoff:qoff+32],
    lanes 4-7 of the second, dotted with 64 activations in pair order.

    The 32 bytes are read as 16 little-endian 16-bit words; word i of group h
    holds 4 weights, one per nibble: (w >> 4k) & 15 for k = 0..3 are weights 2i,
    2i + 16, 2i + 1 and 2i + 17 (bytes 2i and 2i + 1, low then high nibbles).
    So four shift-and-mask steps unpack 64 weights in 16-bit lanes, with no
    byte shuffles (the vpmovzxbw of the natural order was the bottleneck).
    xq[xoff + 16 k + 8 h + i] holds the activation of nibble k of word i of
    group h (INT4_PAIR_SLOT; quantize_activations writes it so)."""
    v16 = ir.VectorType(ir.IntType(16), 16)
    v32 = ir.VectorType(_i32, 16)
    data = context.make_array(qty)(context, builder, q).data
    words = builder.load(builder.bitcast(builder.gep(data, [qoff]), ir.PointerType(v16)), align=1)
    mask = ir.Constant(v16, [15] * 16)
    total = None
    for k in range(4):
        nibble = builder.lshr(words, ir.Constant(v16, [4 * k] * 16)) if k else words
        if k < 3:
            nibble = builder.and_(nibble, mask)
        xv = _load(context, builder, xty, xq, builder.add(xoff, ir.Constant(xoff.type, 16 * k)), 16)
        lanes = _pairs_then_halves(builder, builder.mul(builder.zext(nibble, v32), builder.sext(xv, v32)), 16)
        total = lanes if total is None else builder.add(total, lanes)
    return total


_GROUP_DOTS = {types.int8: _dot_i8_group, types.uint8: _dot_u4_group}


def _group_dot_args(q, xq):
    return (isinstance(q, types.Array) and q.layout == "C" and q.dtype in _GROUP_DOTS
            and isinstance(xq, types.Array) and xq.layout == "C" and xq.dtype == types.int16)


# --- intrinsics -------------------------------------------------------------

@intrinsic
def f32x8_zero(typingctx):
    """(0, 0, 0, 0, 0, 0, 0, 0)"""
    def codegen(context, builder, sig, args):
        return ir.Constant(_f32v, None)
    return f32x8(), codegen


@intrinsic
def f32x8_sum(typingctx, v):
    """v[0] + ... + v[7]   -> float32"""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        x, n = args[0], LANES
        while n > 1:
            x = builder.fadd(builder.shuffle_vector(x, x, _lanes(range(n // 2))),
                             builder.shuffle_vector(x, x, _lanes(range(n // 2, n))), flags=("fast",))
            n //= 2
        return builder.extract_element(x, ir.Constant(_i32, 0))
    return types.float32(f32x8), codegen


@intrinsic
def f32x8_load(typingctx, a, off):
    """a[off:off+8] as f32x8.   a: float32, or uint16 holding fp16 bits (widened)."""
    if not (isinstance(a, types.Array) and a.layout == "C" and a.dtype in (types.float32, types.uint16)):
        return None

    def codegen(context, builder, sig, args):
        v = _load(context, builder, sig.args[0], args[0], args[1], LANES)
        if sig.args[0].dtype == types.uint16:
            v = builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), LANES)), _f32v)
        return v
    return f32x8(a, off), codegen


@intrinsic
def f32x8_add(typingctx, a, b):
    """a + b, lane-wise"""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=("fast",))
    return f32x8(f32x8, f32x8), codegen


@intrinsic
def f32x8_absmax(typingctx, m, a):
    """max(m, |a|), lane-wise (for m >= 0; a NaN lane of a gives either)"""
    if m != f32x8 or a != f32x8:
        return None

    def codegen(context, builder, sig, args):
        mv, av = args
        mask = ir.Constant(ir.VectorType(_i32, LANES), [0x7FFFFFFF] * LANES)
        absa = builder.bitcast(builder.and_(builder.bitcast(av, mask.type), mask), _f32v)
        return builder.select(builder.fcmp_ordered(">", absa, mv), absa, mv)
    return f32x8(f32x8, f32x8), codegen


@intrinsic
def f32x8_max(typingctx, v):
    """max(v[0], ..., v[7])   -> float32"""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        x, n = args[0], LANES
        while n > 1:
            lo = builder.shuffle_vector(x, x, _lanes(range(n // 2)))
            hi = builder.shuffle_vector(x, x, _lanes(range(n // 2, n)))
            x = builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi)
            n //= 2
        return builder.extract_element(x, ir.Constant(_i32, 0))
    return types.float32(f32x8), codegen


@intrinsic
def f32x8_mul(typingctx, a, b):
    """a * b, lane-wise"""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1], flags=("fast",))
    return f32x8(f32x8, f32x8), codegen


@intrinsic
def f32x8_fma(typingctx, acc, a, b):
    """acc + a * b, lane-wise"""
    if acc != f32x8 or a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2], flags=("fast",)), flags=("fast",))
    return f32x8(f32x8, f32x8, f32x8), codegen


@intrinsic
def dot_groups8(typingctx, acc, q, qoff, xq, xoff, c):
    """acc + sum_k c[k] * lanes(group k of q . group k of xq), k = 0..7.

    Eight consecutive weight groups of one row, each scaled by its lane of `c`.
    q: int8 (groups of 64 bytes; xq in natural order) or uint8 (int4, groups of
    16 bytes = 32 weights; xq in pair order, see _dot_u4_pair), xq: int16
    activations. qoff, xoff: the first group's offsets. The lanes of the result
    sum to the dot product; f32x8_sum them at the row's end.
    """
    if acc != f32x8 or c != f32x8 or not _group_dot_args(q, xq):
        return None

    def codegen(context, builder, sig, args):
        a, qa, qo, xa, xo, cv = args
        terms = []
        if sig.args[1].dtype == types.int8:
            for k in range(LANES):
                qk = builder.add(qo, ir.Constant(qo.type, 64 * k))
                xk = builder.add(xo, ir.Constant(xo.type, 64 * k))
                lanes = _dot_i8_group(context, builder, sig.args[1], qa, qk, sig.args[3], xa, xk)
                terms.append(builder.fmul(builder.sitofp(lanes, _f32v), _lane(builder, cv, k), flags=("contract",)))
        else:
            for k in range(LANES // 2):
                qk = builder.add(qo, ir.Constant(qo.type, 32 * k))
                xk = builder.add(xo, ir.Constant(xo.type, 64 * k))
                lanes = _dot_u4_pair(context, builder, sig.args[1], qa, qk, sig.args[3], xa, xk)
                scale = builder.shuffle_vector(cv, cv, _lanes([2 * k] * 4 + [2 * k + 1] * 4))
                terms.append(builder.fmul(builder.sitofp(lanes, _f32v), scale, flags=("contract",)))
        return builder.fadd(a, _tree_sum(builder, terms), flags=("contract",))
    return f32x8(f32x8, q, qoff, xq, xoff, f32x8), codegen


@intrinsic
def dot_group(typingctx, acc, q, qoff, xq, xoff, c):
    """acc + c * lanes(one group of q . xq)   (c: float32; for a row's last ngroups % 8 groups;
    xq in natural order)"""
    if acc != f32x8 or not isinstance(c, types.Float) or not _group_dot_args(q, xq):
        return None

    def codegen(context, builder, sig, args):
        a, qa, qo, xa, xo, cs = args
        group_dot = _GROUP_DOTS[sig.args[1].dtype]
        lanes = group_dot(context, builder, sig.args[1], qa, qo, sig.args[3], xa, xo)
        cs = context.cast(builder, cs, sig.args[5], types.float32)
        return builder.fadd(a, builder.fmul(builder.sitofp(lanes, _f32v), _splat(builder, cs),
                                            flags=("fast",)), flags=("fast",))
    return f32x8(f32x8, q, qoff, xq, xoff, c), codegen


@intrinsic
def prefetch(typingctx, a, off):
    """Hint the CPU to start loading the cache line holding a[off] (no effect on results)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        p = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [p.type, _i32, _i32, _i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [p.type], fnty)
        builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(a, off), codegen


@intrinsic
def dequantize_group(typingctx, q, qoff, scale, minimum, out, ooff):
    """out[ooff : ooff + G] = weights of one group * scale + minimum   (float32)

    q int8: G = 64 weights q[qoff : qoff + 64] (pass minimum = 0);
    q uint8 (int4): G = 32 weights packed in q[qoff : qoff + 16], low nibbles first.
    """
    if not (_group_dot_args(q, types.Array(types.int16, 1, "C")) and isinstance(out, types.Array)
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


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bit pattern of float32 x as int32: integer tests on it (is x finite?)
    are not folded away by fast-math, which assumes finite floats."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _i32)
    return types.int32(types.float32), codegen
