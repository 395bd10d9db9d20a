"""fp32 and bf16 linear layers, and bf16 convolutions, on the CPU through oneDNN.

torch's CPU fp32 matmul calls MKL, whose kernels on AMD CPUs run below oneDNN's AVX-512 ones;
oneDNN's linear (the op torch.compile's CPU backend emits) is faster at the SD UNet's shapes and
adds the bias, then a residual, a product or GELU, in its epilogue: in bf16 (whose matmuls go to
oneDNN anyway) that saves a pass over the output for each. In fp32 a row comes out
the same whether 2 or 2000 rows share the call, so an image's rows do not depend on its batch
(tests/test_batch_invariance.py); one row alone takes another path, which is why per-image vectors
go through engine.models.blocks.by_row.
A bf16 convolution on AMX wants its weight in a blocked layout; torch's conv2d reorders the weight
into it at every call, which at the SD UNet's shapes costs 5–25% of the convolution. conv2d below
reorders each weight once and keeps that copy while the weight is unchanged.
"""
import ctypes
import math
import os
import platform
import weakref

import torch
from torch.utils.flop_counter import register_flop_formula

# absent from builds without oneDNN
_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
           if torch.backends.mkldnn.is_available() else None)
_CONV = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
         if torch.backends.mkldnn.is_available() else None)

if _LINEAR is not None:
    @register_flop_formula(_LINEAR)
    def _flops(x_shape, *_, out_shape=None, **__) -> int:
        """For torch's FlopCounterMode, which knows only aten's matmuls."""
        return 2 * math.prod(out_shape) * x_shape[-1]

if _CONV is not None:
    @register_flop_formula(_CONV)
    def _conv_flops(x_shape, w_shape, *rest, out_shape=None, **__) -> int:
        """Direct-convolution FLOPs; the binary overload passes the residual before the weight."""
        w_shape = rest[0] if tuple(w_shape) == tuple(out_shape) else w_shape
        return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


def linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, act: str | None = None,
                   mul: torch.Tensor | None = None) -> bool:
    other = residual if residual is not None else mul
    return (_LINEAR is not None and x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # a compiler lowers the matmul itself
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and (bias is None or bias.dtype == x.dtype)
            and (residual is None or mul is None)
            and (other is None or (other.dtype == x.dtype and act is None))
            and not (torch.is_grad_enabled()
                     and any(t is not None and t.requires_grad for t in (x, weight, bias, other))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           residual: torch.Tensor | None = None, act: str | None = None,
           mul: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ + bias, then + residual or · mul (of the output's shape), or GELU (act='gelu',
    erf)."""
    if residual is not None:
        return _LINEAR.binary(x, residual, weight, bias, "add")
    if mul is not None:
        return _LINEAR.binary(x, mul, weight, bias, "mul")
    return _LINEAR(x, weight, bias, act or "none", [], "none" if act == "gelu" else "")


def conv2d_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None = None) -> bool:
    return (_CONV is not None and x.device.type == "cpu" and x.dim() == 4
            and not torch.compiler.is_compiling()
            and x.dtype == weight.dtype == torch.bfloat16 and weight.shape[1] == x.shape[1]
            and not weight.is_inference()  # whose changes leave no trace in _version
            and all(t is None or t.dtype == x.dtype for t in (bias, residual))
            and not (torch.is_grad_enabled()
                     and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
           padding: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias) [+ residual] with the weight in oneDNN's layout, reordered once."""
    w = _reordered(weight, stride, padding, x.shape)
    pad, step, one = [padding] * 2, [stride] * 2, [1, 1]
    if residual is not None:
        return _CONV.binary(x, residual, w, bias, pad, step, one, 1, "add", None, None, [], None)
    return _CONV(x, w, bias, pad, step, one, 1, "none", [], "")


def _reordered(weight: torch.Tensor, stride: int, padding: int, shape) -> torch.Tensor:
    """The layout is chosen for the first input's shape; it computes the same for any other."""
    key = (weight._version, weight.data_ptr(), stride, padding)
    kept = _REORDERED.get(id(weight))
    if kept is None or kept[0]() is not weight or kept[1] != key:
        w = torch.ops.mkldnn._reorder_convolution_weight(
            weight, [padding] * 2, [stride] * 2, [1, 1], 1, list(shape))
        gone = weakref.ref(weight, lambda _, i=id(weight): _REORDERED.pop(i, None))
        kept = _REORDERED[id(weight)] = (gone, key, w)
    return kept[2]


# id(weight) → (weakref to it, what it was reordered from, the reordered copy); a tensor's == is
# elementwise, so it cannot key a WeakKeyDictionary
_REORDERED: dict[int, tuple] = {}


def retain_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the
    OS. By default it returns the top of its heap whenever 64 MiB there are free, so every UNet call
    faults its activations in again: 250k–700k page faults, 5–10% of an SD step on 2 cores. Blocks
    above 32 MiB are mapped and unmapped as before (kept, they would fragment the heap: a 1 GiB
    limit added 40% to a 1024² generation's peak). Once per process, on glibc only;
    ENGINE_MALLOC=system leaves the allocator as it is."""
    global _retained
    if (not _retained and _LIBC is not None
            and os.environ.get("ENGINE_MALLOC", "").lower() != "system"):
        m_trim_threshold, m_mmap_threshold = -1, -3
        _retained = bool(_LIBC.mallopt(m_mmap_threshold, 32 * 2**20)
                         and _LIBC.mallopt(m_trim_threshold, 2**31 - 1))
    return _retained


def release_freed_memory():
    """Hand the blocks kept since retain_freed_memory back to the OS: between a job's phases (the
    UNet's loop, the VAE), so that one phase's kept blocks do not add to the next one's peak."""
    if _retained:
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None
_retained = False
