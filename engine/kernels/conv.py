"""Convolution paths other than the plain torch op.

CUDA: an implicit-GEMM Triton convolution (3×3 and 1×1, stride 1 and 2) over any strides (NHWC is
the fast layout), GEMM M = output pixels, N = output channels, K = taps × input channels, with bias,
residual add and SiLU fused into the epilogue. Whether it or cuDNN runs a given shape is measured
once per device and cached on disk (`choose`).

CPU, fp32: where there are many pixels and channels, Winograd does fewer multiply-adds than
oneDNN's direct convolution: F(4×4, 3×3) 4× fewer where an image has 64² pixels or more and 256
channels or more (the SD UNet's 64² level, the SD VAE's 512- and 256-channel levels), at about 1e-5
relative error; F(2×2, 3×3) 2.25× fewer at the SD UNet's 32² level, at twice the direct
convolution's rounding error (under 1e-6 relative). oneDNN's
direct 3×3 convolution is slow when there are few output pixels and many input channels (the SD
UNet's 8×8 level, the tiny UNet's 4×4 level); there, gathering NHWC patches and doing one GEMM is
faster. With few channels the nine-slice gather costs more than it saves
(bench/results/conv_cpu.json).
"""
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu

try:
    import triton
    import triton.language as tl

    from .attention import _dot, precision
    HAS_TRITON = True
except ImportError:  # triton is Linux-only; the CPU paths below need none of it
    HAS_TRITON = False

# (output pixels per image H' × W' at most, input channels at least) where im2col beat oneDNN on
# 2 cores, at batch 2 (a CFG pair), in fp32 (in bf16 oneDNN's convolution with its weights
# reordered once wins, engine.kernels.cpu). Per image, not per batch, so that an image is computed
# the same way whatever else shares its batch.
IM2COL_WINS = ((16, 320), (64, 640), (256, 1280))
# Output pixels per image at most where, in a compiled graph (engine.graphs), im2col beat oneDNN
# at any channel count: the gather is one fused loop there, and oneDNN reorders the weights at
# every call (measured on the tiny UNet's three levels).
IM2COL_COMPILED = 256


def im2col_applies(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    if padding != 1 or stride not in (1, 2) or x.device.type != "cpu" or weight.shape[2:] != (3, 3):
        return False
    pixels = ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
    return ((torch.compiler.is_compiling() and pixels <= IM2COL_COMPILED)
            or any(pixels <= p and x.shape[1] >= c for p, c in IM2COL_WINS))


def im2col_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: int = 1) -> torch.Tensor:
    """3×3, padding 1 convolution as (B·H'·W', 9·C) patches @ (9·C, O); returns a channels-last
    tensor."""
    b, c = x.shape[:2]
    h, w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    patches = [xp[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
               for i in range(3) for j in range(3)]
    cols = torch.cat(patches, dim=-1).reshape(-1, 9 * c)
    # (O, kh, kw, C): matches the patch order
    return _rows_conv(cols, weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c), bias,
                      (b, h, w))


def _gemm(rows: torch.Tensor, wm: torch.Tensor, bias: torch.Tensor | None = None,
          residual: torch.Tensor | None = None, min_weight: int = cpu.FP32_MIN_WEIGHT
          ) -> torch.Tensor:
    """rows @ wmᵀ [+ bias] [+ residual]: oneDNN's where engine.kernels.cpu takes it, else aten's.
    Winograd's taps pass min_weight=0: oneDNN's rows come out the same however many share the
    call, MKL's do not on AMD CPUs."""
    if cpu.linear_applies(rows, wm, bias, residual, min_weight=min_weight):
        return cpu.linear(rows, wm, bias, residual)
    out = F.linear(rows, wm, bias)
    return out if residual is None else out + residual


