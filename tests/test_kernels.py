"""The dispatch point, the CPU im2col and Winograd convolutions and the linear layer against torch's
reference ops."""
import gc
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.kernels import conv, cpu
from engine.kernels.conv import (im2col_applies, im2col_conv3x3, winograd4_applies, winograd4_conv3x3,
                                 winograd_applies, winograd_conv3x3)


@pytest.mark.parametrize("cin,cout,h,w,stride", [
    (1280, 1280, 8, 8, 1), (2560, 1280, 8, 8, 1), (640, 1280, 16, 16, 2),  # SD1.5 UNet classes, batch 1
    (7, 5, 9, 13, 1), (7, 5, 9, 13, 2), (3, 4, 1, 1, 1)])                  # odd sizes
def test_im2col_matches_conv2d(cin, cout, h, w, stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    b = torch.randn(cout, generator=g)
    want = F.conv2d(x, wt, b, stride, 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = im2col_conv3x3(x.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt), b, stride)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (im2col_conv3x3(x, wt, None, stride) - F.conv2d(x, wt, None, stride, 1)).abs().max().item() <= 1e-4


def test_dispatch_rule_and_kill_switch(monkeypatch):
    def w(o, i, k=3):
        return torch.empty(o, i, k, k, device="meta")
    assert im2col_applies(torch.empty(2, 1280, 16, 16), w(1280, 1280), 1, 1)  # SD's 16² level
    assert im2col_applies(torch.empty(2, 640, 16, 16), w(640, 640), 2, 1)
    assert not im2col_applies(torch.empty(2, 640, 32, 32), w(640, 640), 1, 1)  # too many pixels
    assert not im2col_applies(torch.empty(2, 128, 4, 4), w(128, 128), 1, 1)  # too few channels: the tiny UNet
    assert not im2col_applies(torch.empty(2, 1280, 16, 16), w(1280, 1280, 1), 1, 0)
    small, wt, b = torch.randn(2, 8, 16, 16), torch.randn(8, 8, 3, 3), torch.randn(8)
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    assert torch.equal(kernels.conv2d(small, wt, b, 1, 1), F.conv2d(small, wt, b, 1, 1))
    monkeypatch.setenv("ENGINE_KERNELS", "fast")
    with pytest.raises(ValueError, match="ENGINE_KERNELS"):
        kernels.conv2d(small, wt, b, 1, 1)


def conv_case(cin, cout, h, w):
    """Three images, a 3×3 filter and bias, and their convolution in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    b = torch.randn(cout, generator=g)
    return x, wt, b, F.conv2d(x.double(), wt.double(), b.double(), 1, 1)


@pytest.mark.parametrize("cin,cout,h,w", [(320, 256, 32, 32), (7, 5, 9, 13), (16, 24, 2, 3), (3, 4, 1, 1)])
def test_winograd_matches_conv2d_and_not_the_batch(cin, cout, h, w, monkeypatch):
    x, wt, b, want = conv_case(cin, cout, h, w)
    direct = (F.conv2d(x, wt, b, 1, 1) - want).abs().max().item()
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = winograd_conv3x3(x.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt), b)
        assert got.shape == want.shape
        # F(2×2, 3×3)'s transforms add a few roundings: within 4× the direct convolution's error
        assert (got - want).abs().max().item() <= 4 * max(direct, 1e-7 * want.abs().max().item())
    if h * w > 4:  # an image of one tile is one GEMM row, which oneDNN computes another way alone
        assert torch.equal(winograd_conv3x3(x[1:2], wt, b), got[1:2])
        with monkeypatch.context() as m:  # one band per row of tiles
            m.setattr(conv, "WINOGRAD_BAND", 1)
            assert torch.equal(winograd_conv3x3(x, wt, b), got)
    assert (winograd_conv3x3(x, wt, None) - F.conv2d(x, wt, None, 1, 1)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cin,cout,h,w", [(256, 260, 64, 64), (7, 5, 9, 13), (16, 24, 2, 3), (3, 4, 1, 1)])
def test_winograd4_matches_conv2d_and_not_the_batch(cin, cout, h, w, monkeypatch):
    x, wt, b, want = conv_case(cin, cout, h, w)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = winograd4_conv3x3(x.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt), b)
        assert got.shape == want.shape
        # F(4×4, 3×3)'s transforms have entries up to 8 (and 1/24): about 1e-5 relative in fp32
        assert (got - want).abs().max().item() <= 3e-5 * want.abs().max().item()
    tiles = h * w > 16  # an image of one tile is one GEMM row, which oneDNN computes another way alone
    assert not tiles or torch.equal(winograd4_conv3x3(x[1:2], wt, b), got[1:2])
    with monkeypatch.context() as m:  # one band per row of tiles: other GEMM shapes, same image
        m.setattr(conv, "WINOGRAD4_BAND", 1)
        assert (winograd4_conv3x3(x, wt, b) - want).abs().max().item() <= 3e-5 * want.abs().max().item()
        assert not tiles or torch.equal(winograd4_conv3x3(x[2:], wt, b), winograd4_conv3x3(x, wt, b)[2:])


def test_winograd_rule():
    def w(o, i, k=3):
        return torch.empty(o, i, k, k, device="meta")
    for c, s in ((640, 32), (640, 16), (320, 32)):  # SD UNet levels
        assert winograd_applies(torch.empty(1, c, s, s), w(c, c), 1, 1), (c, s)
        assert not winograd4_applies(torch.empty(1, c, s, s), w(c, c), 1, 1), (c, s)
    for c, s in ((320, 64), (512, 128), (256, 256), (512, 64)):  # SD UNet and VAE levels
        assert winograd4_applies(torch.empty(1, c, s, s), w(c, c), 1, 1), (c, s)
        assert not winograd_applies(torch.empty(1, c, s, s), w(c, c), 1, 1), (c, s)
    assert winograd4_applies(torch.empty(2, 640, 64, 64), w(320, 640), 1, 1)
    assert not winograd4_applies(torch.empty(1, 128, 512, 512), w(128, 128), 1, 1)  # too few channels
    assert not winograd4_applies(torch.empty(1, 320, 64, 64), w(4, 320), 1, 1)
    assert not winograd4_applies(torch.empty(1, 320, 64, 64), w(320, 320), 2, 1)
    assert not winograd4_applies(torch.empty(1, 320, 64, 64, dtype=torch.bfloat16), w(320, 320).bfloat16(), 1, 1)
    assert not winograd_applies(torch.empty(2, 1280, 8, 8), w(1280, 1280), 1, 1)  # too few pixels
    assert not winograd_applies(torch.empty(2, 1280, 16, 16), w(1280, 1280), 1, 1)  # im2col's
    assert not winograd_applies(torch.empty(2, 320, 16, 16), w(320, 320), 1, 1)
    assert not winograd_applies(torch.empty(1, 128, 256, 256), w(128, 128), 1, 1)  # too few channels
    assert not winograd_applies(torch.empty(1, 320, 64, 64), w(320, 320), 2, 1)
    assert not winograd_applies(torch.empty(1, 320, 64, 64), w(320, 320, 1), 1, 0)
    assert not winograd_applies(torch.empty(1, 320, 64, 64, dtype=torch.bfloat16),
                                w(320, 320).bfloat16(), 1, 1)


def test_retain_freed_memory_stops_page_faults():
    """A chain of ops on 20 MB tensors faults their pages in again on every pass, unless the
    allocator keeps freed blocks (kernels.cpu.retain_freed_memory); ENGINE_MALLOC=system opts out."""
    code = (
        "import resource, torch\n"
        "from engine.kernels import cpu\n"
        "kept = cpu.retain_freed_memory()\n"
        "x = torch.ones(5_000_000)\n"
        "def chain():\n"
        "    y = x\n"
        "    for _ in range(6):\n"
        "        y = torch.cat([y[:2_500_000] * 2, y[2_500_000:] + 1])\n"
        "chain()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    chain()\n"
        "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    for env in ("", "system"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "ENGINE_MALLOC": env}).stdout.split()
        faults[env] = (out[0], int(out[1]))
    if faults[""][0] != "True":
        pytest.skip("not glibc: the allocator is left as it is")
    assert faults["system"][0] == "False"
    assert faults[""][1] * 5 < faults["system"][1], faults  # about 5k against 130k


def test_attention_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 77, 40, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 40**0.5, -1) @ v
    assert (kernels.attention(q, k, v) - ref).abs().max().item() <= 1e-5
    mask = torch.ones(77, 77, dtype=torch.bool).tril()
    ref = torch.softmax((q @ k.transpose(-1, -2) / 40**0.5).masked_fill(~mask, float("-inf")), -1) @ v
    assert (kernels.attention(q, k, v, is_causal=True) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n,m,d", [(300, 260, 40), (200, 77, 64), (1, 33, 8)])
def test_cpu_attention_matches_reference_and_not_the_batch(n, m, d, monkeypatch):
    g = torch.Generator().manual_seed(0)
    # (B, seq, heads·d) projections seen as (B, heads, seq, d), as the models pass them
    q = torch.randn(3, n, 2 * d, generator=g).unflatten(-1, (2, d)).transpose(1, 2)
    k, v = (torch.randn(3, m, 2 * d, generator=g).unflatten(-1, (2, d)).transpose(1, 2) for _ in range(2))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.3, -1) @ v.double()
    got = cpu.attention(q, k, v, 0.3)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5
    assert torch.equal(cpu.attention(q[1:2], k[1:2], v[1:2], 0.3), got[1:2])
    monkeypatch.setattr(cpu, "ATTENTION_BLOCK", m * 7)  # blocks of 7 query rows (row sums split otherwise)
    assert (cpu.attention(q, k, v, 0.3) - got).abs().max().item() <= 1e-6
    # bf16 scores and weights: about 3e-2 of the largest output
    low = cpu.attention(*(t.bfloat16() for t in (q, k, v)), 0.3)
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max().item() <= 5e-2 * ref.abs().max().item()


def test_cpu_attention_shifts_scores_out_of_range():
    # 2^s overflows for scores past 128 and vanishes below -126 unless shifted by the row maximum
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 40, generator=g) for _ in range(3))
    near = k[:, :, :1] + 0.1 * k
    for q, k, scale in ((q, k, 8.0), (-near[:, :, :8], near, 4.0)):  # scores up to 120, under -110
        s = q.double() @ k.double().transpose(-1, -2) * scale
        assert s.amax().item() > 128 / math.log2(math.e) or s.amax().item() < -126 / math.log2(math.e)
        ref = torch.softmax(s, -1) @ v.double()
        # scores near 120 carry about 1e-5 of fp32 rounding
        assert (cpu.attention(q, k, v, scale) - ref).abs().max().item() <= 1e-4, scale
        # in bf16 such scores are rounded to whole numbers: only a mean of v's rows is asked for
        low = cpu.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale).float()
        assert (low >= v.amin(2, keepdim=True) - 0.05).all() and (low <= v.amax(2, keepdim=True) + 0.05).all()
    # an image's own scores decide: one in range comes out the same beside one that needs the shift
    q, k, v = (torch.randn(1, 2, 64, 40, generator=g) for _ in range(3))
    s = q.double() @ k.double().transpose(-1, -2) * 2.2  # up to about 50: 2^s up to 2^72, unshifted
    assert 40 < s.amax().item() < 60
    ref = torch.softmax(s, -1) @ v.double()
    assert (cpu.attention(q, k, v, 2.2) - ref).abs().max().item() <= 1e-4
    pair = cpu.attention(torch.cat([20 * q, q]), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 1.0)
    assert torch.equal(pair[1:], cpu.attention(q, k, v, 1.0))
    ref = torch.softmax(20 * q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    assert (pair[:1] - ref).abs().max().item() <= 1e-4


def test_feed_forward_blocks_of_tokens(monkeypatch):
    from engine.models import blocks
    ff = blocks.FeedForward(64)
    x, res = torch.randn(2, 50, 64), torch.randn(2, 50, 64)
    with torch.no_grad():
        want = ff.net[2](ff.net[0](x), res)
        monkeypatch.setattr(blocks, "FF_BLOCK", 2 * 256 * 7)  # blocks of 7 tokens
        got = ff(x, res)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-6


def test_cpu_attention_rule(monkeypatch):
    q, k, v = (torch.randn(1, 2, 1024, 40) for _ in range(3))
    monkeypatch.setattr(cpu, "_AMD", False)
    assert not cpu.attention_applies(q, k, v)
    monkeypatch.setattr(cpu, "_AMD", True)
    assert cpu.attention_applies(q, k, v) and cpu.attention_applies(*(t.bfloat16() for t in (q, k, v)))
    assert not cpu.attention_applies(*(t.half() for t in (q, k, v)))
    assert not cpu.attention_applies(q[:, :, :16], k, v)  # too little work: torch's
    big = torch.empty(1, 1, 2**16, 512)  # a tiled VAE decode's 128 MiB of keys: torch's
    assert not cpu.attention_applies(q[:, :1, :, :1].expand(1, 1, 1024, 512), big, big)
    assert kernels.attention(q, k, v).equal(cpu.attention(q, k, v))
    assert not kernels.attention(q, k, v, is_causal=True).equal(cpu.attention(q, k, v))
    with torch.enable_grad():
        assert not cpu.attention_applies(q.requires_grad_(), k, v)


@pytest.mark.parametrize("keys", [77, 256, 512])
def test_bf16_attention_under_autograd_matches_reference(keys):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 96, 16, generator=g)
    k, v = (torch.randn(2, 2, keys, 16, generator=g) for _ in range(2))
    dout = torch.randn(2, 2, 96, 16, generator=g)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.softmax(ref[0] @ ref[1].transpose(-1, -2) * 0.3, -1) @ ref[2]
    want.backward(dout.double())
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    assert cpu.short_attention_applies(*low) == (keys <= cpu.SHORT_ATTENTION_KEYS)
    got = kernels.attention(*low, scale=0.3)
    got.backward(dout.bfloat16())
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max().item() <= 3e-2
    for a, b in zip(low, ref):  # bf16 rounding of scores, weights and gradients: about 1e-2 of the largest
        assert (a.grad.double() - b.grad).abs().max().item() <= 3e-2 * b.grad.abs().max().item()
    with torch.no_grad():
        assert not cpu.short_attention_applies(*low)
    assert not cpu.short_attention_applies(*(t.float().requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias,residual,act,mul", [(True, False, None, False), (False, False, None, False),
                                                 (True, True, None, False), (False, True, None, False),
                                                 (True, False, "gelu", False), (True, False, None, True)])
def test_linear_matches_reference(bias, residual, act, mul, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 256, generator=g)
    w = torch.randn(400, 256, generator=g) / 256**0.5  # fp32 too goes to oneDNN from 100k entries
    b = torch.randn(400, generator=g) if bias else None
    r = torch.randn(2, 300, 400, generator=g) if residual else None
    m = torch.randn(2, 300, 400, generator=g) if mul else None
    x, w, b, r, m = (t if t is None else t.to(dtype) for t in (x, w, b, r, m))
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    want = want if r is None else want + r.double()
    want = want if m is None else want * m.double()
    want = F.gelu(want) if act else want
    got = kernels.linear(x, w, b, r, act, m)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert ((kernels.linear(x.transpose(0, 1), w, b) - F.linear(x.transpose(0, 1), w, b)).abs().max()
            <= tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("cin,cout,h,w,stride,padding", [
    (64, 96, 16, 16, 1, 1), (64, 96, 16, 16, 2, 1), (32, 48, 9, 13, 1, 0), (24, 16, 7, 5, 2, 1)])
def test_bf16_conv_matches_reference(cin, cout, h, w, stride, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, h, w, generator=g)
    wt = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    b = torch.randn(cout, generator=g)
    want = F.conv2d(x.double(), wt.double(), b.double(), stride, padding)
    r = torch.randn(want.shape, generator=g)
    x, wt, b, r = (t.bfloat16() for t in (x, wt, b, r))
    assert cpu.conv2d_applies(x, wt, b, r)
    tol = 2e-2 * max(1.0, want.abs().max().item())
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, wf = x.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt)
        for bias, res in ((b, None), (None, None), (b, r)):
            got = kernels.conv2d(xf, wf, bias, stride, padding, res)
            ref = want - (0 if bias is not None else b.double()[:, None, None]) + (0 if res is None else r.double())
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert (got.double() - ref).abs().max().item() <= tol, (fmt, bias is None, res is None)


def test_bf16_conv_sees_weight_changes():
    """The weight is reordered once and kept; an in-place change (a LoRA merged into the model)
    and a new weight must be seen."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 8, 8, generator=g).bfloat16()
    wt = (torch.randn(16, 32, 3, 3, generator=g) / 17).bfloat16()
    first = kernels.conv2d(x, wt, None, 1, 1)
    assert torch.equal(kernels.conv2d(x, wt, None, 1, 1), first)
    wt.mul_(-1)
    assert torch.equal(kernels.conv2d(x, wt, None, 1, 1), -first)
    del wt
    for _ in range(3):  # new weights, some likely at the freed one's address
        other = (torch.randn(16, 32, 3, 3, generator=g) / 17).bfloat16()
        assert torch.equal(kernels.conv2d(x, other, None, 1, 1), F.conv2d(x, other, None, 1, 1))
    with torch.inference_mode():  # an inference tensor's changes leave no trace: not kept
        frozen = other.clone()
    assert not cpu.conv2d_applies(x, frozen, None)


def test_bf16_linear_sees_weight_changes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 32, generator=g).bfloat16()
    w = (torch.randn(2 * 24, 32, generator=g) / 6).bfloat16()
    halves = [kernels.linear(x, w[:24]), kernels.linear(x, w[24:])]  # views, as GEGLU takes them
    for h, rows in zip(halves, (slice(0, 24), slice(24, 48))):
        assert torch.allclose(h.float(), F.linear(x, w[rows]).float(), rtol=0, atol=1e-2)
    w[24:].mul_(-1)  # in place, through a view of the same weight
    assert torch.equal(kernels.linear(x, w[:24]), halves[0])
    assert torch.equal(kernels.linear(x, w[24:]), -halves[1])
    gone = weakref.ref(w)
    del w
    gc.collect()
    assert gone() is None  # the kept copies do not keep the weight alive


