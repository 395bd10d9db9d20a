"""The Triton kernels against the torch ops, forward and backward.

On a machine without CUDA they run under TRITON_INTERPRET=1 (set in conftest.py before `engine.kernels` is imported):
slow, but the same kernel code, so the shapes are the SD shape classes scaled down to what the interpreter can
do: head dims 40/64/80/160/512, 77-token keys, odd lengths, batch > 1. On CUDA the same tests run natively.
"""
import json
import time

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.embedded import DEFAULT_MODEL
from engine.checkpoints import load_component

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# max |ours - reference| ≤ atol + rtol·max|reference|; the reference is the torch op in fp32 on the same inputs
TOL = {
    torch.float32: (2e-5, 1e-5),   # fp32 accumulation both sides, different summation order
    torch.float16: (2e-3, 2e-3),   # fp16 inputs and output rounding (P is rounded to fp16 before P·V)
    torch.bfloat16: (2e-2, 1e-2),  # bf16 has 8 mantissa bits
}


def close(ours, ref, dtype, what=""):
    atol, rtol = TOL[dtype]
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= atol + rtol * ref.float().abs().max().item(), f"{what}: max abs error {err:.3g} ({dtype})"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------- attention

ATTENTION = [  # (batch, heads, query length, key length, head dim, causal): what SD runs, scaled down
    (1, 1, 16, 16, 16, False),      # smallest tile
    (2, 2, 96, 96, 40, False),      # SD1.5 self-attention, head dim 40
    (2, 2, 96, 77, 40, False),      # SD1.5 cross-attention: 77 text tokens
    (2, 4, 77, 77, 64, True),       # CLIP text encoder: causal, 77 tokens; SD2 UNet heads
    (2, 2, 45, 77, 80, False),      # head dim 80, odd query length
    (1, 2, 33, 77, 160, False),     # head dim 160
    (1, 1, 70, 70, 512, False),     # the VAE's single 512-wide head (forward kernel, math backward)
    (1, 2, 150, 150, 64, True),     # causal over several key blocks
]


