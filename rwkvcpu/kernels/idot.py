"""Integer dot products of int8/int4 weight groups with int8 activations, one set per CPU path.

The quantized kernels (kernels/qmatmul.py) quantize each token's activations
to int8 per weight group (scale max|x| / 127), so a group's dot product is
exact integer arithmetic; the CPU's widest integer multiply-add computes it:

    avx512vnni  vpdpbusd zmm (AVX-512 VNNI): 64 u8 x s8 products per instruction
    avxvnni     vpdpbusd ymm (AVX-VNNI, or AVX-512 VNNI with VL): 32 per instruction
    avx2        vpmaddubsw + vpmaddwd: 32 products in two instructions
    generic     portable LLVM vector IR (any CPU numba compiles for)

vpdpbusd multiplies unsigned by signed bytes. int8 weights are signed, so the
row-major kernels flip their sign bit (w ^ 0x80 = w + 128, unsigned) and take
128 * sum(x over the group) back off; the token-blocked kernels take the
weights as they are and shift the activations instead (x + 128), taking
128 * sum(w over the group) back off. AVX2 has no such instruction; it
multiplies |w| by x * sign(w) (vpsignb), which keeps vpmaddubsw's 16-bit pair
sums below its saturation (2 * 128 * 127 < 32767). int4 nibbles are
unsigned already. Every path therefore yields the same exact integer per
group, and everything after it is the same float arithmetic in the same order
(see CANONICAL below): the paths agree to the bit, and so do a token decoded
alone and the same token in a block.

CANONICAL float order, for output row i and token t, with groups g:

    c_g = f32(scale[i, g]) * xs[t, g]                    (rounded)
    p_g = f32(dot_g) * c_g                               int8
    p_g = f32(dot_g) * c_g + f32(min[i, g]) * e[t, g]    int4 (each product rounded, then the sum)
    acc = 0; for each run of 4 groups: acc = acc + ((p_0 + p_2) + (p_1 + p_3))   (missing p = +0)

No fast-math flags anywhere in here, so LLVM keeps that order; the kernels
that call these intrinsics are compiled without fast-math for the same reason.

Array arguments must be C-contiguous; offsets count elements of the flattened
array. Nothing here checks bounds: the kernels do.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

PATHS = ("avx512vnni", "avxvnni", "avx2", "generic")

_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_f32 = ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _lanes(indices):
    indices = list(indices)
    return ir.Constant(_vec(_i32, len(indices)), indices)


def _splat_const(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _splat(builder, v, vt):
    """The scalar v in every lane of a vector of type vt (a broadcast)."""
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, None), v, ir.Constant(_i32, 0)),
                                  ir.Constant(vt, None), _lanes([0] * vt.count))


def _ptr(context, builder, arrty, arr, offset, elem_type, count):
    """Pointer to <count x elem_type> at element `offset` of a C-contiguous array."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), ir.PointerType(_vec(elem_type, count)))


def _load(context, builder, arrty, arr, offset, elem_type, count):
    return builder.load(_ptr(context, builder, arrty, arr, offset, elem_type, count), align=1)


def _add_off(builder, off, k):
    return builder.add(off, ir.Constant(off.type, k)) if k else off


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, fnty, name=name)
    return builder.call(fn, args)


def _dpbusd(builder, acc, u8, s8):
    """acc + the sums of 4 adjacent u8 x s8 products per int32 lane (vpdpbusd; 4, 8 or 16 lanes)."""
    n = acc.type.count
    v = _vec(_i32, n)
    return _call(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", v,
                 [acc, builder.bitcast(u8, v), builder.bitcast(s8, v)])


def _maddubs_wd(builder, u8, s8):
    """Sums of 4 adjacent u8 x s8 products per int32 lane, 32 bytes -> 8 lanes (AVX2:
    vpmaddubsw to 16-bit pair sums, then vpmaddwd with ones). The caller keeps each
    pair sum within int16."""
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [u8, s8])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [pairs, _splat_const(_i16, 16, 1)])


def _psign(builder, x, w):
    """x * sign(w) per byte (0 where w == 0), 32 bytes (vpsignb)."""
    return _call(builder, "llvm.x86.avx2.psign.b", _vec(_i8, 32), [x, w])


