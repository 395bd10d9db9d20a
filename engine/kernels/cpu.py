"""fp32 and bf16 linear layers, bf16 convolutions and attention, on the CPU through oneDNN.

torch's CPU fp32 matmul calls MKL, whose kernels on AMD CPUs run below oneDNN's AVX-512 ones;
oneDNN's linear (the op torch.compile's CPU backend emits) is faster at the SD UNet's shapes and
adds the bias, then a residual, a product or GELU, in its epilogue: in bf16 (whose matmuls go to
oneDNN anyway) that saves a pass over the output for each. Small fp32 layers (the embedded
model's) stay on aten's matmul, whose call costs less (FP32_MIN_WEIGHT). In fp32 a row comes out
the same whether 2 or 2000 rows share the call, so an image's rows do not depend on its batch
(tests/test_batch_invariance.py); one row alone takes another path, which is why per-image vectors
go through engine.models.blocks.by_row.
In bf16, oneDNN wants a weight in a blocked layout and reorders it into that at every call: at the
SD UNet's shapes 5–25% of a convolution, up to 30% of a linear layer. Here each bf16 weight is
reordered once, at its first use, and the copy kept while the weight is unchanged: about 5% off an
SD 1.5 UNet step, for as much memory again as the weights (pending_bytes).
"""
import ctypes
import math
import os
import platform
import weakref

import torch
import torch.nn.functional as F
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


# fp32 weights with fewer entries go to aten's matmul: there oneDNN's per-call cost outweighs its
# kernel (a 128×128 layer 1.2× aten's time, 320×320 level); the choice depends on the weight only,
# so an image's rows still do not depend on its batch
FP32_MIN_WEIGHT = 100_000


def linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, act: str | None = None,
                   mul: torch.Tensor | None = None, min_weight: int = FP32_MIN_WEIGHT) -> bool:
    other = residual if residual is not None else mul
    return (_LINEAR is not None and x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # a compiler lowers the matmul itself
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and (x.dtype == torch.bfloat16 or weight.numel() >= min_weight)
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
    if x.dtype == torch.bfloat16 and not weight.is_inference() and x.numel():
        rows = x.numel() // x.shape[-1]
        weight = _reordered(weight, ("linear",),
                            lambda t: torch.ops.mkldnn._reorder_linear_weight(t, rows))
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
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias, residual))))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
           padding: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias) [+ residual] with the weight in oneDNN's layout, reordered once."""
    pad, step, one = [padding] * 2, [stride] * 2, [1, 1]
    # the layout is chosen for the first input's shape; it computes the same for any other
    w = _reordered(weight, ("conv", stride, padding), lambda t: torch.ops.mkldnn.
                   _reorder_convolution_weight(t, pad, step, one, 1, list(x.shape)))
    if residual is not None:
        return _CONV.binary(x, residual, w, bias, pad, step, one, 1, "add", None, None, [], None)
    return _CONV(x, w, bias, pad, step, one, 1, "none", [], "")


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Where torch's CPU flash attention is slow: on AMD CPUs, where in fp32 its GEMMs are MKL's,
    which runs a generic path there (150–170 GFLOP/s against oneDNN's 300–400 on 2 cores), and its
    bf16 kernel is built around Intel's AMX tiles."""
    return (_LINEAR is not None and _AMD and q.device.type == "cpu" and q.dim() == 4
            and not torch.compiler.is_compiling()
            and q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and q.shape[2] * k.shape[2] * q.shape[3] >= ATTENTION_MIN_WORK
            and k.numel() * k.element_size() <= ATTENTION_MAX_KEYS
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))


def short_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Where autograd runs through bf16 attention over few keys on the CPU (training a small model,
    or cross-attention to the prompt): torch's flash kernel costs 2–10× the plain matmul–softmax–
    matmul there, forward and backward. Not for long self-attention, where it stays faster."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and k.shape[-2] <= SHORT_ATTENTION_KEYS and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v)))


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return s.softmax(-1) @ v


# keys up to which short_attention runs: on an AMD CPU, measured faster up to 256 keys at head dims
# 16–160 (64×2 heads of 256 queries: level; 1024 queries against 77 keys: 2.2×), slower from 512
SHORT_ATTENTION_KEYS = 256


