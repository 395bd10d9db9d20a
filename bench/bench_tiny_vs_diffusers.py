"""Our `generate` vs diffusers' StableDiffusionPipeline on the embedded model (weights/tiny): same weights,
same seed, DDIM 50 steps, CFG 5. Prints the max pixel difference and the wall-time ratio ours/diffusers
(runs alternate; median of --repeats each). Writes bench/results/tiny_vs_diffusers_cpu.json.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import engine
from engine.embedded import DEFAULT_MODEL, source_commit, versions
from engine.profile import cpu_name

PROMPT = "a large red star in the center, on a plain white background"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    stamp = {"commit": source_commit(), "model_version": versions(),
             "command": " ".join(["python bench/bench_tiny_vs_diffusers.py", *sys.argv[1:]])}
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = engine.load(DEFAULT_MODEL)

    def run_ref():
        return ref(PROMPT, num_inference_steps=args.steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images

    def run_ours():
        return (ours.generate(PROMPT, steps=args.steps, guidance=5.0, seed=0, output="pt", progress=False) / 2
                + 0.5).clamp(0, 1)

    diff = (run_ours() - run_ref()).abs().max().item()  # also the warm-up of both
    times = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": "weights/tiny", "steps": args.steps, "guidance": 5.0, "device": "cpu",
              "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "max_abs_pixel_diff": diff, "seconds": times, "median_s": med,
              "ratio_ours_over_diffusers": med["ours"] / med["diffusers"], "goal_ratio": 0.5, **stamp}
    out = Path(__file__).parent / "results" / "tiny_vs_diffusers_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"max |Δpixel| {diff * 255:.3f}/255   ours {med['ours']:.3f}s  diffusers {med['diffusers']:.3f}s  "
          f"ratio {result['ratio_ours_over_diffusers']:.3f} (goal ≤ 0.5)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