def _abs8(builder, w):
    n = w.type.count
    return _call(builder, f"llvm.abs.v{n}i8", _vec(_i8, n), [w, ir.Constant(ir.IntType(1), 0)])


def _half(builder, v, h, n):
    """Lanes [h*n, h*n + n) of v."""
    return builder.shuffle_vector(v, v, _lanes(range(h * n, h * n + n)))


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, _lanes(range(2 * n)))


def _fold_pairs(builder, v):
    """Adjacent lanes summed: n lanes -> n/2 (lane k = v[2k] + v[2k+1]; integer)."""
    n = v.type.count
    return builder.add(builder.shuffle_vector(v, v, _lanes(range(0, n, 2))),
                       builder.shuffle_vector(v, v, _lanes(range(1, n, 2))))


def _transpose_sum(builder, vs):
    """The vectors vs (len(vs) a power of two, each of n >= len(vs) int32 lanes) folded into one
    vector of n lanes in len(vs) contiguous runs, run k summing to sum(vs[k]). Each level pairs the
    vectors up and halves every run, so the work is shared: n/2 shuffled lanes per input and level."""
    n = vs[0].type.count
    runs, size = 1, n
    while len(vs) > 1:
        half = size // 2
        first = [k * size + j for k in range(runs) for j in range(half)]
        second = [k * size + half + j for k in range(runs) for j in range(half)]
        nxt = []
        for a, b in zip(vs[0::2], vs[1::2]):
            lo = builder.shuffle_vector(a, b, _lanes(first + [n + i for i in first]))
            hi = builder.shuffle_vector(a, b, _lanes(second + [n + i for i in second]))
            nxt.append(builder.add(lo, hi))
        vs, runs, size = nxt, 2 * runs, half
    return vs[0]


def _group_runs(builder, v, groups):
    """v's lanes form `groups` contiguous runs (one per group); sum each run -> `groups` lanes."""
    while v.type.count > groups:
        v = _fold_pairs(builder, v)
    return v


# --- one group of int8 weights, row-major ----------------------------------

def _i8_group_lanes(path, context, builder, qty, q, qoff, xty, x, xoff):
    """int32 lanes summing to the group's dot product q[qoff:+64] . x[xoff:+64] (int8 . int8),
    plus 128 * sum(x) on the VNNI paths (their weights are flipped to unsigned: see the module doc).
    Returns (lanes, corrected): corrected is False where the 128 * sum(x) term is still in."""
    if path == "avx512vnni":
        w = _load(context, builder, qty, q, qoff, _i8, 64)
        xv = _load(context, builder, xty, x, xoff, _i8, 64)
        wu = builder.xor(w, _splat_const(_i8, 64, -128))
        return _dpbusd(builder, ir.Constant(_vec(_i32, 16), None), wu, xv), False
    if path == "avxvnni":
        acc = ir.Constant(_vec(_i32, 8), None)
        for h in range(2):
            w = _load(context, builder, qty, q, _add_off(builder, qoff, 32 * h), _i8, 32)
            xv = _load(context, builder, xty, x, _add_off(builder, xoff, 32 * h), _i8, 32)
            acc = _dpbusd(builder, acc, builder.xor(w, _splat_const(_i8, 32, -128)), xv)
        return acc, False
    if path == "avx2":
        acc = None
        for h in range(2):
            w = _load(context, builder, qty, q, _add_off(builder, qoff, 32 * h), _i8, 32)
            xv = _load(context, builder, xty, x, _add_off(builder, xoff, 32 * h), _i8, 32)
            d = _maddubs_wd(builder, _abs8(builder, w), _psign(builder, xv, w))
            acc = d if acc is None else builder.add(acc, d)
        return acc, True
    v32 = _vec(_i32, 64)
    w = builder.sext(_load(context, builder, qty, q, qoff, _i8, 64), v32)
    xv = builder.sext(_load(context, builder, xty, x, xoff, _i8, 64), v32)
    v = builder.mul(w, xv)
    while v.type.count > 16:
        v = _fold_pairs(builder, v)
    return v, True


