"""3×3 convolutions of the SD1.5 UNet (CFG batch 2, 512 px), the SD VAE and the embedded tiny UNet (batch 2, 64 px)
on the CPU: oneDNN on NCHW and on channels-last tensors, NHWC im2col + GEMM, Winograd F(2×2, 3×3) and
F(4×4, 3×3) (engine/kernels/conv.py), with what the engine's rules pick. Medians of alternating runs; writes
bench/results/conv_cpu.json.

    python bench/bench_conv_cpu.py [--repeats 7]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.profile import cpu_name  # noqa: E402
from engine.embedded import source_commit  # noqa: E402
from engine.kernels.conv import (im2col_applies, im2col_conv3x3, winograd4_applies,  # noqa: E402
                                 winograd4_conv3x3, winograd_applies, winograd_conv3x3)

# (C_in, C_out, H = W, stride) of the SD1.5 UNet's 3×3 convolutions at a 64×64 latent
SHAPES = [(320, 320, 64, 1), (640, 320, 64, 1), (960, 320, 64, 1), (640, 640, 32, 1), (1280, 640, 32, 1), (320, 320, 64, 2),
          (640, 640, 32, 2), (1280, 1280, 16, 1), (2560, 1280, 16, 1), (1280, 1280, 16, 2), (1280, 1280, 8, 1),
          (2560, 1280, 8, 1)]
# the tiny UNet's at a 16×16 latent, and channel counts in between at its sizes
# the SD VAE decoder's 512- and 256-channel levels (a 512 px image is 64² → 512²)
SHAPES += [(512, 512, 64, 1), (512, 512, 128, 1), (256, 256, 128, 1), (256, 256, 256, 1), (128, 128, 256, 1)]
SHAPES += [(32, 32, 16, 1), (32, 32, 16, 2), (64, 64, 8, 1), (64, 64, 8, 2), (128, 128, 4, 1), (256, 128, 4, 1),
           (320, 320, 16, 2), (320, 320, 8, 1), (320, 320, 4, 1), (640, 640, 16, 1), (640, 640, 8, 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for cin, cout, s, stride in SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, cin, s, s, generator=g).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5).contiguous(
                memory_format=torch.channels_last)
            b = torch.randn(cout, generator=g)
            xn, wn = x.contiguous(), w.contiguous()
            fns = {"onednn_nchw": lambda: F.conv2d(xn, wn, b, stride, 1), "onednn": lambda: F.conv2d(x, w, b, stride, 1),
                   "im2col": lambda: im2col_conv3x3(x, w, b, stride)}
            if stride == 1:
                fns["winograd"] = lambda: winograd_conv3x3(x, w, b)
                fns["winograd4"] = lambda: winograd4_conv3x3(x, w, b)
            diff = (fns["onednn"]() - fns["im2col"]()).abs().max().item()
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            out_px = 2 * ((s - 1) // stride + 1) ** 2
            gflop = 2 * out_px * cout * cin * 9 / 1e9
            rows.append({"c_in": cin, "c_out": cout, "size": s, "stride": stride, "out_pixels": out_px,
                         "gflop": gflop, "ms": med, "speedup_im2col": med["onednn"] / med["im2col"],
                         "speedup_channels_last": med["onednn_nchw"] / med["onednn"],
                         "engine_uses_im2col": im2col_applies(x, w, stride, 1), "max_abs_diff": diff})
            if stride == 1:
                rows[-1].update(speedup_winograd=med["onednn"] / med["winograd"],
                                engine_uses_winograd=winograd_applies(x, w, stride, 1),
                                max_abs_diff_winograd=(fns["onednn"]() - fns["winograd"]()).abs().max().item(),
                                speedup_winograd4=med["onednn"] / med["winograd4"],
                                engine_uses_winograd4=winograd4_applies(x, w, stride, 1),
                                max_abs_diff_winograd4=(fns["onednn"]() - fns["winograd4"]()).abs().max().item())
            print(f"{cin:>5}→{cout:<5} {s:>3}² s{stride}  NCHW {med['onednn_nchw']:7.1f} ms  NHWC {med['onednn']:7.1f} ms"
                  f"  im2col {med['im2col']:7.1f} ms"
                  f"  ×{rows[-1]['speedup_im2col']:.2f}  {'(used)' if rows[-1]['engine_uses_im2col'] else ''}"
                  + (f"  Winograd {med['winograd']:7.1f} ms ×{rows[-1]['speedup_winograd']:.2f}"
                     f"  {'(used)' if rows[-1]['engine_uses_winograd'] else ''}"
                     f"  F(4,3) {med['winograd4']:7.1f} ms ×{rows[-1]['speedup_winograd4']:.2f}"
                     f"  {'(used)' if rows[-1]['engine_uses_winograd4'] else ''}" if stride == 1 else ""))
    out = ROOT / "bench" / "results" / "conv_cpu.json"
    out.write_text(json.dumps({"device": f"{cpu_name()} x{torch.get_num_threads()} threads",
                               "commit": source_commit(), "command": "python bench/bench_conv_cpu.py "
                               + " ".join(sys.argv[1:]),
                               "torch": torch.__version__, "batch": 2, "dtype": "float32",
                               "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
