"""Multi-stage blended diffusion (MSBD) on the embedded cascade, against its ablations and baselines, over held-out
world scenes (seed 107), judged at full resolution against the world's re-render of the edit.

    python bench/bench_blended.py --size 256 1024 --scenes 8 --direct-scenes 2
    python bench/bench_blended.py --size 256 1024 --scenes 12 --direct-scenes 2 --resume   # scenes 8 to 11 added
    python bench/bench_blended.py --rss 2048 1024 2048:512     # one CLI edit each: peak RSS and time

Each scene: object 0 recoloured (never to another object's or the background's colour); the prompt is the edited
scene's caption and the truth the world's render of it. Three masks: the object (coverage ≥ 0.5), the object dilated
by size/16 px, and its bounding box grown by size/16 px: the last two make the edit redraw background around the
object. Every multi-stage row upscales the same stage 1 (MSBD's: 5 candidates reranked by the tiny CLIP, RePaint 5,
CFG 7.5, 50 steps). Rows (`ROWS`):
msbd                MSBD's stages: ×2 (the ×4 model's upscale resized), CFG 7.5, starts 0.4 / 0.25 at SD's noise
                    levels, the original low-passed to the previous stage, no back-projection
msbd-x4 … msbd-nolowpass   MSBD with one setting changed: ×4 stages; no CFG in the stages; starts counted on the ×4
                    model's own schedule; back-projection (3); the original as it is
ours                the engine's defaults: all four of ours at once (×4, no CFG, own schedule, back-projection)
sr-only             stage 1, the ×4 model's upscales only, no diffusion (MSBD's Fig. 5 ablation)
bicubic             stage 1, bicubic to the size
direct-1            blended diffusion with the base model directly at min(size, 256)², bicubic to the size: one
                    candidate, no RePaint
direct-equal        the same with stage 1's settings (5 candidates, RePaint 5, rerank): on --direct-scenes scenes
Every row is the source outside the mask, pixel for pixel (the final stitch; checked, not a result). Metrics, at full
resolution against the truth: PSNR and SSIM in the mask, PSNR on the object and on the rest of the mask (the
background redrawn; dilated and box masks); within the mask dilated by size/32 px, edge sharpness on the truth's
edges (bench_tiny.sharpness: edges drawn where the truth has them) and edge energy Σ|∇x| / Σ|∇truth| (as much edge
as the truth, wherever it is drawn); from the pixels (engine.judge, which reads at 64²): object 0 in the target
colour, and every attribute of the edited scene. The tiny CLIP that reranks the candidates judges nothing. Every
output is kept as a PNG in bench/cache/blended/.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import engine
from engine import blended, images, metrics, regions, world
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from bench_direct import judged
from bench_tiny import gradients, sharpness
from stamps import save_part, stamp

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "blended.json"
CACHE = Path(__file__).parent / "cache" / "blended"  # every output, to judge again without a rerun
MSBD = blended.Options(stage_ratio=2, stage_guidance=7.5, start_on="sd", backproject=0)
STAGED = {  # the rows that upscale stage 1 with MultiStage.edit
    "msbd": MSBD,
    "msbd-x4": replace(MSBD, stage_ratio=4),
    "msbd-nocfg": replace(MSBD, stage_guidance=None),
    "msbd-ownstart": replace(MSBD, start_on="stage"),
    "msbd-backproject": replace(MSBD, backproject=3),
    "msbd-nolowpass": replace(MSBD, lowpass="no"),
    "ours": blended.Options(),
    "sr-only": replace(MSBD, stage_ratio=4, start=0, tiled_start=0),
}
ROWS = (*STAGED, "bicubic", "direct-1", "direct-equal")
GOAL = ("msbd", "ours", "sr-only", "bicubic", "direct-1", "direct-equal")  # the rows at sizes above 256
MASKS = ("object", "dilated", "box")
DIRECT_SIDE = blended.Options().max_side


def save(key, value):
    save_part(OUT, key, value, STAMP, indent=1)


def cases(seed: int, n: int):
    """(source scene, edited scene, target colour) per scene: object 0 recoloured."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for sc in world.scenes(seed, n):
        used = {o.colour for o in sc.objects} | {sc.bg_colour}
        colour = str(rng.choice([c for c in world.COLOURS if c not in used]))
        out.append((sc, sc.replace(0, colour=colour), colour))
    return out


def grow(m, r):
    """m dilated by a (2r + 1)² square: max pooling as two 1-D passes."""
    return F.max_pool2d(F.max_pool2d(m, (1, 2 * r + 1), 1, (0, r)), (2 * r + 1, 1), 1, (r, 0))


def mask_of(kind, obj, size):
    """The edit's mask (1, 1, size, size) from object 0's (coverage ≥ 0.5)."""
    r = size // 16
    if kind == "object":
        return obj
    if kind == "dilated":
        return grow(obj, r)
    ys, xs = torch.nonzero(obj[0, 0], as_tuple=True)
    box = torch.zeros_like(obj)
    box[..., max(ys.min() - r, 0):ys.max() + 1 + r, max(xs.min() - r, 0):xs.max() + 1 + r] = 1
    return box


