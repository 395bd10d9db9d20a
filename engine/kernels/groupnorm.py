"""GroupNorm with optional SiLU fused, forward and backward, in Triton; NCHW and channels-last
alike.

One program per (sample, group) walks the group's channels × pixels in tiles through the tensor's
own strides (channels-last is a channel stride of 1 and a pixel stride of C), in three passes: mean,
variance (of the centred values, so no cancellation), normalise-scale-shift-activate. The backward
recomputes the normalised input from the saved mean and 1/std; the per-channel weight and bias
gradients are summed over the batch by torch afterwards, so no atomics are needed.
"""
import torch
import triton
import triton.language as tl

TILE = 4096  # elements per program step


@triton.jit
def _tile(base, c, s, C_PER_G, S, sc, ss):
    return base + c[:, None] * sc + s[None, :] * ss, (c[:, None] < C_PER_G) & (s[None, :] < S)


@triton.jit
def _fwd(X, W, B, Y, MEAN, RSTD, sb, sc, ss, G, C_PER_G, S, eps, SILU: tl.constexpr,
         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    base = n * sb + g * C_PER_G * sc
    c = tl.arange(0, BLOCK_C)
    count = (C_PER_G * S).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        off, mask = _tile(base, c, s0 + tl.arange(0, BLOCK_S), C_PER_G, S, sc, ss)
        acc += tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, 1), 0) / count
    acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        off, mask = _tile(base, c, s0 + tl.arange(0, BLOCK_S), C_PER_G, S, sc, ss)
        d = tl.where(mask, tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, 1), 0) / count + eps)
    w = tl.load(W + g * C_PER_G + c, mask=c < C_PER_G, other=0.0).to(tl.float32)
    bias = tl.load(B + g * C_PER_G + c, mask=c < C_PER_G, other=0.0).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        off, mask = _tile(base, c, s0 + tl.arange(0, BLOCK_S), C_PER_G, S, sc, ss)
        y = ((tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd * w[:, None]
             + bias[:, None])
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(off + Y, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit
def _xhat_dy(X, DY, off, mask, mean, rstd, w, bias, SILU: tl.constexpr):
    """The normalised input and the gradient reaching the affine output (through SiLU's
    derivative)."""
    xhat = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = xhat * w[:, None] + bias[:, None]
        sig = tl.sigmoid(y)
        dy = dy * sig * (1.0 + y * (1.0 - sig))
    return xhat, dy


@triton.jit
def _bwd(X, W, B, DY, DX, MEAN, RSTD, DW, DB, sb, sc, ss, G, C_PER_G, S, SILU: tl.constexpr,
         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    base = n * sb + g * C_PER_G * sc
    c = tl.arange(0, BLOCK_C)
    count = (C_PER_G * S).to(tl.float32)
    mean, rstd = tl.load(MEAN + pid), tl.load(RSTD + pid)
    w = tl.load(W + g * C_PER_G + c, mask=c < C_PER_G, other=0.0).to(tl.float32)
    bias = tl.load(B + g * C_PER_G + c, mask=c < C_PER_G, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)   # Σ dy·x̂ per channel
    db = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)   # Σ dy per channel
    for s0 in range(0, S, BLOCK_S):
        off, mask = _tile(base, c, s0 + tl.arange(0, BLOCK_S), C_PER_G, S, sc, ss)
        xhat, dy = _xhat_dy(X, DY, off, mask, mean, rstd, w, bias, SILU)
        dw += tl.where(mask, dy * xhat, 0.0)
        db += dy
    dw_c, db_c = tl.sum(dw, 1), tl.sum(db, 1)
    mean_dyw = tl.sum(db_c * w, 0) / count          # mean of dy·w over the group
    mean_dyw_xhat = tl.sum(dw_c * w, 0) / count     # mean of dy·w·x̂
    for s0 in range(0, S, BLOCK_S):
        off, mask = _tile(base, c, s0 + tl.arange(0, BLOCK_S), C_PER_G, S, sc, ss)
        xhat, dy = _xhat_dy(X, DY, off, mask, mean, rstd, w, bias, SILU)
        dx = (dy * w[:, None] - mean_dyw - xhat * mean_dyw_xhat) * rstd
        tl.store(off + DX, dx.to(DX.dtype.element_ty), mask=mask)
    cm = c < C_PER_G
    tl.store(DW + n * G * C_PER_G + g * C_PER_G + c, dw_c, mask=cm)
    tl.store(DB + n * G * C_PER_G + g * C_PER_G + c, db_c, mask=cm)


def supported(x: torch.Tensor, num_groups: int) -> bool:
    return (x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.dim() == 4
            and x.shape[1] % num_groups == 0 and _layout(x) is not None)


def _layout(x: torch.Tensor):
    """(sample, channel, pixel) strides when the pixels form one strided run (NCHW or
    channels-last)."""
    if x.stride(2) != x.shape[3] * x.stride(3) and x.shape[2] > 1:
        return None
    return x.stride(0), x.stride(1), x.stride(3)


def _launch_args(x: torch.Tensor, num_groups: int):
    cpg = x.shape[1] // num_groups
    bc = triton.next_power_of_2(cpg)
    bs = min(triton.next_power_of_2(x.shape[2] * x.shape[3]), max(16, TILE // bc))
    return (*_layout(x), num_groups, cpg, x.shape[2] * x.shape[3]), dict(BLOCK_C=bc, BLOCK_S=bs)


def forward(x, weight, bias, num_groups: int, eps: float, silu: bool):
    """(y, mean, rstd); y has x's memory layout, mean and rstd are fp32 (N·G,)."""
    y = torch.empty_like(x)
    n = x.shape[0] * num_groups
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    args, blocks = _launch_args(x, num_groups)
    _fwd[(n,)](x, weight, bias, y, mean, rstd, *args, eps, SILU=silu, **blocks)
    return y, mean, rstd


def backward(dy, x, weight, bias, mean, rstd, num_groups: int, silu: bool):
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    dw = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    args, blocks = _launch_args(x, num_groups)
    _bwd[(x.shape[0] * num_groups,)](x, weight, bias, dy, dx, mean, rstd, dw, db,
                                     *args, SILU=silu, **blocks)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


@torch.library.custom_op("engine::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                  eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, weight, bias, num_groups, eps, silu)


@group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty(x.shape[0] * num_groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("engine::group_norm_backward", mutates_args=())
def group_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                           num_groups: int, silu: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dy, x, weight, bias, mean, rstd, num_groups, silu)


@group_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    x, weight, bias, ctx.num_groups, _, ctx.silu = inputs
    ctx.save_for_backward(x, weight, bias, *output[1:])


def _grad(ctx, dy, _dmean, _drstd):
    dx, dw, db = group_norm_backward_op(dy, *ctx.saved_tensors, ctx.num_groups, ctx.silu)
    return dx, dw, db, None, None, None


group_norm_op.register_autograd(_grad, setup_context=_setup)