def test_pending_bytes_counts_weights_until_first_used():
    lin = torch.nn.Linear(32, 24).bfloat16().requires_grad_(False)
    assert cpu.pending_bytes(lin) == 24 * 32 * 2  # the bias is not reordered
    assert cpu.pending_bytes(lin.float()) == 0
    lin.bfloat16()
    kernels.linear(torch.randn(5, 32).bfloat16(), lin.weight, lin.bias)
    assert cpu.pending_bytes(lin, None) == 0


def test_pointwise_conv_fuses_the_residual():
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(2, 24, 5, 7, generator=g), torch.randn(16, 24, 1, 1, generator=g)
    b, r = torch.randn(16, generator=g), torch.randn(2, 16, 5, 7, generator=g)
    assert torch.allclose(kernels.conv2d(x, wt, b, 1, 0, r), F.conv2d(x, wt, b) + r, rtol=0, atol=1e-5)
    assert torch.allclose(kernels.conv2d(x.bfloat16(), wt.bfloat16(), b.bfloat16(), 1, 0, r.bfloat16()).float(),
                          F.conv2d(x, wt, b) + r, rtol=0, atol=0.1)


def test_flop_counter_counts_bf16_conv():
    from torch.utils.flop_counter import FlopCounterMode

    x, wt = torch.randn(2, 32, 8, 8).bfloat16(), torch.randn(16, 32, 3, 3).bfloat16()
    for kw in ({}, {"residual": torch.randn(2, 16, 8, 8).bfloat16()}):
        with FlopCounterMode(display=False) as fc:
            kernels.conv2d(x, wt, None, 1, 1, **kw)
        assert fc.get_total_flops() == 2 * (2 * 16 * 8 * 8) * 32 * 9, kw


