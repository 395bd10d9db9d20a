"""Our `generate` vs diffusers' StableDiffusionPipeline on the embedded model (weights/tiny): same weights,
same seed, DDIM 50 steps, CFG 5. Ours runs twice: through its compiled graphs (engine.graphs; compiled
first into a fresh cache, and that one-time cost reported apart) and eagerly (ENGINE_COMPILE=off).
Prints the max pixel differences and the wall-time ratios ours/diffusers (runs alternate; median of
--repeats each). Writes bench/results/tiny_vs_diffusers_cpu.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
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

    def run_ours(compile="cached"):
        os.environ["ENGINE_COMPILE"] = compile
        return (ours.generate(PROMPT, steps=args.steps, guidance=5.0, seed=0, output="pt", progress=False) / 2
                + 0.5).clamp(0, 1)

    runs = {"ours": run_ours, "ours_eager": lambda: run_ours("off"), "diffusers": run_ref}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ENGINE_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        run_ours("on")  # compiles the graphs: the one-time cost
        first = time.perf_counter() - t0
        out = {name: fn() for name, fn in runs.items()}  # also the warm-up of each
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = {k: (out[k] - out["diffusers"]).abs().max().item() for k in ("ours", "ours_eager")}
    result = {"model": "weights/tiny", "steps": args.steps, "guidance": 5.0, "device": "cpu",
              "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "max_abs_pixel_diff": diff["ours"], "max_abs_pixel_diff_eager": diff["ours_eager"],
              "compile_s": first - med["ours"], "seconds": times, "median_s": med,
              "ratio_ours_over_diffusers": med["ours"] / med["diffusers"],
              "ratio_eager_over_diffusers": med["ours_eager"] / med["diffusers"], "goal_ratio": 0.5,
              **stamp}
    path = Path(__file__).parent / "results" / "tiny_vs_diffusers_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"max |Δpixel| {diff['ours'] * 255:.3f}/255 (eager {diff['ours_eager'] * 255:.3f}/255)   "
          f"ours {med['ours']:.3f}s  eager {med['ours_eager']:.3f}s  diffusers {med['diffusers']:.3f}s  "
          f"ratio {result['ratio_ours_over_diffusers']:.3f} (goal ≤ 0.5; eager "
          f"{result['ratio_eager_over_diffusers']:.3f}); compile {result['compile_s']:.0f} s, once")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