def _i4_chunk_lanes(path, context, builder, qty, q, qoff, xty, x, xoff):
    """16 int32 lanes for 4 groups of int4 weights packed in q[qoff:+64] (byte b of a group:
    weight b low nibble, b + 16 high) and their 128 activations in chunk order
    (x[xoff:+64] the low nibbles' partners, group after group, x[xoff+64:+64] the high ones');
    lanes 4k..4k+3 sum to group k's dot product."""
    mask = _splat_const(_i8, 64, 15)
    if path == "avx512vnni":
        packed = _load(context, builder, qty, q, qoff, _i8, 64)
        lo = builder.and_(packed, mask)
        hi = builder.and_(builder.lshr(packed, _splat_const(_i8, 64, 4)), mask)
        x_lo = _load(context, builder, xty, x, xoff, _i8, 64)
        x_hi = _load(context, builder, xty, x, _add_off(builder, xoff, 64), _i8, 64)
        return _dpbusd(builder, _dpbusd(builder, ir.Constant(_vec(_i32, 16), None), lo, x_lo), hi, x_hi)
    halves = []
    mask32 = _splat_const(_i8, 32, 15)
    for h in range(2):
        packed = _load(context, builder, qty, q, _add_off(builder, qoff, 32 * h), _i8, 32)
        lo = builder.and_(packed, mask32)
        hi = builder.and_(builder.lshr(packed, _splat_const(_i8, 32, 4)), mask32)
        x_lo = _load(context, builder, xty, x, _add_off(builder, xoff, 32 * h), _i8, 32)
        x_hi = _load(context, builder, xty, x, _add_off(builder, xoff, 64 + 32 * h), _i8, 32)
        if path == "avxvnni":
            d = _dpbusd(builder, _dpbusd(builder, ir.Constant(_vec(_i32, 8), None), lo, x_lo), hi, x_hi)
        elif path == "avx2":
            # 16-bit pair sums: 2 * 15 * 127 each, their sum over lo and hi stays below 32767.
            pairs = builder.add(_call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [lo, x_lo]),
                                _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [hi, x_hi]))
            d = _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [pairs, _splat_const(_i16, 16, 1)])
        else:
            v32 = _vec(_i32, 32)
            prod = builder.add(builder.mul(builder.zext(lo, v32), builder.sext(x_lo, v32)),
                               builder.mul(builder.zext(hi, v32), builder.sext(x_hi, v32)))
            d = _fold_pairs(builder, _fold_pairs(builder, prod))
        halves.append(d)
    return _concat(builder, halves[0], halves[1])


def _i4_group_lanes(path, context, builder, qty, q, qoff, xty, x, xoff):
    """int32 lanes summing to one int4 group's dot product: 32 weights packed in q[qoff:+16],
    activations x[xoff:+32] in natural order (a tail group, outside the chunks of 4)."""
    packed = _load(context, builder, qty, q, qoff, _i8, 16)
    mask = _splat_const(_i8, 16, 15)
    lo = builder.and_(packed, mask)
    hi = builder.and_(builder.lshr(packed, _splat_const(_i8, 16, 4)), mask)
    x_lo = _load(context, builder, xty, x, xoff, _i8, 16)
    x_hi = _load(context, builder, xty, x, _add_off(builder, xoff, 16), _i8, 16)
    if path in ("avx512vnni", "avxvnni"):
        zero = ir.Constant(_vec(_i32, 4), None)
        return _dpbusd(builder, _dpbusd(builder, zero, lo, x_lo), hi, x_hi)
    v32 = _vec(_i32, 16)
    prod = builder.add(builder.mul(builder.zext(lo, v32), builder.sext(x_lo, v32)),
                       builder.mul(builder.zext(hi, v32), builder.sext(x_hi, v32)))
    return _fold_pairs(builder, _fold_pairs(builder, prod))


# --- the float part, shared by every path ---------------------------------

