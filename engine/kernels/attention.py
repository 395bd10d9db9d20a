"""FlashAttention-2 in Triton: forward and backward, any sequence length, any head dim ≤ 256,
fp32/fp16/bf16.

SD's head dims 40, 80 and 160 run on 64-, 128- and 256-wide tiles with the tail of the head dim
masked; the 77-token cross-attention and odd lengths mask the sequence tails. The forward saves the
row log-sum-exp (base 2); the backward recomputes the probabilities from it, with one kernel for
dK/dV (a program per key block) and one for dQ (a program per query block), so nothing is
accumulated atomically and results repeat bit for bit.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512      # the forward; the VAE's single head is 512 wide
# on CUDA: the 512-wide forward's tiles need more shared memory than an H200 has (475 KB in fp32,
# 311 KB in fp16, against 227 KB: bench/results/gpu_kernels_h200.json), so wider heads go to torch
MAX_CUDA_HEAD_DIM = 256
# the backward (UNet and CLIP heads); wider heads differentiate through torch's math
MAX_BWD_HEAD_DIM = 256


def precision(dtype: torch.dtype) -> int:
    """How `_dot` multiplies: 1 fp32 inputs in true fp32 (as torch's matmul; tf32 otherwise), 2 bf16
    upcast to fp32 under the interpreter, whose bf16 tl.dot returns garbage (triton 3.9), 0 the
    native tensor-core dot."""
    if dtype == torch.float32:
        return 1
    return 2 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 0


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    if PREC == 1:
        return tl.dot(a, b, input_precision="ieee")
    if PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd(Q, K, V, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
         H, NQ, NK, D, qk_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr):
    """One (query block, head, BLOCK_D-wide slice of the output) per program. Head dims above 256
    (the VAE's 512) take several slices, each recomputing QKᵀ over the whole head dim in BLOCK_D
    chunks."""
    pid_m, bh, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q_ptr = Q + b * sqb + h * sqh + rm[:, None] * sqn
    q = tl.load(q_ptr + rd[None, :], mask=(rm[:, None] < NQ) & (rd[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    rv = pid_d * BLOCK_D + rd
    end = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if CAUSAL else NK
    for start in range(0, end, BLOCK_N):
        cols = start + rn
        k_ptr = K + b * skb + h * skh + cols[:, None] * skn
        k = tl.load(k_ptr + rd[None, :], mask=(cols[:, None] < NK) & (rd[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(k), PREC)
        for d0 in tl.static_range(BLOCK_D, D_PAD, BLOCK_D):
            qc = tl.load(q_ptr + d0 + rd[None, :],
                         mask=(rm[:, None] < NQ) & (d0 + rd[None, :] < D), other=0.0)
            kc = tl.load(k_ptr + d0 + rd[None, :],
                         mask=(cols[:, None] < NK) & (d0 + rd[None, :] < D), other=0.0)
            s += _dot(qc, tl.trans(kc), PREC)
        s = s * qk_scale
        valid = cols[None, :] < NK
        if CAUSAL:
            valid = valid & (cols[None, :] <= rm[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + rv[None, :],
                    mask=(cols[:, None] < NK) & (rv[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rm[:, None] * son + rv[None, :], acc.to(O.dtype.element_ty),
             mask=(rm[:, None] < NQ) & (rv[None, :] < D))
    if pid_d == 0:
        tl.store(LSE + bh * NQ + rm, m_i + tl.log2(l_i), mask=rm < NQ)


@triton.jit
def _bwd_delta(O, DO, DELTA, son_b, son_h, son, sdb, sdh, sdn, H, NQ, D,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mask = (rm[:, None] < NQ) & (rd[None, :] < D)
    o = tl.load(O + b * son_b + h * son_h + rm[:, None] * son + rd[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=mask, other=0.0)
    tl.store(DELTA + bh * NQ + rm, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rm < NQ)


@triton.jit
def _probs(q, k, lse, rm, cols, NQ, NK, qk_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """P of a (query block, key block) tile recomputed from the saved log-sum-exp; zero outside the
    valid area."""
    s = _dot(q, tl.trans(k), PREC) * qk_scale
    valid = (rm[:, None] < NQ) & (cols[None, :] < NK)
    if CAUSAL:
        valid = valid & (cols[None, :] <= rm[:, None])
    return tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
              sdb, sdh, sdn, H, NQ, NK, D, qk_scale, sm_scale,
              CAUSAL: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < NK) & (rd[None, :] < D)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + rd[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + rd[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    begin = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start in range(begin, NQ, BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        q_mask = (rm[:, None] < NQ) & (rd[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=q_mask,
                     other=0.0)
        lse = tl.load(LSE + bh * NQ + rm, mask=rm < NQ, other=0.0)
        delta = tl.load(DELTA + bh * NQ + rm, mask=rm < NQ, other=0.0)
        p = _probs(q, k, lse, rm, cols, NQ, NK, qk_scale, CAUSAL, PREC)
        dv += _dot(tl.trans(p).to(do.dtype), do, PREC)
        dp = _dot(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, PREC)
    tl.store(DK + b * skb + h * skh + cols[:, None] * skn + rd[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * svb + h * svh + cols[:, None] * svn + rd[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
            H, NQ, NK, D, qk_scale, sm_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q_mask = (rm[:, None] < NQ) & (rd[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * NQ + rm, mask=rm < NQ, other=0.0)
    delta = tl.load(DELTA + bh * NQ + rm, mask=rm < NQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(NK, (pid_m + 1) * BLOCK_M) if CAUSAL else NK
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < NK) & (rd[None, :] < D)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + rd[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + rd[None, :], mask=kv_mask,
                    other=0.0)
        p = _probs(q, k, lse, rm, cols, NQ, NK, qk_scale, CAUSAL, PREC)
        ds = p * (_dot(do, tl.trans(v), PREC) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC)
    tl.store(DQ + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    widest = MAX_CUDA_HEAD_DIM if q.is_cuda else MAX_HEAD_DIM
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.dtype == k.dtype == v.dtype
            and q.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1] <= widest
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def _blocks(d: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_D, padded head dim of the forward."""
    pad = max(16, triton.next_power_of_2(d))
    bd = min(pad, 128) if pad > MAX_BWD_HEAD_DIM else pad
    return (128 if bd <= 64 else 64), (64 if bd <= 128 else 32), bd, pad


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log2-sum-exp of each query row) for (batch, heads, seq, head_dim) tensors with unit
    last stride."""
    b, h, nq, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)
    bm, bn, bd, pad = _blocks(d)
    _fwd[(triton.cdiv(nq, bm), b * h, pad // bd)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), h, nq, k.shape[2],
        d, scale * LOG2E, CAUSAL=causal, PREC=precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd, D_PAD=pad, num_warps=4 if bd <= 64 else 8)
    return o, lse


def _math_backward(do, q, k, v, lse, scale: float, causal: bool) -> tuple[torch.Tensor, ...]:
    """The same formulas as the kernels with the whole score matrix in memory (fp32)."""
    qf, kf, vf, dof = (t.float() for t in (q, k, v, do))
    s = (qf @ kf.transpose(-1, -2)) * (scale * LOG2E)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp2(s - lse[..., None])
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * (p @ vf)).sum(-1, keepdim=True))
    return ((ds @ kf * scale).to(q.dtype), (ds.transpose(-1, -2) @ qf * scale).to(k.dtype),
            (p.transpose(-1, -2) @ dof).to(v.dtype))


def backward(do, q, k, v, o, lse, scale: float, causal: bool) -> tuple[torch.Tensor, ...]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if d > MAX_BWD_HEAD_DIM:
        return _math_backward(do, q, k, v, lse, scale, causal)
    # the gradients are stored with their inputs' strides
    do, q, k, v = (t.contiguous() for t in (do, q, k, v))
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    delta = torch.empty_like(lse)
    bd = max(16, triton.next_power_of_2(d))
    bm = bn = 64 if bd <= 64 else 32
    _bwd_delta[(triton.cdiv(nq, bm), b * h)](o, do, delta, *_strides(o), *_strides(do), h, nq, d,
                                             BLOCK_M=bm, BLOCK_D=bd)
    common = dict(CAUSAL=causal, PREC=precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                  num_warps=4 if bd <= 64 else 8)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, nq, nk, d, scale * LOG2E, scale)
    _bwd_dkdv[(triton.cdiv(nk, bn), b * h)](q, k, v, do, lse, delta, dk, dv, *args, **common)
    _bwd_dq[(triton.cdiv(nq, bm), b * h)](q, k, v, do, lse, delta, dq, *args, **common)
    return dq, dk, dv


@torch.library.custom_op("engine::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, scale, causal)


@attention_op.register_fake
def _(q, k, v, scale, causal):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.custom_op("engine::attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do, q, k, v, o, lse, scale, causal)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale, causal):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.causal = inputs
    ctx.save_for_backward(q, k, v, *output)


def _grad(ctx, do, _dlse):  # the log-sum-exp is internal: nothing downstream differentiates it
    dq, dk, dv = attention_backward_op(do, *ctx.saved_tensors, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


attention_op.register_autograd(_grad, setup_context=_setup)
