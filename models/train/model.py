"""RWKV-7 ("Goose", x070) in PyTorch, for training the shipped model.

Written from the published formulation (BlinkDL's RWKV-LM RWKV-v7 training code and the `rwkv`
package's inference): the module tree reproduces the official checkpoint's tensor names and
shapes, so `state_dict()` is the official layout once cast to bf16 (see export_pth.py).

Shapes: B batch, T time, C = D width, H heads of N = S channels, F channel-mix width,
V vocabulary; low-rank widths Dw, Da, Dv, Dg.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wkv7 import wkv7_loop, wkv7_triton

# Decay d = exp(-exp(-0.5) * sigmoid(z)), i.e. log d in (-0.6065, 0): the official soft clamp
# w = -softplus(-z) - 0.5 followed by d = exp(-exp(w)).
DECAY_SCALE = math.exp(-0.5)
GROUP_NORM_EPS = 64e-5


@dataclasses.dataclass
class Config:
    vocab_size: int = 8192
    n_layer: int = 6
    n_embd: int = 320
    head_size: int = 64
    dim_ffn: int = 1280
    # Low-rank widths; 0 means the official suggestion for this width.
    d_decay: int = 0
    d_aaa: int = 0
    d_mv: int = 0
    d_gate: int = 0

    def __post_init__(self):
        C = self.n_embd
        suggest = lambda f: max(32, int(round(f * C ** 0.5 / 32) * 32))  # noqa: E731
        self.d_decay = self.d_decay or suggest(2.5)
        self.d_aaa = self.d_aaa or suggest(2.5)
        self.d_mv = self.d_mv or suggest(1.7)
        self.d_gate = self.d_gate or suggest(5.0)
        assert C % self.head_size == 0

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def time_shift(x):
    """x_prev for every position: x shifted one step later in time, zeros at t=0. x: (B, T, C)."""
    return F.pad(x, (0, 0, 1, -1))


class TimeMix(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer

        # Initial values follow the official recipe (a function of depth and channel index).
        ratio_0_to_1 = layer_id / (L - 1)
        ratio_1_to_almost0 = 1.0 - layer_id / L
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3)

        def mix(power):
            return nn.Parameter(1.0 - torch.pow(ddd, power * ratio_1_to_almost0))

        self.x_r, self.x_w, self.x_k = mix(0.2), mix(0.9), mix(0.7)
        self.x_v, self.x_a, self.x_g = mix(0.7), mix(0.9), mix(0.2)

        def lora(r):
            first = nn.Parameter(torch.zeros(C, r))                        # (D, r)
            second = torch.empty(r, C)                                     # (r, D)
            nn.init.orthogonal_(second, gain=0.1)
            return first, nn.Parameter(second)

        self.w1, self.w2 = lora(cfg.d_decay)
        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.a1, self.a2 = lora(cfg.d_aaa)
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.v1, self.v2 = lora(cfg.d_mv)
        self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
        self.g1, self.g2 = lora(cfg.d_gate)
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((cfg.n_head, N), -0.04))       # (H, N)

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(cfg.n_head, C, eps=GROUP_NORM_EPS)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)
            nn.init.orthogonal_(self.receptance.weight, gain=1.0)
            nn.init.orthogonal_(self.key.weight, gain=0.1)
            nn.init.orthogonal_(self.value.weight, gain=1.0)
            nn.init.zeros_(self.output.weight)

    def forward(self, x, v_first, wkv):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = time_shift(x) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        z = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            # value residual: mix in the first layer's v
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)   # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        d = torch.exp(-DECAY_SCALE * torch.sigmoid(z.float()))

        heads = lambda t: t.float().reshape(B, T, H, N)  # noqa: E731
        y = wkv(heads(r), heads(d), heads(k), heads(v), heads(-kk), heads(kk * a))
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - torch.pow(ddd, ratio_1_to_almost0 ** 4))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)
        with torch.no_grad():
            nn.init.orthogonal_(self.key.weight, gain=1.0)
            nn.init.zeros_(self.value.weight)

    def forward(self, x):
        k = x + (time_shift(x) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, wkv):
        dx, v_first = self.att(self.ln1(x), v_first, wkv)
        x = x + dx
        x = x + self.ffn(self.ln2(x))
        return x, v_first


class RWKV7(nn.Module):
    """The whole model. forward(idx) -> logits (B, T, V)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
            gain = 0.5 * math.sqrt(cfg.vocab_size / cfg.n_embd) if cfg.vocab_size > cfg.n_embd else 0.5
            nn.init.orthogonal_(self.head.weight, gain=gain)

    def hidden(self, idx, wkv=None, ln0_folded=False):
        """Final hidden states (after ln_out), (B, T, C).

        Args:
            idx: (B, T) token ids.
            wkv: recurrence implementation; default: Triton on CUDA, the loop elsewhere.
            ln0_folded: the embedding already has blocks.0.ln0 applied (as in rwkvcpu files).
        """
        if wkv is None:
            wkv = wkv7_triton if idx.is_cuda else wkv7_loop
        x = self.emb(idx)
        if not ln0_folded:
            x = self.blocks[0].ln0(x)
        v_first = None
        for block in self.blocks:
            x, v_first = block(x, v_first, wkv)
        return self.ln_out(x)

    def forward(self, idx, wkv=None, ln0_folded=False):
        return self.head(self.hidden(idx, wkv, ln0_folded))


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, also pushes each position's largest logit towards 0.

    The official trainer's regulariser: gradient 1e-4 / (B*T) * max_logit on the argmax logit,
    which keeps logits from drifting upwards (helps bf16/fp16 inference).
    """

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits)
        glogits.scatter_(-1, ids, maxx * factor)
        return grad_output, glogits * grad_output


def loss_fn(model, idx, targets):
    logits = model(idx)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    return L2Wrap.apply(loss, logits), loss.detach()
