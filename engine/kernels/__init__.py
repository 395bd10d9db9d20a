"""The single kernel dispatch point: models call only these functions.

`ENGINE_KERNELS=auto` (default): on CUDA the Triton kernels (attention, GroupNorm+SiLU) and, per
shape, the faster of the Triton and cuDNN convolutions (measured once, cached on disk); on the CPU
the torch ops, except bf16 linear layers, fp32 ones of ≥ 100k weights and bf16 convolutions
(oneDNN's, the weights reordered once; engine/kernels/cpu.py), attention on AMD CPUs, where
torch's kernel is slow (oneDNN matmuls, cpu.attention), bf16 attention over few keys under
autograd (matmul, softmax, matmul: cpu.short_attention), and fp32 3×3 convolutions with many
channels (Winograd where there are many pixels; im2col + GEMM where there are few;
engine/kernels/conv.py). 1×1 convolutions are matmuls. `torch` forces the torch ops everywhere.
`triton` forces the Triton kernels wherever their guards allow (dtype, shape; anything else falls
back to torch); on the CPU that needs `TRITON_INTERPRET=1` (slow and exact: how the kernels are
tested).
The Triton kernels are registered as torch ops (`torch.ops.engine.*`) with fake implementations and
autograd formulas, so torch.compile traces through them and training differentiates through them.
"""
import os

import torch
import torch.nn.functional as F

from . import conv, cpu
from .conv import HAS_TRITON

_MODES = ("auto", "torch", "triton")
# imported before the functions below are defined, which take back the name `attention`
if HAS_TRITON:
    from . import attention as flash
    from . import groupnorm as gn


def mode() -> str:
    m = os.environ.get("ENGINE_KERNELS", "auto").lower()
    if m not in _MODES:
        raise ValueError(f"ENGINE_KERNELS={m!r} is not one of {_MODES}; unset it or pick one")
    return m


def _triton(x: torch.Tensor, m: str) -> bool:
    """Whether the Triton path may run on x's device in mode m."""
    if m == "torch" or (m == "auto" and not x.is_cuda):
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if m == "triton" and not (HAS_TRITON and (x.is_cuda or interpret)):
        raise RuntimeError("ENGINE_KERNELS=triton needs triton and a CUDA device (on the CPU: "
                           "TRITON_INTERPRET=1, slow); unset ENGINE_KERNELS to use the torch ops")
    return HAS_TRITON and (x.is_cuda or (m == "triton" and interpret))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    is_causal: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v over (batch, heads, seq, head_dim) tensors; is_causal masks keys after
    the query."""
    if _triton(q, mode()):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if flash.supported(q, k, v):
            return flash.attention_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale,
                                      is_causal)[0]
    elif mode() == "auto" and not is_causal and cpu.attention_applies(q, k, v):
        return cpu.attention(q, k, v, scale)
    elif mode() == "auto" and not is_causal and cpu.short_attention_applies(q, k, v):
        return cpu.short_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal)


def linear(x: torch.Tensor, weight, bias=None, residual: torch.Tensor | None = None,
           act: str | None = None, mul: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ + bias [+ residual | · mul] [then GELU (act='gelu')]; on the CPU in fp32 and
    bf16, oneDNN's (engine/kernels/cpu.py)."""
    if mode() == "auto" and cpu.linear_applies(x, weight, bias, residual, act, mul):
        return cpu.linear(x, weight, bias, residual, act, mul)
    y = F.linear(x, weight, bias)
    y = y if residual is None else y + residual
    y = y if mul is None else y * mul
    return F.gelu(y) if act == "gelu" else y


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float,
               act: str | None = None) -> torch.Tensor:
    """GroupNorm, optionally followed by SiLU (act='silu')."""
    if _triton(x, mode()) and weight is not None and bias is not None:
        if gn.supported(x, num_groups):
            return gn.group_norm_op(x, weight, bias, num_groups, eps, act == "silu")[0]
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=not y.requires_grad) if act == "silu" else y


def conv2d(x: torch.Tensor, weight, bias, stride: int = 1, padding: int = 0,
           residual: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """conv2d(x) + bias [+ residual] [then SiLU (act='silu')]; the Triton kernel does all of it in
    one pass.
    Under autograd the convolution is torch's: the Triton kernel has no backward, and im2col's
    (autograd through nine slices) is slower than torch's."""
    m = mode()
    differentiated = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    if not differentiated and _triton(x, m) and conv.triton_supported(x, weight, stride, padding):
        return conv.conv2d_op(x, weight, bias, stride, padding, residual, act == "silu",
                              m == "triton")
    if m == "auto" and not differentiated and conv.winograd4_applies(x, weight, stride, padding):
        return conv.epilogue(conv.winograd4_conv3x3(x, weight, bias), residual, act)
    if m == "auto" and not differentiated and conv.winograd_applies(x, weight, stride, padding):
        return conv.epilogue(conv.winograd_conv3x3(x, weight, bias), residual, act)
    if m == "auto" and not differentiated and conv.pointwise_applies(x, weight, stride, padding):
        return conv.epilogue(conv.pointwise_conv(x, weight, bias, residual), None, act)
    if m == "auto" and cpu.conv2d_applies(x, weight, bias, residual):
        return conv.epilogue(cpu.conv2d(x, weight, bias, stride, padding, residual), None, act)
    if m == "auto" and not differentiated and conv.im2col_applies(x, weight, stride, padding):
        return conv.epilogue(conv.im2col_conv3x3(x, weight, bias, stride), residual, act)
    return conv.epilogue(F.conv2d(x, weight, bias, stride, padding), residual, act)