def _scales(context, builder, swty, sw, swoff, sxty, sx, sxoff, n):
    """c = f32(scale fp16 [swoff:+n]) * xs[sxoff:+n], n lanes, rounded."""
    s = builder.fpext(builder.bitcast(_load(context, builder, swty, sw, swoff, _i16, n), _vec(ir.HalfType(), n)),
                      _vec(_f32, n))
    return builder.fmul(s, _load(context, builder, sxty, sx, sxoff, _f32, n))


def _fp16_lanes(context, builder, arrty, arr, off, n):
    v = _load(context, builder, arrty, arr, off, _i16, n)
    return builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), n)), _vec(_f32, n))


def _accumulate_runs(builder, acc, p):
    """acc + ((p0 + p2) + (p1 + p3)) for each run of 4 lanes of p, in order (CANONICAL)."""
    n = p.type.count
    runs = n // 4
    h = builder.fadd(builder.shuffle_vector(p, p, _lanes([4 * k + j for k in range(runs) for j in (0, 1)])),
                     builder.shuffle_vector(p, p, _lanes([4 * k + j for k in range(runs) for j in (2, 3)])))
    s = builder.fadd(builder.shuffle_vector(h, h, _lanes(range(0, 2 * runs, 2))),
                     builder.shuffle_vector(h, h, _lanes(range(1, 2 * runs, 2))))
    for k in range(runs):
        acc = builder.fadd(acc, builder.extract_element(s, ir.Constant(_i32, k)))
    return acc


def _is_c_array(a, dtypes):
    return isinstance(a, types.Array) and a.layout == "C" and a.dtype in dtypes


def _check(**arrays):
    for name, (a, dtypes) in arrays.items():
        if not _is_c_array(a, dtypes):
            raise TypingError(f"{name}: expected a C-contiguous array of {dtypes}, got {a}")


_I8 = (types.int8,)
_U8 = (types.uint8,)
_U16 = (types.uint16,)
_F32 = (types.float32,)
_I32 = (types.int32,)


def _f16_scalar(context, builder, arrty, arr, off):
    h = builder.load(builder.gep(context.make_array(arrty)(context, builder, arr).data, [off]))
    return builder.fpext(builder.bitcast(h, ir.HalfType()), _f32)


def _partial_lanes(context, builder, arrty, arr, off, elem_type, count, present):
    """<count x elem_type> from arr[off:off+present], zeros in the lanes after (never read)."""
    if present == count:
        return _load(context, builder, arrty, arr, off, elem_type, count)
    data = context.make_array(arrty)(context, builder, arr).data
    v = ir.Constant(_vec(elem_type, count), None)
    for k in range(present):
        v = builder.insert_element(v, builder.load(builder.gep(data, [_add_off(builder, off, k)])),
                                   ir.Constant(_i32, k))
    return v


def _group_counts(groups, most=16):
    """The group counts an intrinsic call is compiled for: its literal (1-4 or 16), or 1-4 for a
    runtime count (the code branches to the one that runs). The intrinsics prefer literals, so
    a constant count is seen as one."""
    if isinstance(groups, types.IntegerLiteral):
        if groups.literal_value not in (1, 2, 3, 4, 16) or groups.literal_value > most:
            raise TypingError(f"groups must be 1-4{' or 16' if most == 16 else ''}")
        return (groups.literal_value,)
    if not isinstance(groups, types.Integer):
        raise TypingError("groups must be an integer")
    return (1, 2, 3, 4)


def _by_count(counts, body, none_result=None):
    """Codegen running body(context, builder, sig, args, count) for the count of the call: the
    literal one, or a switch over 1-4 on the runtime value (the argument at groups_index),
    merging the results (a float, or none_result for none)."""
    def codegen(context, builder, sig, args, groups_index):
        if len(counts) == 1:
            return body(context, builder, sig, args, counts[0])
        value = args[groups_index]
        merge = builder.append_basic_block("groups.merge")
        default = builder.append_basic_block("groups.none")
        switch = builder.switch(value, default)
        results = []
        for k in counts:
            block = builder.append_basic_block(f"groups.{k}")
            switch.add_case(ir.Constant(value.type, k), block)
            builder.position_at_end(block)
            r = body(context, builder, sig, args, k)
            results.append((r, builder.block))
            builder.branch(merge)
        builder.position_at_end(default)
        builder.branch(merge)
        builder.position_at_end(merge)
        if none_result is not None:
            return none_result(context)
        phi = builder.phi(results[0][0].type)
        for r, block in results:
            phi.add_incoming(r, block)
        phi.add_incoming(args[0], default)
        return phi
    return codegen


