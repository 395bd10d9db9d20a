"""Each Triton kernel and its torch reference on the SD1.5 shape classes (batch 2, 512 px): median time and
achieved TFLOP/s (GB/s for GroupNorm, which is memory-bound). Writes bench/results/kernels_<device>.json.

    python bench/bench_kernels.py [--repeats 10] [--dtype float16]

The Triton kernels run only on CUDA; on a machine without it (TRITON_INTERPRET is for correctness, not speed)
the script times the torch references alone and says so in the JSON.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import kernels  # noqa: E402

ATTENTION = [  # (batch, heads, query length, key length, head dim): SD1.5 UNet levels, and the VAE's mid block
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (1, 1, 4096, 4096, 512)]
GROUPNORM = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (1, 512, 64, 64),
             (1, 128, 512, 512)]  # (batch, channels, H = W); 32 groups, SiLU fused
CONV = [(320, 320, 64, 1), (640, 640, 32, 1), (1280, 1280, 16, 1), (2560, 1280, 16, 1), (1280, 1280, 8, 1),
        (320, 320, 64, 2), (640, 640, 32, 2)]  # (C_in, C_out, H = W, stride), 3×3, batch 2, NHWC


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def row(name, shape, work, unit, ours, ref):
    per = {"tflops": 1e12, "gbps": 1e9}[unit]
    rate = lambda s: None if s is None else round(work / s / per, 2)  # noqa: E731
    r = {"kernel": name, "shape": shape, "torch_s": ref, f"torch_{unit}": rate(ref), "triton_s": ours,
         f"triton_{unit}": rate(ours), "ratio_torch_over_triton": None if ours is None else round(ref / ours, 3)}
    print(json.dumps(r))
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    run_triton = cuda and kernels.HAS_TRITON
    t = lambda fn: timed(fn, args.repeats, cuda)  # noqa: E731
    rows = []
    with torch.no_grad():
        for b, h, nq, nk, d in ATTENTION:
            q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
            k, v = (torch.randn(b, h, nk, d, device=device, dtype=dtype) for _ in range(2))
            ours = t(lambda: kernels.flash.attention_op(q, k, v, d ** -0.5, False)) if run_triton else None
            rows.append(row("attention", [b, h, nq, nk, d], 4 * b * h * nq * nk * d, "tflops", ours,
                            t(lambda: F.scaled_dot_product_attention(q, k, v))))
        for b, c, s, s in GROUPNORM:
            x = torch.randn(b, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w, bias = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
            ours = t(lambda: kernels.gn.group_norm_op(x, w, bias, 32, 1e-5, True)) if run_triton else None
            rows.append(row("group_norm_silu", [b, c, s, s], 2 * x.numel() * x.element_size(), "gbps", ours,
                            t(lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-5)))))
        for cin, cout, s, stride in CONV:
            x = torch.randn(2, cin, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.randn(cout, device=device, dtype=dtype)
            m = 2 * ((s - 1) // stride + 1) ** 2
            ours = t(lambda: kernels.conv.triton_conv2d(x, w, bias, stride, 1)) if run_triton else None
            rows.append(row("conv3x3", [2, cin, s, s, cout, stride], 2 * m * cout * 9 * cin, "tflops", ours,
                            t(lambda: F.conv2d(x, w, bias, stride, 1))))
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    out = ROOT / "bench" / "results" / f"kernels_{'cuda' if cuda else 'cpu'}.json"
    out.write_text(json.dumps({
        "device": name, "dtype": str(dtype), "repeats": args.repeats, "torch": torch.__version__,
        "triton": "timed" if run_triton else "not run: the Triton kernels need a CUDA device; torch references only",
        "units": "tflops = 1e12 FLOP/s (attention 4·B·H·Nq·Nk·D, conv 2·M·N·K); gbps = GB/s (read + write once)",
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
