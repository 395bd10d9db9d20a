"""One CFG UNet step of the real SD1.5 architecture (random weights): ours vs diffusers, same file, same process.

    python bench/bench_unet.py [--repeats 7] [--latent 64] [--dtype float32] [--device cpu]

Both models are loaded from one safetensors file (written once under bench/cache/), run alternately, and the
median of the timed runs is reported with achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode). Writes
bench/results/unet_step_<device>_<dtype>.json and prints the top ops of our step from torch.profiler.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def weights(cache: Path) -> Path:
    folder = cache / "sd15_unet"
    if not (folder / "diffusion_pytorch_model.safetensors").exists():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        UNet2DConditionModel(**{k: v for k, v in SD15_UNET.items() if not k.startswith("_")}).save_pretrained(
            folder, safe_serialization=True)
    return folder


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "cache"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from diffusers import UNet2DConditionModel as Reference
    from engine.checkpoints import load_component
    from engine.embedded import source_commit
    from engine.profile import cpu_name

    folder = weights(Path(args.cache))
    ours = load_component(folder, "unet", dtype, device)
    ref = Reference.from_pretrained(folder, torch_dtype=dtype).to(device).eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.latent, args.latent, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    run_ours = lambda: ours(x, t, ctx)
    run_ref = lambda: ref(x, t, ctx).sample

    with torch.inference_mode():
        diff = (run_ours().float() - run_ref().float()).abs().max().item()
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:  # the model's own, with direct convolutions
            run_ref()
        gflop = fc.get_total_flops() / 1e9
        for _ in range(args.warmup):
            run_ours(), run_ref()
        times = {"ours": [], "diffusers": []}
        for i in range(args.repeats):  # alternate, and alternate who goes first
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                times[name].append(timed(run_ours if name == "ours" else run_ref, device))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                    ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            run_ours()

    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratio = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=key, row_limit=12)
    total_self = sum(getattr(e, key) for e in prof.key_averages())
    top_ops = [{"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total_self, "calls": e.count}
               for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:12]]
    result = {
        "benchmark": "SD1.5 UNet, one CFG step (batch 2), random weights from one safetensors file",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU {cpu_name()} x{torch.get_num_threads()} threads",
        "dtype": args.dtype, "latent": [args.latent, args.latent], "batch": 2, "repeats": args.repeats,
        "torch": torch.__version__, "max_abs_diff_vs_diffusers": diff, "gflop_per_step": gflop,
        "seconds": times, "median_s": med, "ratio_ours_over_diffusers": med["ours"] / med["diffusers"],
        "median_of_paired_ratios": pair_ratio,
        "gflops_achieved": {k: gflop / v for k, v in med.items()}, "top_ops_ours": top_ops,
        "commit": source_commit(), "model_version": "SD1.5 UNet architecture, random weights",
        "command": " ".join(["python bench/bench_unet.py", *sys.argv[1:]]),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"unet_step_{device.type}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(top)
    print(f"max |ours - diffusers| = {diff:.2e};  {gflop:.0f} GFLOP per step")
    for k in ("ours", "diffusers"):
        print(f"{k:>10}: median {med[k]:.3f} s  ({gflop / med[k]:.1f} GFLOP/s)  runs {[round(s, 3) for s in times[k]]}")
    print(f"ratio of medians ours/diffusers = {result['ratio_ours_over_diffusers']:.3f}; "
          f"median of paired ratios = {pair_ratio:.3f}  → {out}")


if __name__ == "__main__":
    main()
