"""Quality per step of each sampler on the embedded model: held-out captions sampled at 10–50 steps, scored
against a 200-step DDIM reference of the same seed (PSNR) and read from the pixels (colour and shape of the
named objects, engine.judge).

    python bench/bench_samplers.py                  # → bench/results/samplers.json
    python bench/bench_samplers.py --captions 20    # a quick look

A sampler "matches DDIM-50" at the fewest steps where its colour and shape accuracy are each within
TOLERANCE of DDIM-50's and, for the deterministic samplers, its PSNR to the reference is at least PSNR_FLOOR
(an RMS difference of 1% of the range: the same picture). DDIM-50's own PSNR is no bar for the others: it shares
DDIM-200's discretisation, so it sits closer to that reference than an equally accurate other solver. The
ancestral and SDE samplers (and LCM, which is for distilled models) add fresh noise, so they converge to other
images than DDIM's: for them PSNR is reported but not required. Heun calls the UNet twice a step but the last.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import engine
from engine import world
from engine.embedded import DEFAULT_MODEL, source_commit, versions
from engine.metrics import psnr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiny import judged  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "samplers.json"
SAMPLERS = ["ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm"]
STOCHASTIC = {"euler_a", "dpmpp_2m_sde", "lcm"}  # fresh noise every step (LCM: a distilled model's sampler)
STEPS = [10, 15, 20, 25, 50]
REFERENCE_STEPS = 200
GUIDANCE = 5.0       # the gates' guidance
SCENE_SEED = 102     # the gates' held-out template captions
TOLERANCE = 0.02     # accuracy points a match may lose to DDIM-50
PSNR_FLOOR = 40.0    # dB to the reference, for the deterministic samplers


def sample(pipe, captions, sampler, steps, batch=50):
    return torch.cat([pipe.generate(captions[i:i + batch], steps=steps, guidance=GUIDANCE, seed=i, output="pt",
                                    progress=False, sampler=sampler) for i in range(0, len(captions), batch)])


def scores(x, ref, scenes):
    j = judged(x, scenes)
    return {"psnr": float(psnr(x, ref).mean()), "colour": j["colour"], "shape": j["shape"]}


def fewest(rows, base):
    """The fewest steps at which a sampler matches DDIM-50 (None: at none of STEPS)."""
    for steps in STEPS:
        r = rows[str(steps)]
        ok = r["colour"] >= base["colour"] - TOLERANCE and r["shape"] >= base["shape"] - TOLERANCE
        if ok and (r["stochastic"] or r["psnr"] >= PSNR_FLOOR):
            return steps
    return None


def summarize(result: dict) -> dict:
    """The fewest steps at which each sampler matches DDIM-50, and the fast default: the deterministic
    sampler and step count that match it with the fewest UNet calls."""
    table = result["table"]
    matches = {s: fewest(table[s], table["ddim"]["50"]) for s in SAMPLERS}
    calls = {s: table[s][str(n)]["unet_calls"] for s, n in matches.items() if n is not None and s not in STOCHASTIC}
    best = min(calls, key=lambda s: (calls[s], s))
    return {**result, "matches_ddim_50_at": matches, "fast_default": {"sampler": best, "steps": matches[best]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--summarize", action="store_true", help="recompute the summary of the existing JSON")
    args = ap.parse_args()
    if args.summarize:
        OUT.write_text(json.dumps(summarize(json.loads(OUT.read_text())), indent=2) + "\n")
        return
    torch.set_num_threads(2)
    pipe = engine.load(DEFAULT_MODEL)
    scenes = world.scenes(SCENE_SEED, args.captions)
    captions = [s.caption() for s in scenes]
    t0 = time.perf_counter()
    ref = sample(pipe, captions, "ddim", REFERENCE_STEPS)
    table = {"reference": {"sampler": "ddim", "steps": REFERENCE_STEPS, **scores(ref, ref, scenes), "psnr": None}}
    for sampler in SAMPLERS:
        rows = {}
        for steps in STEPS:
            x = sample(pipe, captions, sampler, steps)
            rows[str(steps)] = {**scores(x, ref, scenes), "stochastic": sampler in STOCHASTIC,
                                "unet_calls": 2 * steps - 1 if sampler == "heun" else steps}
            print(f"{sampler:13s} {steps:3d} steps: PSNR {rows[str(steps)]['psnr']:6.2f} dB, colour "
                  f"{rows[str(steps)]['colour']:.3f}, shape {rows[str(steps)]['shape']:.3f}", flush=True)
        table[sampler] = rows
    result = {"captions": len(captions), "scene_seed": SCENE_SEED, "guidance": GUIDANCE, "tolerance": TOLERANCE, "psnr_floor": PSNR_FLOOR,
              "schedule": "default", "table": table,
              "seconds": round(time.perf_counter() - t0, 1), "device": "cpu (2 cores)", "commit": source_commit(),
              "model_version": versions(), "command": " ".join(["python bench/bench_samplers.py", *sys.argv[1:]])}
    result = summarize(result)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matches DDIM-50 at: {result['matches_ddim_50_at']}; fast default {result['fast_default']}\nwrote {OUT}")


if __name__ == "__main__":
    main()