def _rows_conv(rows, wm, bias, bhw, residual=None) -> torch.Tensor:
    """(B·H·W, K) rows @ (O, K)ᵀ + bias [+ residual] as a channels-last (B, O, H, W) tensor."""
    res = None if residual is None else residual.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    return _gemm(rows, wm, bias, res).view(*bhw, -1).permute(0, 3, 1, 2)


# Winograd F(2×2, 3×3) (Lavin & Gray, 2016): each 2×2 output tile from a 4×4 input tile with 16
# GEMMs in place of 36 multiply-adds per channel pair, 2.25× fewer FLOPs than the direct convolution.
# BT, G and AT are its input, filter and output transforms; the transforms below are these rows.
# G ⊗ G maps a flattened 3×3 filter to its 16 transformed taps.
WINOGRAD_GG = torch.kron(*[torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])] * 2)
# (output pixels per image at least, input and output channels at least) where it beat oneDNN's
# direct convolution on 2 cores (bench/results/conv_cpu.json); below, the transforms and the filter
# transform (done per call, so that no second copy of the weights is kept) cost more than it saves.
# Where im2col applies it is faster still: the filter transform of 1280 × 1280 channels-last
# weights costs more than Winograd saves at 16².
WINOGRAD_WINS = ((256, 640), (1024, 256))
WINOGRAD_BAND = 2**22


# transformed filter values computed at once: under the 32 MiB that the heap keeps
# (engine.kernels.cpu.retain_freed_memory), where one 1280 × 1280 filter bank (105 MB) would be
# mapped afresh at every call
FILTER_BLOCK = 2**22