def test_linear_differentiates():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    kernels.linear(x, w, None, torch.ones(4, 3)).sum().backward()
    assert torch.allclose(x.grad, w.detach().sum(0).expand(4, 8))
    assert torch.allclose(w.grad, x.detach().sum(0).expand(3, 8))
    b, r = torch.zeros(3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)  # only these trained
    kernels.linear(x.detach(), w.detach(), b, r).sum().backward()
    assert torch.equal(b.grad, torch.full((3,), 4.0)) and torch.equal(r.grad, torch.ones(4, 3))


def test_flop_counter_counts_linear():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, r = torch.randn(2, 30, 256), torch.randn(400, 256), torch.randn(2, 30, 400)
    assert cpu.linear_applies(x, w)
    for kw in ({}, {"residual": r}, {"act": "gelu"}, {"mul": r}):
        with FlopCounterMode(display=False) as fc:
            kernels.linear(x, w, None, **kw)
        assert fc.get_total_flops() == 2 * 60 * 256 * 400, kw


def test_small_fp32_weights_take_aten_whatever_the_batch():
    small, big = torch.randn(128, 128), torch.randn(400, 256)
    for rows in (1, 2, 512):
        assert not cpu.linear_applies(torch.randn(rows, 128), small)
        assert cpu.linear_applies(torch.randn(rows, 256), big)
        assert cpu.linear_applies(torch.randn(rows, 128).bfloat16(), small.bfloat16())