@pytest.mark.parametrize("b,h,nq,nk,d,causal", ATTENTION)
def test_attention_forward_backward(b, h, nq, nk, d, causal):
    if DEVICE == "cuda" and d > kernels.flash.MAX_CUDA_HEAD_DIM:
        pytest.skip("on CUDA, heads this wide go to torch: the kernel's tiles exceed shared memory")
    q, k, v = (randn(b, h, n, d, seed=i).requires_grad_() for i, n in enumerate((nq, nk, nk)))
    out, _ = kernels.flash.attention_op(q, k, v, d ** -0.5, causal)
    grad = randn(*out.shape, seed=9)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    refs = torch.autograd.grad(ref, (q, k, v), grad)
    close(out, ref, torch.float32, "out")
    for name, g, r in zip(("dq", "dk", "dv"), ours, refs):
        close(g, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_precision(dtype):
    q, k, v = (randn(2, 2, 77 if i else 50, 40, dtype=dtype, seed=i).requires_grad_() for i in range(3))
    out, _ = kernels.flash.attention_op(q, k, v, 40 ** -0.5, False)
    assert out.dtype == dtype
    grad = randn(*out.shape, dtype=dtype, seed=9)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv"), ours, torch.autograd.grad(ref, (q32, k32, v32), grad.float())):
        assert g.dtype == dtype
        close(g, r, dtype, name)


def test_attention_strided_inputs_and_determinism():
    x = randn(2, 77, 3, 40)  # (batch, seq, heads, dim) viewed as (batch, heads, seq, dim): not contiguous
    q = x.transpose(1, 2).requires_grad_()
    runs = []
    for _ in range(2):
        out, _ = kernels.flash.attention_op(q, q, q, 0.3, False)
        runs.append((out, *torch.autograd.grad(out.square().sum(), q)))
    close(runs[0][0], F.scaled_dot_product_attention(q, q, q, scale=0.3), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------------------------- GroupNorm

GROUPNORM = [  # (batch, channels, groups, H, W, silu, channels_last)
    (2, 320, 32, 4, 4, True, False),    # SD1.5 UNet: 10 channels per group (not a power of two)
    (2, 320, 32, 4, 4, True, True),
    (1, 64, 16, 9, 7, False, False),    # tiny VAE, odd spatial size
    (3, 32, 8, 5, 5, False, True),
    (1, 512, 32, 8, 8, True, False),    # SD VAE decoder width
]


@pytest.mark.parametrize("n,c,g,h,w,silu,cl", GROUPNORM)
def test_group_norm_forward_backward(n, c, g, h, w, silu, cl):
    x = (randn(n, c, h, w) * 3 + 1).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    x.requires_grad_()
    wt, b = randn(c, seed=1).requires_grad_(), randn(c, seed=2).requires_grad_()
    y, _, _ = kernels.gn.group_norm_op(x, wt, b, g, 1e-5, silu)
    assert y.stride() == x.stride()
    ref = F.group_norm(x, g, wt, b, 1e-5)
    ref = F.silu(ref) if silu else ref
    grad = randn(*y.shape, seed=3)
    close(y, ref, torch.float32, "y")
    for name, a, r in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, (x, wt, b), grad),
                          torch.autograd.grad(ref, (x, wt, b), grad)):
        close(a, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_half_precision(dtype):
    x, wt, b = randn(2, 64, 6, 6, dtype=dtype), randn(64, dtype=dtype, seed=1), randn(64, dtype=dtype, seed=2)
    y, _, _ = kernels.gn.group_norm_op(x, wt, b, 16, 1e-6, True)
    close(y, F.silu(F.group_norm(x.float(), 16, wt.float(), b.float(), 1e-6)), dtype)


# ------------------------------------------------------------------------------------------------ conv

CONV = [  # (batch, C_in, C_out, H, W, kernel, stride, padding, residual, silu, channels_last)
    (2, 64, 64, 8, 8, 3, 1, 1, True, False, True),     # UNet resnet conv2 + skip, NHWC
    (2, 96, 64, 8, 8, 3, 1, 1, False, False, False),   # skip-concat input width, NCHW
    (1, 64, 64, 9, 9, 3, 2, 1, False, False, True),    # UNet downsample
    (1, 32, 32, 9, 7, 3, 2, 0, False, False, False),   # VAE downsample (input already padded), odd size
    (2, 40, 24, 5, 6, 1, 1, 0, True, True, False),     # 1×1 shortcut, fused residual and SiLU
    (2, 4, 32, 8, 8, 3, 1, 1, False, True, True),      # latent conv_in: 4 input channels
]


@pytest.mark.parametrize("b,c,o,h,w,k,s,p,res,silu,cl", CONV)
def test_conv(b, c, o, h, w, k, s, p, res, silu, cl):
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = randn(b, c, h, w).contiguous(memory_format=fmt)
    wt = (randn(o, c, k, k, seed=1) / (c * k * k) ** 0.5).contiguous(memory_format=fmt)
    bias = randn(o, seed=2)
    # in float64: on CUDA an fp32 F.conv2d runs cuDNN in TF32 by default, about 1e-3 off
    ref = F.conv2d(x.double(), wt.double(), bias.double(), s, p).float()
    r = randn(*ref.shape, seed=3) if res else None
    act = "silu" if silu else None
    ours = kernels.conv.triton_conv2d(x, wt, bias, s, p, r, act)
    assert ours.shape == ref.shape and ours.is_contiguous(memory_format=torch.channels_last)
    close(ours, kernels.conv.epilogue(ref, r, act), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_half_precision(dtype):
    x, wt, b = randn(2, 32, 6, 6, dtype=dtype), randn(48, 32, 3, 3, dtype=dtype, seed=1) / 17, randn(48, dtype=dtype)
    ours = kernels.conv.triton_conv2d(x, wt, b, 1, 1, None, "silu")
    close(ours, F.silu(F.conv2d(x.float(), wt.float(), b.float(), 1, 1)), dtype)


def test_measured_choice_is_cached_on_disk(tmp_path):
    calls = {"fast": 0, "slow": 0}

    def run(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
        return fn

    path = tmp_path / "choice.json"
    candidates = {"slow": run("slow", 0.004), "fast": run("fast", 0.0)}
    assert kernels.conv.measured_choice("shape-a", candidates, path, repeats=3) == "fast"
    assert calls == {"fast": 4, "slow": 4} and json.loads(path.read_text()) == {"shape-a": "fast"}
    kernels.conv.forget_choices()  # as a new process: the answer comes from the file, untimed
    assert kernels.conv.measured_choice("shape-a", candidates, path) == "fast"
    assert calls == {"fast": 4, "slow": 4}


# -------------------------------------------------------------------------------------------- dispatch

def test_forced_triton_without_a_device_is_a_clear_error(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA is present")
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.group_norm(torch.randn(1, 4, 2, 2), 2, torch.ones(4), torch.zeros(4), 1e-5)


def test_dispatch_traces_under_torch_compile(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "triton")

    def block(x, w, b, gw, gb, q):
        h = kernels.group_norm(x, 4, gw, gb, 1e-5, act="silu")
        return kernels.conv2d(h, w, b, 1, 1, residual=x, act="silu"), kernels.attention(q, q, q)

    args = (randn(1, 8, 6, 6), randn(8, 8, 3, 3, seed=1) / 9, randn(8, seed=2), randn(8, seed=3), randn(8, seed=4),
            randn(1, 2, 10, 40, seed=5))
    eager = block(*args)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(*args)  # fullgraph: no graph breaks
    assert all(torch.equal(a, c) for a, c in zip(eager, compiled))
    h = F.silu(F.group_norm(args[0], 4, args[3], args[4], 1e-5))
    close(eager[0], F.silu(F.conv2d(h, args[1], args[2], 1, 1) + args[0]), torch.float32)


def test_tiny_unet_through_the_kernels(monkeypatch):
    """The embedded UNet, forward and input gradient, with every op through the Triton kernels vs torch."""
    unet = load_component(DEFAULT_MODEL / "unet", "unet", device=DEVICE).eval()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # torch's fp32 convolutions in fp32
    x = randn(1, unet.config.in_channels, 8, 8).requires_grad_()
    t, ctx = torch.tensor([700], device=DEVICE), randn(1, 77, 128, seed=1)
    results = {}
    for m in ("torch", "triton"):
        monkeypatch.setenv("ENGINE_KERNELS", m)
        out = unet(x, t, ctx)
        results[m] = (out, *torch.autograd.grad(out.square().mean(), x))
        with torch.no_grad():  # no autograd: the Triton convolution runs too
            results[m] += (unet(x, t, ctx),)
    for a, b in zip(results["triton"], results["torch"]):
        close(a, b, torch.float32)