# multiply-adds per head (queries × keys × head dim) below which torch's kernel is as fast: the
# loop below costs several calls per head and row block
ATTENTION_MIN_WORK = 2**22
# scores held at once: under the 32 MiB that the heap keeps (retain_freed_memory)
ATTENTION_BLOCK = 2**21
# bytes of keys above which torch's kernel keeps the attention: ours copies the keys and values
# at every call, which a tiled VAE decode's global attention (its queries in chunks against all
# keys, 72 MiB of them from 1536² up) would repeat for every chunk. An SD 1.5 UNet at 1024² has
# 42 MB of keys.
ATTENTION_MAX_KEYS = 2**26
# row sums of 2^s that need no shift: from 2^-76 a row's largest term (≥ sum / 2^26 keys) is over
# 2^-102, so terms 2^-24 of it still lie in fp32's and bf16's normal range; to 2^88, 2^s v stays
# in that range for |v| under 2^40
ATTENTION_SUMS = (2.0**-76, 2.0**88)
_LOG2E = math.log2(math.e)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
              ) -> torch.Tensor:
    """softmax(q kᵀ·scale) v over (batch, heads, seq, head_dim), a block of query rows at a time:
    the scores by one oneDNN matmul, in base 2 (log2 e folded into q), then 2^s in place, one
    oneDNN matmul with v, and a division by the row sums on (rows, head_dim). The softmax's usual
    shift by the row maximum only keeps 2^s within range, so it is left out: a block whose row
    sums fall outside ATTENTION_SUMS is computed again with it, and the image's later blocks take it
    from the start (an image's scores, not its batch's, decide). The block's size depends on the key
    count only, so an image's rows do not depend on its batch."""
    b, h, n, d = q.shape
    qs = torch.mul(q, (d ** -0.5 if scale is None else scale) * _LOG2E, out=q.new_empty(b, h, n, d))
    kc = k.contiguous()
    # vᵀ with zero rows up to a multiple of oneDNN's 16 fp32 lanes (at SD 1.5's head dim 40, p v
    # over 48 columns takes 0.85× the time of 40); where there is a spare row, ones in it give
    # the row sums from the same matmul
    vt = F.pad(v.transpose(2, 3), (0, 0, 0, -d % 16)).contiguous()
    sums_in_v = d % 16 != 0
    if sums_in_v:
        vt[:, :, d] = 1
    out = q.new_empty(b, n, h, d)  # its transpose flattens to (b, n, h·d) without a copy
    rows = max(1, ATTENTION_BLOCK // k.shape[2])
    for i in range(b):
        shift = False
        for j in range(h):
            for r0 in range(0, n, rows):
                block = (qs[i, j, r0:r0 + rows], kc[i, j], vt[i, j], d, sums_in_v)
                o, total = _attention_rows(*block, shift=shift)
                if not shift:
                    low, high = torch.aminmax(total)
                    if not (ATTENTION_SUMS[0] <= low.item() and high.item() <= ATTENTION_SUMS[1]):
                        shift = True
                        o, total = _attention_rows(*block, shift=True)
                torch.div(o, total, out=out[i, r0:r0 + rows, j])
    return out.transpose(1, 2)


def _attention_rows(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, d: int, sums_in_v: bool,
                    shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^(q kᵀ) v, its row sums), each row shifted by its maximum if asked."""
    p = _LINEAR(q, k, None, "none", [], "")
    if shift:
        p.sub_(p.amax(-1, keepdim=True))
    p.exp2_()
    o = _LINEAR(p, vt, None, "none", [], "")
    return o[:, :d], (o[:, d:d + 1] if sums_in_v else p.sum(-1, keepdim=True))


def _reordered(weight: torch.Tensor, how: tuple, reorder) -> torch.Tensor:
    """reorder(weight), kept while the weight (for a view: the tensor it views) is unchanged."""
    base = weight if weight._base is None else weight._base
    ident = (id(base), how, weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
    state = (base._version, base.data_ptr())
    kept = _REORDERED.get(ident)
    if kept is None or kept[0]() is not base or kept[1] != state:
        gone = weakref.ref(base, lambda _, i=ident: _REORDERED.pop(i, None))
        kept = _REORDERED[ident] = (gone, state, reorder(weight))
    return kept[2]


def pending_bytes(*modules: torch.nn.Module | None) -> int:
    """At most how many bytes the reordered copies of these modules' bf16 weights will add when
    they are first used (engine.memory's estimate of a job's peak counts them)."""
    if _CONV is None:
        return 0
    kept = {ident[0] for ident in _REORDERED}
    return sum(p.nbytes for m in modules if m is not None for p in m.parameters()
               if p.dtype == torch.bfloat16 and p.device.type == "cpu" and p.dim() >= 2
               and id(p) not in kept)


# (id of the viewed tensor, how, the view) → (weakref to the viewed tensor, its version and address
# when reordered, the reordered copy); a tensor's == is elementwise, so it cannot key a
# WeakKeyDictionary
_REORDERED: dict[tuple, tuple] = {}


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


def cpuinfo(field: str) -> str:
    """A field of the first processor in /proc/cpuinfo ("model name", "vendor_id", "flags"), or ""
    where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.split(":", 1)[0].strip() == field), "")


_AMD = cpuinfo("vendor_id") == "AuthenticAMD"
_retained = False