def _filter_taps(gg: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """The transformed filters, an (O, C) matrix per tap: gg maps each flattened 3×3 filter to its
    taps, in blocks of taps under FILTER_BLOCK values. (O, kh, kw, C) is a view of the
    channels-last weights that engine.checkpoints loads."""
    o, c = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(o, 9, c).contiguous()  # one layout: one rounding
    step = max(1, FILTER_BLOCK // (o * c))
    gg = gg.to(weight)
    return [u for k in range(0, len(gg), step)
            for u in torch.matmul(gg[k:k + step], w).transpose(0, 1).contiguous()]


def winograd_applies(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape[2:] == (3, 3) and stride == 1 and padding == 1
            and any(x.shape[2] * x.shape[3] >= p and min(weight.shape[:2]) >= c
                    for p, c in WINOGRAD_WINS)
            and not im2col_applies(x, weight, stride, padding)  # the 16² level's 1280 channels
            and not winograd4_applies(x, weight, stride, padding))


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3×3, stride 1, padding 1 convolution by Winograd F(2×2, 3×3); returns a channels-last tensor.
    Bands of tile rows keep the transformed tiles under WINOGRAD_BAND values. Each of the 16 GEMMs
    is (tiles, C) @ (C, O): an image's rows do not depend on its batch or its band."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    th, tw = (h + 1) // 2, (w + 1) // 2
    u = _filter_taps(WINOGRAD_GG, weight)
    # 4×4 tiles with stride 2 over the padded NHWC input (odd sizes get one more row or column)
    xp = F.pad(x, (1, 1 + w % 2, 1, 1 + h % 2)).permute(0, 2, 3, 1).contiguous()
    y = x.new_empty(b, th, 2, tw, 2, o)
    band = _band_rows(th, WINOGRAD_BAND // (16 * b * tw * max(c, o)))
    for r0 in range(0, th, band):
        n = min(band, th - r0)
        _winograd_band(xp[:, 2 * r0:2 * (r0 + n) + 2], u, bias, y[:, r0:r0 + n])
    return y.view(b, 2 * th, 2 * tw, o)[:, :h, :w].permute(0, 3, 1, 2)


def _band_rows(rows: int, most: int) -> int:
    """Tile rows per band: as few bands as at most `most` rows each allows, of equal size but the
    last, so that no GEMM is left with a few rows' tiles."""
    return -(-rows // -(-rows // max(1, most)))


def _winograd_band(xp: torch.Tensor, u: list[torch.Tensor], bias: torch.Tensor | None,
                   y: torch.Tensor):
    """Output tiles y (B, th, 2, tw, 2, O) of a band of padded NHWC rows (B, 2·th + 2, W + 2, C)."""
    d = xp.unfold(1, 4, 2).unfold(2, 4, 2)                          # (B, th, tw, C, 4, 4)
    b, th, tw, c = d.shape[:4]
    # Bᵀ d B, BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    rows = (d[..., 0, :] - d[..., 2, :], d[..., 1, :] + d[..., 2, :],
            d[..., 2, :] - d[..., 1, :], d[..., 1, :] - d[..., 3, :])
    v = xp.new_empty(4, 4, b, th, tw, c)
    for i, r in enumerate(rows):
        torch.sub(r[..., 0], r[..., 2], out=v[i, 0])
        torch.add(r[..., 1], r[..., 2], out=v[i, 1])
        torch.sub(r[..., 2], r[..., 1], out=v[i, 2])
        torch.sub(r[..., 1], r[..., 3], out=v[i, 3])
    del rows
    v = v.view(16, -1, c)
    # AT's rows sum to one at (1, 1) for every output pixel: the bias goes in that GEMM
    m = [_gemm(v[k], u[k], bias if k == 5 else None, min_weight=0).view(b, th, tw, -1)
         for k in range(16)]
    del v
    # Aᵀ m A, AT = [[1, 1, 1, 0], [0, 1, -1, -1]]
    top = [m[j] + m[4 + j] + m[8 + j] for j in range(4)]
    bottom = [m[4 + j] - m[8 + j] - m[12 + j] for j in range(4)]
    del m
    for p, s in enumerate((top, bottom)):
        torch.add(s[0] + s[1], s[2], out=y[:, :, p, :, 0])
        torch.sub(s[1] - s[2], s[3], out=y[:, :, p, :, 1])


# Winograd F(4×4, 3×3): each 4×4 output tile from a 6×6 input tile with 36 GEMMs in place of 144
# multiply-adds per channel pair. Input, filter and output transforms (interpolation points 0, ±1,
# ±2, ∞) as Kronecker products acting on a row-major flattened tile: vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d).
_BT4 = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G4 = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT4 = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
WINOGRAD4_BB, WINOGRAD4_GG, WINOGRAD4_AA = (torch.kron(m, m).float() for m in (_BT4, _G4, _AT4))
# (output pixels per image, input and output channels) at least, where it beat F(2×2, 3×3) and
# oneDNN on 2 cores (bench/results/conv_cpu.json); below, its 4× larger filter transform costs more
# than it saves.
WINOGRAD4_MIN = (4096, 256)
# Transformed values per image in a band. Under 32 MiB a block comes from the heap, which keeps it
# (engine.kernels.cpu.retain_freed_memory): 2**22 left a tiled 2048² SD-VAE decode (one image at a
# time) 3.1 GiB at its peak; 2**21 is as fast there.
WINOGRAD4_BAND = 2**21


def winograd4_applies(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape[2:] == (3, 3) and stride == 1 and padding == 1
            and x.shape[2] * x.shape[3] >= WINOGRAD4_MIN[0] and min(weight.shape[:2]) >= WINOGRAD4_MIN[1])


def winograd4_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3×3, stride 1, padding 1 convolution by Winograd F(4×4, 3×3); returns a channels-last tensor.
    The batch goes in bands of tile rows, each image's under WINOGRAD4_BAND transformed values. An
    image's tiles are computed the same way whatever else shares a GEMM (oneDNN's, in _gemm), so
    whatever else shares its batch."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    th, tw = (h + 3) // 4, (w + 3) // 4
    bb, aa = WINOGRAD4_BB.to(x), WINOGRAD4_AA.to(x)
    u = _filter_taps(WINOGRAD4_GG, weight)
    xp = F.pad(x, (1, 1 + 4 * tw - w, 1, 1 + 4 * th - h)).permute(0, 2, 3, 1)
    tiles = xp.unfold(1, 6, 4).unfold(2, 6, 4).permute(0, 1, 2, 4, 5, 3)  # (B, th, tw, 6, 6, C)
    y = x.new_empty(b, th, 4, tw, 4, o)
    band = _band_rows(th, WINOGRAD4_BAND // (36 * tw * max(c, o)))
    for r0 in range(0, th, band):
        n = min(band, th - r0)
        v = bb @ tiles[:, r0:r0 + n].reshape(b * n * tw, 36, c)        # (tiles, 36, C)
        m = torch.stack([_gemm(v[:, k], u[k], min_weight=0) for k in range(36)])  # (36, tiles, O)
        yb = (aa @ m.view(36, -1)).view(4, 4, b, n, tw, o)
        y[:, r0:r0 + n].copy_(yb.permute(2, 3, 0, 4, 1, 5))
    if bias is not None:
        y += bias
    return y.view(b, 4 * th, 4 * tw, o)[:, :h, :w].permute(0, 3, 1, 2)


def pointwise_applies(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    return (x.device.type == "cpu" and weight.shape[2:] == (1, 1) and stride == 1 and padding == 0
            and x.dtype == weight.dtype)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """1×1 convolution [+ residual] as (B·H·W, C) @ (C, O); returns a channels-last tensor.
    oneDNN's own 1×1 convolution computes an image differently with another batch size (at 16
    images on one thread, at 1 on two); the matmul's rows do not depend on how many there are."""
    b, c, h, w = x.shape
    return _rows_conv(x.permute(0, 2, 3, 1).reshape(-1, c), weight.reshape(weight.shape[0], c),
                      bias, (b, h, w), residual)


def epilogue(y: torch.Tensor, residual: torch.Tensor | None, act: str | None) -> torch.Tensor:
    """What the Triton kernel fuses, as torch ops: + residual, then SiLU."""
    if residual is not None:
        y = y + residual
    return F.silu(y) if act == "silu" else y


# ------------------------------------------------------------------------------------------- Triton

def triton_supported(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    return (x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.dtype == weight.dtype
            and x.dim() == 4 and weight.shape[1] == x.shape[1]
            and weight.shape[2] == weight.shape[3]
            and (weight.shape[2], padding) in ((3, 1), (3, 0), (1, 0)) and stride in (1, 2))


if HAS_TRITON:
    @triton.jit
    def _conv(X, W, BIAS, RES, Y, C, H, WI, O, HO, WO, M, sxb, sxc, sxh, sxw, swo, swc, swh, sww,
              srb, src, srh, srw, stride, pad, KS: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_RES: tl.constexpr, SILU: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        ow, oh, b = rm % WO, (rm // WO) % HO, rm // (HO * WO)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kh in tl.static_range(KS):
            ih = oh * stride - pad + kh
            for kw in tl.static_range(KS):
                iw = ow * stride - pad + kw
                inside = (rm < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WI)
                x_row = b * sxb + ih * sxh + iw * sxw
                for c0 in range(0, C, BLOCK_K):
                    c = c0 + rk
                    a = tl.load(X + x_row[:, None] + c[None, :] * sxc,
                                mask=inside[:, None] & (c[None, :] < C), other=0.0)
                    w = tl.load(W + rn[None, :] * swo + c[:, None] * swc + kh * swh + kw * sww,
                                mask=(c[:, None] < C) & (rn[None, :] < O), other=0.0)
                    acc += _dot(a, w, PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < O, other=0.0).to(tl.float32)[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < O)
        if HAS_RES:
            r_row = b * srb + oh * srh + ow * srw
            acc += tl.load(RES + r_row[:, None] + rn[None, :] * src, mask=mask,
                           other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(Y + rm[:, None] * O + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def triton_conv2d(x, weight, bias=None, stride: int = 1, padding: int = 0, residual=None,
                  act=None) -> torch.Tensor:
    """Implicit-GEMM convolution with the epilogue fused; returns a channels-last tensor."""
    bsz, c, h, w = x.shape
    o, ks = weight.shape[0], weight.shape[2]
    ho, wo = (h + 2 * padding - ks) // stride + 1, (w + 2 * padding - ks) // stride + 1
    y = torch.empty(bsz, o, ho, wo, device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    m = bsz * ho * wo
    bm, bn, bk = (128 if m >= 4096 else 64), (128 if o >= 128 else 64), (32 if c >= 32 else 16)
    res = residual if residual is not None else y
    _conv[(triton.cdiv(m, bm), triton.cdiv(o, bn))](
        x, weight, bias if bias is not None else y, res, y, c, h, w, o, ho, wo, m, *x.stride(),
        *weight.stride(), *res.stride(), stride, padding, KS=ks, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, SILU=act == "silu", PREC=precision(x.dtype), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3)
    return y


# ------------------------------------------------------------------------ measured per-shape choice

def cache_root() -> Path:
    """Where measured choices and compiled graphs are kept: ENGINE_CACHE_DIR, or ~/.cache/engine."""
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "engine"))


def cache_path(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return cache_root() / f"conv-choice-{''.join(ch if ch.isalnum() else '-' for ch in name)}.json"


_CHOICES: dict[Path, dict] = {}


def forget_choices():
    """Drop the choices this process has read or measured; the files stay (as in a new process)."""
    _CHOICES.clear()


def measured_choice(key: str, candidates: dict[str, Callable[[], object]], path: Path,
                    sync: Callable[[], None] = lambda: None, repeats: int = 5) -> str:
    """The fastest candidate for `key` (median of `repeats` after a warm-up), timed once and kept in
    `path`."""
    table = _CHOICES.setdefault(path, json.loads(path.read_text()) if path.exists() else {})
    if key not in table:
        times = {}
        for name, fn in candidates.items():
            fn()
            sync()
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
        table[key] = min(times, key=times.get)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    return table[key]


@torch.library.custom_op("engine::conv2d", mutates_args=())
def conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
              padding: int, residual: torch.Tensor | None, silu: bool, force: bool
              ) -> torch.Tensor:
    """The Triton convolution, or cuDNN where it measured faster for this shape (unless `force`);
    channels-last."""
    act = "silu" if silu else None
    if force or choose(x, weight, bias, stride, padding, residual, act) == "triton":
        return triton_conv2d(x, weight, bias, stride, padding, residual, act)
    y = epilogue(F.conv2d(x, weight, bias, stride, padding), residual, act)
    return y.contiguous(memory_format=torch.channels_last)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, residual, silu, force):
    ks = weight.shape[2]
    size = [(n + 2 * padding - ks) // stride + 1 for n in x.shape[2:]]
    return (x.new_empty(x.shape[0], weight.shape[0], *size)
            .contiguous(memory_format=torch.channels_last))


def choose(x, weight, bias, stride, padding, residual, act) -> str:
    """'triton' or 'torch' (cuDNN) for this shape on this GPU, measured on first sight."""
    key = (f"{x.dtype}|b{x.shape[0]}|c{x.shape[1]}|{x.shape[2]}x{x.shape[3]}|o{weight.shape[0]}"
           f"|k{weight.shape[2]}|s{stride}|p{padding}|cl{int(x.stride(1) == 1)}"
           f"|r{int(residual is not None)}|{act}")
    return measured_choice(key, {
        "triton": lambda: triton_conv2d(x, weight, bias, stride, padding, residual, act),
        "torch": lambda: epilogue(F.conv2d(x, weight, bias, stride, padding), residual, act),
    }, cache_path(x.device), torch.cuda.synchronize)