def make_row_intrinsics(path: str):
    """The row-major (one token at a time) intrinsics of one CPU path, as a dict name -> intrinsic."""

    @intrinsic(prefer_literal=True)
    def i8_row(typingctx, acc, q, qoff, x, xoff, xc, sx, goff, sw, swoff, groups):
        """acc + the CANONICAL sum of `groups` (a literal: 16, 4, or 1-3 for a row's last groups)
        consecutive int8 groups of one row: q[qoff:+64*groups] int8 weights, x[xoff:+64*groups]
        int8 activations; from group offset goff of the token's xc (int32: 128 * sum(x over the
        group)) and sx (f32: the activations' scales), and from swoff of sw (uint16: the row's fp16
        scales). -> float32"""
        _check(q=(q, _I8), x=(x, _I8), xc=(xc, _I32), sx=(sx, _F32), sw=(sw, _U16))
        counts = _group_counts(groups)

        def body(context, builder, sig, args, count):
            acc_v, qa, qo, xa, xo, xca, sxa, go, swa, swo = args[:10]
            qty, xty, xcty, sxty, swty = (sig.args[k] for k in (1, 3, 5, 6, 8))
            for quad in range(max(1, count // 4)):
                present = min(4, count - 4 * quad)
                lanes, corrected = [], True
                for k in range(present):
                    g = 4 * quad + k
                    v, corrected = _i8_group_lanes(path, context, builder, qty, qa, _add_off(builder, qo, 64 * g),
                                                   xty, xa, _add_off(builder, xo, 64 * g))
                    lanes.append(v)
                lanes += [ir.Constant(lanes[0].type, None)] * (4 - present)
                d = _group_runs(builder, _transpose_sum(builder, lanes), 4)
                gq = _add_off(builder, go, 4 * quad)
                if not corrected:
                    d = builder.sub(d, _partial_lanes(context, builder, xcty, xca, gq, _i32, 4, present))
                f = builder.sitofp(d, _vec(_f32, 4))
                s = _partial_lanes(context, builder, swty, swa, _add_off(builder, swo, 4 * quad), _i16, 4, present)
                s = builder.fpext(builder.bitcast(s, _vec(ir.HalfType(), 4)), _vec(_f32, 4))
                c = builder.fmul(s, _partial_lanes(context, builder, sxty, sxa, gq, _f32, 4, present))
                acc_v = _accumulate_runs(builder, acc_v, builder.fmul(f, c))
            return acc_v
        gen = _by_count(counts, body)
        return types.float32(acc, q, qoff, x, xoff, xc, sx, goff, sw, swoff, groups), \
            lambda context, builder, sig, args: gen(context, builder, sig, args, 10)

    @intrinsic(prefer_literal=True)
    def i4_row(typingctx, acc, q, qoff, x, xoff, sx, e, goff, sw, sm, swoff, groups):
        """acc + the CANONICAL sum of `groups` (a literal: 16, 4, or 1-3 for a row's last groups)
        consecutive int4 groups of one row: q[qoff:+16*groups] packed weights, x[xoff:+32*groups] int8
        activations (4 and 16: chunk order, see quantize_i4; 1-3: natural order); from group offset
        goff of the token's sx (f32 scales) and e (f32: sx * sum(x over the group)), and from swoff
        of sw and sm (uint16: the row's fp16 scales and mins). -> float32"""
        _check(q=(q, _U8), x=(x, _I8), sx=(sx, _F32), e=(e, _F32), sw=(sw, _U16), sm=(sm, _U16))
        counts = _group_counts(groups)

        def body(context, builder, sig, args, count):
            acc_v, qa, qo, xa, xo, sxa, ea, go, swa, sma, swo = args[:11]
            qty, xty, sxty, ety, swty, smty = (sig.args[k] for k in (1, 3, 5, 6, 8, 9))
            for quad in range(max(1, count // 4)):
                present = min(4, count - 4 * quad)
                if present == 4:
                    lanes = _i4_chunk_lanes(path, context, builder, qty, qa, _add_off(builder, qo, 64 * quad),
                                            xty, xa, _add_off(builder, xo, 128 * quad))
                    d = _group_runs(builder, lanes, 4)
                else:
                    lanes = [_i4_group_lanes(path, context, builder, qty, qa, _add_off(builder, qo, 16 * k),
                                             xty, xa, _add_off(builder, xo, 32 * k)) for k in range(present)]
                    lanes += [ir.Constant(lanes[0].type, None)] * (4 - present)
                    d = _group_runs(builder, _transpose_sum(builder, lanes), 4)
                gq = _add_off(builder, go, 4 * quad)
                sq = _add_off(builder, swo, 4 * quad)
                f = builder.sitofp(d, _vec(_f32, 4))

                def fp16(arrty, arr):
                    v = _partial_lanes(context, builder, arrty, arr, sq, _i16, 4, present)
                    return builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), 4)), _vec(_f32, 4))
                c = builder.fmul(fp16(swty, swa), _partial_lanes(context, builder, sxty, sxa, gq, _f32, 4, present))
                v = builder.fmul(fp16(smty, sma), _partial_lanes(context, builder, ety, ea, gq, _f32, 4, present))
                acc_v = _accumulate_runs(builder, acc_v, builder.fadd(builder.fmul(f, c), v))
            return acc_v
        gen = _by_count(counts, body)
        return types.float32(acc, q, qoff, x, xoff, sx, e, goff, sw, sm, swoff, groups), \
            lambda context, builder, sig, args: gen(context, builder, sig, args, 11)

    return {"i8_row": i8_row, "i4_row": i4_row}