def edge_energy(x, truth, within):
    """Σ|∇x| / Σ|∇truth| where `within` is 1: as much edge as the truth (1) wherever it is drawn; blur lowers it,
    noise and extra edges raise it."""
    w = within[:, 0, 1:-1, 1:-1]
    energy = lambda a: (gradients(a).square().sum((0, 2)).sqrt() * w).sum().item()  # noqa: E731
    return energy(x) / energy(truth)


def scores(x, src, truth, m, obj, new):
    rest = m * (1 - grow(obj, max(x.shape[-1] // 64, 1)))  # the mask off the object: background redrawn
    near = grow(m, x.shape[-1] // 32)
    assert torch.equal(x * (1 - m), src * (1 - m)), "not the source outside the mask"
    return {"psnr_mask": metrics.psnr(x, truth, m).item(), "ssim_mask": metrics.ssim(x, truth, m).item(),
            "psnr_object": metrics.psnr(x, truth, obj).item(),
            "psnr_rest": metrics.psnr(x, truth, rest).item() if rest.mean() > 0.005 else None,
            "sharpness": sharpness(x, truth, near), "edge_energy": edge_energy(x, truth, near), **judged(x, [new])}


def run(sizes, n, seed, masks, direct_scenes, resume=False):
    """Scene by scene, each size and mask: every result file part rewritten after each scene. resume: keep the
    scenes the result file has for every size and mask (each row keeps its run's commit) and go on from there."""
    base, sr = engine.load(DEFAULT_MODEL), engine.load(DEFAULT_UPSCALER)
    ms = blended.MultiStage(base.model, sr.model, metrics.Scorer.from_pretrained(DEFAULT_MODEL))
    direct_1 = blended.Options(candidates=1, repaint=0)
    per = {(size, kind): [] for size in sizes for kind in masks}
    if resume:
        old = json.loads(OUT.read_text())
        for size, kind in per:
            part = old.get(f"size_{size}_{kind}", {"seed": seed, "per_scene": []})
            if part["seed"] != seed:
                sys.exit(f"--resume: {OUT} holds seed {part['seed']}, not {seed}")
            per[size, kind] = [{"commit": part.get("commit"), **r} for r in part["per_scene"]]
    done = min(len(rows) for rows in per.values())
    per = {k: rows[:done] for k, rows in per.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    for i, (sc, new, colour) in enumerate(cases(seed, n)):
        if i < done:
            continue
        prompt, firsts, directs = new.caption(), {}, {}  # stage 1 and the direct rows, shared by the sizes
        for size in sizes:
            names = ROWS if size <= DIRECT_SIDE else GOAL
            src = torch.from_numpy(world.render_batch([sc], size))
            truth = torch.from_numpy(world.render_batch([new], size))
            obj = torch.from_numpy((world.masks(sc, size)[:1] >= 0.5).astype(np.float32))[None]
            for kind in masks:
                m = mask_of(kind, obj, size)
                row = {"scene": i, "commit": STAMP["commit"], "prompt": prompt, "target": colour,
                       "mask_fraction": m.mean().item()}
                out = {}
                for name, opts in ((k, v) for k, v in STAGED.items() if k in names):
                    t0 = time.perf_counter()
                    r = ms.edit(src, m, prompt, replace(opts, seed=i), progress=False, first=firsts.get(kind))
                    if kind not in firsts:
                        firsts[kind] = r.stages[0]
                        row["stage1_seconds"] = r.log[0]["seconds"]
                    out[name] = r.image
                    row[name] = {"seconds_after_stage1": round(time.perf_counter() - t0 - r.log[0]["seconds"], 2)}
                out["bicubic"] = m * regions.resize(firsts[kind], size, "bicubic") + (1 - m) * src
                row["bicubic"] = {}
                for name, opts in (("direct-1", direct_1), ("direct-equal", MSBD)):
                    if name not in names or (name == "direct-equal" and i >= direct_scenes):
                        continue
                    key = (name, kind, min(size, DIRECT_SIDE))
                    if key not in directs:
                        t0 = time.perf_counter()
                        low = ms.direct(src, m, prompt, replace(opts, seed=i), side=min(size, DIRECT_SIDE),
                                        progress=False)
                        directs[key] = (low, round(time.perf_counter() - t0, 2))
                    low, secs = directs[key]
                    out[name] = m * regions.resize(low, size, "bicubic") + (1 - m) * src
                    row[name] = {"seconds": secs}
                for name, x in out.items():
                    row[name].update(scores(x, src, truth, m, obj, new))
                    images.to_pil(x)[0].save(CACHE / f"{size}_{kind}_{i}_{name}.png")
                row["truth"] = scores(truth * m + src * (1 - m), src, truth, m, obj, new)  # the true edit, pasted
                per[size, kind].append(row)
                print(f"{size} {kind:7s} {i:2d} " + "  ".join(
                    f"{k} {row[k]['psnr_mask']:.2f}/{'ok' if row[k]['judge_colour'] else '--'}" for k in out),
                    flush=True)
        for (size, kind), rows in per.items():
            names = ROWS if size <= DIRECT_SIDE else GOAL
            save(f"size_{size}_{kind}", {"seed": seed, "size": size, "mask": kind, "scenes": len(rows),
                                         "options": {k: vars(v) for k, v in STAGED.items() if k in names},
                                         "direct_options": {"direct-1": vars(direct_1), "direct-equal": vars(MSBD),
                                                            "side": DIRECT_SIDE},
                                         "summary": summarize(rows), "per_scene": rows})
        for size in sizes:
            sheet(size, seed, [k for k in ("object", "box") if k in masks])


def sheet(size, seed, masks, scenes=3):
    """The first scenes' source, truth and five rows, from the kept outputs."""
    shots = []
    for i, (sc, new, _) in enumerate(cases(seed, scenes)):
        src, truth = images.to_pil(torch.from_numpy(world.render_batch([sc, new], size)))
        for kind in masks:
            names = [k for k in ("msbd", "ours", "sr-only", "bicubic", "direct-1")
                     if (CACHE / f"{size}_{kind}_{i}_{k}.png").exists()]
            if len(names) < 5:
                continue
            shots += [(src, f"{i}, {kind} mask: source"), (truth, "truth")]
            shots += [(Image.open(CACHE / f"{size}_{kind}_{i}_{k}.png"), k) for k in names]
    if shots:
        images.contact_sheet(shots, cell=192, columns=7).save(RESULTS / f"blended_{size}.png")


def summarize(per):
    out = {}
    for k in (k for k in (*ROWS, "truth") if k in per[0]):
        rows = [r[k] for r in per if k in r]
        out[k] = {"scenes": len(rows)}
        for metric in ("psnr_mask", "ssim_mask", "psnr_object", "psnr_rest", "sharpness", "edge_energy", "judge_colour",
                       "judge_scene", "seconds", "seconds_after_stage1"):
            vals = [r[metric] for r in rows if r.get(metric) is not None]
            if vals:
                out[k][metric] = (statistics.median if metric.startswith("seconds") else statistics.mean)(vals)
    return out


def rss(spec, seed):
    """One `python -m engine blend` at SIZE² (spec "SIZE" or "SIZE:MAX_SIDE") in a child process: its peak RSS
    (ru_maxrss of that child) and wall time."""
    size, max_side = (int(v) for v in (spec.split(":") + [0])[:2])
    sc, new, _ = cases(seed, 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray((world.render(sc, size) * 255).round().astype(np.uint8)).save(tmp / "in.png")
        Image.fromarray(((world.masks(sc, size)[0] >= 0.5) * 255).astype(np.uint8)).save(tmp / "mask.png")
        cmd = [sys.executable, "-m", "engine", "blend", "--image", str(tmp / "in.png"), "--mask", str(tmp / "mask.png"),
               "--prompt", new.caption(), "--quiet", "--out", str(tmp / "out.png")]
        cmd += ["--max-side", str(max_side)] if max_side else []
        t0 = time.perf_counter()
        _, status, usage = os.wait4(subprocess.Popen(cmd).pid, 0)
        seconds = time.perf_counter() - t0
        if status:
            sys.exit(f"{' '.join(cmd)} failed")
        report = json.loads((tmp / "out.json").read_text())
        if not max_side:
            Image.open(tmp / "out_sheet.png").save(RESULTS / f"blended_{size}_sheet.png")
    flag = f" --max-side {max_side}" if max_side else ""
    row = {"size": size, "max_side": max_side or blended.Options().max_side,
           "command": f"python -m engine blend --image IN --mask MASK --prompt TEXT{flag} --out OUT",
           "prompt": new.caption(), "peak_rss_gib": usage.ru_maxrss / 2**20, "seconds": seconds,
           "cores": torch.get_num_threads(), "stages": report["stages"],
           "outside_mask_max_abs_diff": report["outside_mask_max_abs_diff"],
           "commit": STAMP["commit"], "model_version": STAMP["model_version"]}  # "command": the edit's
    d = json.loads(OUT.read_text()) if OUT.exists() else {}
    save("rss", [r for r in d.get("rss", []) if (r["size"], r["max_side"]) != (size, row["max_side"])] + [row])
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[256])
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=107)
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    ap.add_argument("--direct-scenes", type=int, default=5, help="scenes of the direct-equal row (263 s each)")
    ap.add_argument("--resume", action="store_true", help="go on from the scenes the result file has")
    ap.add_argument("--rss", nargs="+", metavar="SIZE[:MAX_SIDE]", help="measure one CLI edit each instead")
    a = ap.parse_args()
    STAMP = stamp("bench_blended.py")
    if a.rss:
        for spec in a.rss:
            rss(spec, a.seed)
    else:
        run(a.size, a.scenes, a.seed, a.masks, a.direct_scenes, a.resume)
