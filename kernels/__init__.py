"""The single kernel dispatch point.

Models call only these functions. `ENGINE_KERNELS=auto` (default) takes the fastest path measured for the
device: for now the torch ops, except small 3×3 convolutions on the CPU (kernels/conv.py). `torch` forces the
plain torch ops everywhere. `triton` is reserved for the Triton kernels (CUDA), which are not written yet.
"""
import os

import torch
import torch.nn.functional as F

from . import conv

_MODES = ("auto", "torch", "triton")


def mode() -> str:
    m = os.environ.get("ENGINE_KERNELS", "auto").lower()
    if m not in _MODES:
        raise ValueError(f"ENGINE_KERNELS={m!r} is not one of {_MODES}; unset it or pick one")
    return m


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, is_causal: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v over (batch, heads, seq, head_dim) tensors; is_causal masks keys after the query."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal)


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, act: str | None = None) -> torch.Tensor:
    """GroupNorm, optionally followed by SiLU (act='silu')."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if act == "silu" else y


def conv2d(x: torch.Tensor, weight, bias, stride: int = 1, padding: int = 0) -> torch.Tensor:
    if mode() == "auto" and conv.im2col_applies(x, weight, stride, padding):
        return conv.im2col_conv3x3(x, weight, bias, stride)
    return F.conv2d(x, weight, bias, stride, padding)
