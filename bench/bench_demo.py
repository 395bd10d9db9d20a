"""The demo's wall time with the ×4 stages at 20 and at 10 DDIM steps (alternating runs, each in a fresh process),
and what the step count does to the ×4 stages' quality on held-out scenes (PSNR and edge sharpness against the
true render, as the gates measure them).

    python bench/bench_demo.py [--runs 3]     # → bench/results/demo.json
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import engine
from engine import images, world
from engine.demo import SR_ETA
from engine.embedded import DEFAULT_UPSCALER, source_commit, versions
from engine.profile import cpu_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiny import renders, sr_scores  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "demo.json"
SR_STEPS = (20, 10)


def demo_seconds(sr_steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "engine", "demo", "--out", out, "--sr-steps", str(sr_steps),
                               "--quiet"], capture_output=True, text=True, check=True)
    return float(re.search(r" in ([\d.]+)s;", done.stdout)[1])


def quality(sr_steps: int, n: int = 30, n_tiled: int = 4) -> dict:
    pipe = engine.load(DEFAULT_UPSCALER)
    ss = world.scenes(103, n)  # the gates' held-out SR scenes
    low, truth = renders(ss, 64), torch.from_numpy(world.render_batch(ss, 256))
    x = torch.cat([pipe.upscale(low[i:i + 10], [s.caption() for s in ss[i:i + 10]], steps=sr_steps, guidance=1.0,
                                eta=SR_ETA, seed=i, output="pt", progress=False, backproject=images.BACKPROJECT)
                   for i in range(0, n, 10)]).float().clamp(-1, 1)
    mid, big_truth = renders(ss[:n_tiled], 256), torch.from_numpy(world.render_batch(ss[:n_tiled], 1024))
    big = torch.cat([pipe.upscale(im, s.caption(), steps=sr_steps, guidance=1.0, eta=SR_ETA, seed=k, tile=64,
                                  overlap=16, output="pt", progress=False, backproject=images.BACKPROJECT)
                     for k, (im, s) in enumerate(zip(mid, ss))]).float().clamp(-1, 1)
    a, b = sr_scores(x, low, truth), sr_scores(big, mid, big_truth)
    return {"scenes_256": n, "psnr_256": a["psnr_sr"], "sharpness_256": a["sharpness_sr"],
            "scenes_1024": n_tiled, "psnr_1024": b["psnr_sr"], "sharpness_1024": b["sharpness_sr"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = {s: [] for s in SR_STEPS}
    for _ in range(args.runs):
        for s in SR_STEPS:
            runs[s].append(demo_seconds(s))
            print(f"demo, x4 stages at {s} steps: {runs[s][-1]:.1f} s", flush=True)
    cpu = cpu_name()
    result = {"cpu": cpu, "threads": torch.get_num_threads(), "runs": {str(s): v for s, v in runs.items()},
              "median_s": {str(s): statistics.median(v) for s, v in runs.items()},
              "ratio_10_over_20": statistics.median(runs[10]) / statistics.median(runs[20]),
              "quality": {str(s): quality(s) for s in SR_STEPS}, "commit": source_commit(),
              "model_version": versions(), "command": " ".join(["python bench/bench_demo.py", *sys.argv[1:]])}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_10_over_20", "quality")}, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
