"""The RWKV-7 state recurrence ("wkv7") for training: a slow reference loop and a Triton kernel.

Per head, with a state S of shape (N, N) (rows: value channel i, columns: key channel j),
for every time step t:

    sa_t = S_{t-1} a_t                                   # (N,)  "a" is -kk in the model
    S_t  = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T    # "b" is kk * a in the model
    y_t  = S_t r_t

d_t in (0, 1) is the decay itself (the model computes d = exp(-exp(-0.5) * sigmoid(z))).

Backward, with G_t = dL/dS_t (everything that reaches S_t from y_t and from later steps):

    G_t      = dy_t r_t^T + G_{t+1} diag(d_{t+1}) + (G_{t+1} b_{t+1}) a_{t+1}^T
    dr_t     = S_t^T dy_t
    dd_t[j]  = sum_i G_t[i, j] S_{t-1}[i, j]
    dk_t     = G_t^T v_t,          dv_t = G_t k_t
    db_t     = G_t^T sa_t,         da_t = S_{t-1}^T (G_t b_t)

The kernel walks backwards in time and recovers S_{t-1} from S_t by inverting the update,
S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1 / d_t), which is well conditioned because
d >= exp(-exp(-0.5)) ~ 0.545; the forward pass stores the exact state every CHUNK steps and
the backward pass restarts from it, so inversion errors never grow over more than CHUNK steps.

Tensors are (B, T, H, N), float32, contiguous. The state starts at zero (training only).
"""

from __future__ import annotations

import torch

CHUNK = 16


def wkv7_loop(r, d, k, v, a, b):
    """Reference recurrence, one time step at a time (any device, autograd-friendly).

    Args:
        r, d, k, v, a, b: (B, T, H, N) float tensors.

    Returns:
        y: (B, T, H, N), same dtype as the inputs.
    """
    B, T, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=r.dtype, device=r.device)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * d[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] \
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, dim=1)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: only wkv7_loop is available
    triton = None

if triton is not None:

    @triton.jit
    def _wkv7_forward(r_ptr, d_ptr, k_ptr, v_ptr, a_ptr, b_ptr,   # (B, T, H, N) f32
                      y_ptr, sa_ptr,                              # (B, T, H, N) f32, written
                      ckpt_ptr,                                   # (B*H, T/L, N, N) f32, written
                      T, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr):
        pid = tl.program_id(0)
        bb = pid // H
        hh = pid % H
        i = tl.arange(0, N)
        j = tl.arange(0, N)
        base = bb.to(tl.int64) * T * H * N + hh * N
        n_chunks = T // L
        S = tl.zeros([N, N], dtype=tl.float32)
        for c in range(n_chunks):
            for tt in range(L):
                off = base + (c * L + tt) * H * N
                r = tl.load(r_ptr + off + j)
                d = tl.load(d_ptr + off + j)
                k = tl.load(k_ptr + off + j)
                a = tl.load(a_ptr + off + j)
                b = tl.load(b_ptr + off + j)
                v = tl.load(v_ptr + off + i)
                sa = tl.sum(S * a[None, :], axis=1)
                S = S * d[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
                y = tl.sum(S * r[None, :], axis=1)
                tl.store(y_ptr + off + i, y)
                tl.store(sa_ptr + off + i, sa)
            ck = ckpt_ptr + (pid.to(tl.int64) * n_chunks + c) * N * N
            tl.store(ck + i[:, None] * N + j[None, :], S)

    @triton.jit
    def _wkv7_backward(r_ptr, d_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # (B, T, H, N) f32
                       dy_ptr, sa_ptr, ckpt_ptr,                   # as written by the forward
                       dr_ptr, dd_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,  # (B, T, H, N) f32, written
                       T, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr):
        pid = tl.program_id(0)
        bb = pid // H
        hh = pid % H
        i = tl.arange(0, N)
        j = tl.arange(0, N)
        base = bb.to(tl.int64) * T * H * N + hh * N
        n_chunks = T // L
        G = tl.zeros([N, N], dtype=tl.float32)
        for cc in range(n_chunks):
            c = n_chunks - 1 - cc
            ck = ckpt_ptr + (pid.to(tl.int64) * n_chunks + c) * N * N
            S = tl.load(ck + i[:, None] * N + j[None, :])
            for tt in range(L):
                off = base + (c * L + L - 1 - tt) * H * N
                r = tl.load(r_ptr + off + j)
                d = tl.load(d_ptr + off + j)
                k = tl.load(k_ptr + off + j)
                a = tl.load(a_ptr + off + j)
                b = tl.load(b_ptr + off + j)
                v = tl.load(v_ptr + off + i)
                dy = tl.load(dy_ptr + off + i)
                sa = tl.load(sa_ptr + off + i)

                G += dy[:, None] * r[None, :]
                tl.store(dr_ptr + off + j, tl.sum(S * dy[:, None], axis=0))
                # S_t -> S_{t-1}
                S = (S - v[:, None] * k[None, :] - sa[:, None] * b[None, :]) / d[None, :]
                gb = tl.sum(G * b[None, :], axis=1)
                tl.store(dd_ptr + off + j, tl.sum(G * S, axis=0))
                tl.store(dk_ptr + off + j, tl.sum(G * v[:, None], axis=0))
                tl.store(dv_ptr + off + i, tl.sum(G * k[None, :], axis=1))
                tl.store(db_ptr + off + j, tl.sum(G * sa[:, None], axis=0))
                tl.store(da_ptr + off + j, tl.sum(S * gb[:, None], axis=0))
                # G_t -> G_{t-1} (without dy_{t-1} r_{t-1}^T, added at the next step)
                G = G * d[None, :] + gb[:, None] * a[None, :]


class _WKV7(torch.autograd.Function):
    num_warps = 4

    @staticmethod
    def forward(ctx, r, d, k, v, a, b):
        B, T, H, N = r.shape
        assert T % CHUNK == 0, f"sequence length {T} must be a multiple of {CHUNK}"
        y = torch.empty_like(v)
        sa = torch.empty_like(v)
        ckpt = torch.empty(B * H, T // CHUNK, N, N, dtype=torch.float32, device=r.device)
        _wkv7_forward[(B * H,)](r, d, k, v, a, b, y, sa, ckpt, T, H, N, CHUNK,
                                num_warps=_WKV7.num_warps)
        ctx.save_for_backward(r, d, k, v, a, b, sa, ckpt)
        return y

    @staticmethod
    def backward(ctx, dy):
        r, d, k, v, a, b, sa, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = dy.contiguous().float()
        grads = [torch.empty_like(x) for x in (r, d, k, v, a, b)]
        _wkv7_backward[(B * H,)](r, d, k, v, a, b, dy, sa, ckpt, *grads, T, H, N, CHUNK,
                                 num_warps=_WKV7.num_warps)
        return tuple(grads)


def wkv7_triton(r, d, k, v, a, b):
    """Same as wkv7_loop, through the Triton kernels (float32, T a multiple of CHUNK)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use wkv7_loop")
    args = [x.float().contiguous() for x in (r, d, k, v, a, b)]
    return _WKV7.apply(*args)