def make_tile_intrinsics(path: str):
    """The token-blocked intrinsics of one CPU path: 8 tokens in the lanes of a 256-bit vector, one weight
    broadcast to all of them (see qmatmul's tile layout)."""
    @intrinsic(prefer_literal=True)
    def i8_tile(typingctx, acc, q, qoff, nw, nwoff, xt, xtoff, sxt, sxoff, sw, swoff, stride, groups, rows):
        """acc[r] += the CANONICAL sum of `groups` (literal 1-4) consecutive int8 groups of row r, for
        `rows` (a literal) consecutive rows and the tile's 8 tokens: acc (rows, 8) f32 (token lanes),
        q[qoff + r * stride * 64:] int8 weights (stride: groups per row); nw[nwoff + r * stride + k]
        = -128 * sum of group k's weights (int32; the VNNI paths use it); xt[xtoff:] the tile's
        activations as (group, dword j, token) int32 words of 4 bytes (x + 128 as unsigned bytes on
        the VNNI paths, x itself on the others); sxt[sxoff:] the tile's activation scales (group,
        token) f32; sw[swoff + r * stride:] each row's fp16 scales.

        The weights' 4-byte words are broadcast to the 8 token lanes (vpdpbusd's {1to8} operand);
        the rows and groups are independent chains of integer multiply-adds, interleaved."""
        _check(acc=(acc, _F32), q=(q, _I8), nw=(nw, _I32), xt=(xt, _I32), sxt=(sxt, _F32), sw=(sw, _U16))
        counts = _group_counts(groups, most=4)
        if not isinstance(rows, types.IntegerLiteral):
            raise TypingError("rows must be a literal")
        R = rows.literal_value
        vnni = path in ("avx512vnni", "avxvnni")

        def body(context, builder, sig, args, count):
            acca, qa, qo, nwa, nwo, xta, xto, sxa, sxo, swa, swo, st = args[:12]
            accty, qty, nwty, xtty, sxty, swty = (sig.args[k] for k in (0, 1, 3, 5, 7, 9))
            qdata = context.make_array(qty)(context, builder, qa).data
            nwdata = context.make_array(nwty)(context, builder, nwa).data
            v8 = _vec(_i32, 8)
            f8 = _vec(_f32, 8)

            st = builder.sext(st, qo.type) if st.type != qo.type else st
            row_q = [builder.add(qo, builder.mul(st, ir.Constant(qo.type, 64 * r))) for r in range(R)]
            row_g = [builder.mul(st, ir.Constant(qo.type, r)) for r in range(R)]
            d = [[None] * count for _ in range(R)]
            for r in range(R):
                for k in range(count):
                    if vnni:
                        nwk = builder.load(builder.gep(nwdata, [builder.add(builder.add(nwo, row_g[r]),
                                                                           ir.Constant(qo.type, k))]))
                        d[r][k] = _splat(builder, nwk, v8)
                    else:
                        d[r][k] = ir.Constant(v8, None)
            for j in range(16):
                for k in range(count):
                    xv = _load(context, builder, xtty, xta, _add_off(builder, xto, 8 * (16 * k + j)), _i32, 8)
                    for r in range(R):
                        wp = builder.bitcast(builder.gep(qdata, [_add_off(builder, row_q[r], 64 * k + 4 * j)]),
                                             _i32.as_pointer())
                        wb = _splat(builder, builder.load(wp, align=1), v8)
                        if vnni:
                            d[r][k] = _dpbusd(builder, d[r][k], xv, wb)
                        else:
                            wbb = builder.bitcast(wb, _vec(_i8, 32))
                            d[r][k] = builder.add(d[r][k], _maddubs_wd(
                                builder, _abs8(builder, wbb), _psign(builder, builder.bitcast(xv, _vec(_i8, 32)), wbb)))
            xs_k = [_load(context, builder, sxty, sxa, _add_off(builder, sxo, 8 * k), _f32, 8) for k in range(count)]
            for r in range(R):
                scales = _partial_lanes(context, builder, swty, swa, builder.add(swo, row_g[r]), _i16, 4, count)
                scales = builder.fpext(builder.bitcast(scales, _vec(ir.HalfType(), 4)), _vec(_f32, 4))
                ps = []
                for k in range(count):
                    sv = builder.shuffle_vector(scales, scales, _lanes([k] * 8))
                    ps.append(builder.fmul(builder.sitofp(d[r][k], f8), builder.fmul(sv, xs_k[k])))
                ps += [ir.Constant(f8, None)] * (4 - count)
                total = builder.fadd(builder.fadd(ps[0], ps[2]), builder.fadd(ps[1], ps[3]))
                ptr = _ptr(context, builder, accty, acca, ir.Constant(qo.type, 8 * r), _f32, 8)
                builder.store(builder.fadd(builder.load(ptr, align=4), total), ptr, align=4)
            return context.get_dummy_value()
        gen = _by_count(counts, body, none_result=lambda context: context.get_dummy_value())
        return types.none(acc, q, qoff, nw, nwoff, xt, xtoff, sxt, sxoff, sw, swoff, stride, groups, rows), \
            lambda context, builder, sig, args: gen(context, builder, sig, args, 12)

    @intrinsic(prefer_literal=True)
    def i4_tile(typingctx, acc, q, qoff, xt, xtoff, sxt, et, sxoff, sw, sm, swoff, stride, groups, rows):
        """acc[r] += the CANONICAL sum of `groups` (literal 1-4) consecutive int4 groups of row r, for
        `rows` (a literal) consecutive rows and the tile's 8 tokens: acc (rows, 8) f32, q[qoff + r *
        stride * 16:] packed weights (stride: groups per row); xt[xtoff:] the tile's activations as
        (group, word w, token) int32 words: bytes 4w .. 4w + 3 of the group, natural order;
        sxt, et[sxoff:] the tile's (group, token) scales and sx * sum(x) (f32); sw, sm[swoff + r *
        stride:] each row's fp16 scales and mins. Nibbles are unsigned: no correction term."""
        _check(acc=(acc, _F32), q=(q, _U8), xt=(xt, _I32), sxt=(sxt, _F32), et=(et, _F32), sw=(sw, _U16),
               sm=(sm, _U16))
        counts = _group_counts(groups, most=4)
        if not isinstance(rows, types.IntegerLiteral):
            raise TypingError("rows must be a literal")
        R = rows.literal_value
        vnni = path in ("avx512vnni", "avxvnni")

        def body(context, builder, sig, args, count):
            acca, qa, qo, xta, xto, sxa, eta, sxo, swa, sma, swo, st = args[:12]
            accty, qty, xtty, sxty, etty, swty, smty = (sig.args[k] for k in (0, 1, 3, 5, 6, 8, 9))
            qdata = context.make_array(qty)(context, builder, qa).data
            v8 = _vec(_i32, 8)
            f8 = _vec(_f32, 8)
            b32 = _vec(_i8, 32)

            st = builder.sext(st, qo.type) if st.type != qo.type else st
            row_q = [builder.add(qo, builder.mul(st, ir.Constant(qo.type, 16 * r))) for r in range(R)]
            row_g = [builder.mul(st, ir.Constant(qo.type, r)) for r in range(R)]
            d = [[ir.Constant(v8, None)] * count for _ in range(R)]
            mask = _splat_const(_i8, 32, 15)
            for j in range(4):
                for k in range(count):
                    x_lo = _load(context, builder, xtty, xta, _add_off(builder, xto, 8 * (8 * k + j)), _i32, 8)
                    x_hi = _load(context, builder, xtty, xta, _add_off(builder, xto, 8 * (8 * k + 4 + j)), _i32, 8)
                    for r in range(R):
                        wp = builder.bitcast(builder.gep(qdata, [_add_off(builder, row_q[r], 16 * k + 4 * j)]),
                                             _i32.as_pointer())
                        wb = builder.bitcast(_splat(builder, builder.load(wp, align=1), v8), b32)
                        lo = builder.and_(wb, mask)
                        hi = builder.and_(builder.lshr(wb, _splat_const(_i8, 32, 4)), mask)
                        if vnni:
                            d[r][k] = _dpbusd(builder, _dpbusd(builder, d[r][k], lo, x_lo), hi, x_hi)
                        else:
                            # 16-bit pair sums: 2 * 15 * 127 each; lo + hi stays below 32767.
                            pairs = builder.add(
                                _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [lo, builder.bitcast(x_lo, b32)]),
                                _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [hi, builder.bitcast(x_hi, b32)]))
                            d[r][k] = builder.add(d[r][k], _call(builder, "llvm.x86.avx2.pmadd.wd", v8,
                                                                 [pairs, _splat_const(_i16, 16, 1)]))
            xs_k = [_load(context, builder, sxty, sxa, _add_off(builder, sxo, 8 * k), _f32, 8) for k in range(count)]
            e_k = [_load(context, builder, etty, eta, _add_off(builder, sxo, 8 * k), _f32, 8) for k in range(count)]
            for r in range(R):
                def fp16(arrty, arr):
                    v = _partial_lanes(context, builder, arrty, arr, builder.add(swo, row_g[r]), _i16, 4, count)
                    return builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), 4)), _vec(_f32, 4))
                scales, mins = fp16(swty, swa), fp16(smty, sma)
                ps = []
                for k in range(count):
                    sv = builder.shuffle_vector(scales, scales, _lanes([k] * 8))
                    mv = builder.shuffle_vector(mins, mins, _lanes([k] * 8))
                    u = builder.fmul(builder.sitofp(d[r][k], f8), builder.fmul(sv, xs_k[k]))
                    ps.append(builder.fadd(u, builder.fmul(mv, e_k[k])))
                ps += [ir.Constant(f8, None)] * (4 - count)
                total = builder.fadd(builder.fadd(ps[0], ps[2]), builder.fadd(ps[1], ps[3]))
                ptr = _ptr(context, builder, accty, acca, ir.Constant(qo.type, 8 * r), _f32, 8)
                builder.store(builder.fadd(builder.load(ptr, align=4), total), ptr, align=4)
            return context.get_dummy_value()
        gen = _by_count(counts, body, none_result=lambda context: context.get_dummy_value())
        return types.none(acc, q, qoff, xt, xtoff, sxt, et, sxoff, sw, sm, swoff, stride, groups, rows), \
            lambda context, builder, sig, args: gen(context, builder, sig, args, 12)

    return {"i8_tile": i8_tile, "i4_tile": i4_tile}

