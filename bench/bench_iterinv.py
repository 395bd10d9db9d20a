"""IterInv Table 1 on the embedded cascade, over held-out world scenes (seed 106), and one 1024² edit.

    python bench/bench_iterinv.py --size 256 --scenes 20 --paper-scenes 4
    python bench/bench_iterinv.py --size 1024 --scenes 5 --methods ddim fast
    python bench/bench_iterinv.py --edit                     # 1024²: a red circle → a blue circle, two ways
    python bench/bench_iterinv.py --edit-table --scenes 20   # 256²: 20 recolouring edits, two ways
    python bench/bench_iterinv.py --edit-zt --scenes 20      # 256²: the same edits from three z_T
    python bench/bench_iterinv.py --edit-zt --size 1024 --scenes 6
    python bench/bench_iterinv.py --timing                   # paper vs fast solve time, alone, alternating
    python bench/bench_iterinv.py --mask                     # DiffEdit mask settings vs the world's masks

Rows (reconstruction of the input at --size from the cascade 64² → 256² (→ 1024², tiled)):
vae            the x4 VAE's encode → decode of the input: the ceiling of every row
ddim-all       the reference's DDIM baseline at every stage: plain DDIM inversion at stage 1 sampled back with
               CFG 3; SR stages inverted reading the v output as ε, ĉ redrawn for the reconstruction
ddim-sr        stage 1 as IterInv's (null-text, fast); SR stages as ddim-all's
ddim-fair      stage 1 as IterInv's; SR stages by v-aware DDIM inversion with the same ĉ
paper / fast   stage 1 as IterInv's; SR stages by IterInv, paper mode (T = 50, N = 21) or ours
Paper mode runs on the first --paper-scenes scenes only (its cost: 1050 UNet forward+backward per stage); the
fast and ceiling rows are also averaged over just those scenes. The time ratio of the two solvers is --timing's:
the SR-stage solve alone, the two alternating in one process with nothing else running. --batch B inverts B
scenes per call and saves after each call (sr_evals and the times are then summed over the calls).
Metrics on [0, 1]: MSE, PSNR, SSIM (engine.metrics) and the tiny-CLIP score against the caption.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import engine
from engine import diffedit, images, iterinv, metrics, world
from engine.cascade_files import SRInversion
from engine.denoiser import Denoiser, constant
from engine.invert import invert
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.rng import generator, randn_tensor
from engine.sample import ddim
from stamps import save_part, stamp

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "iterinv.json"
ROWS = {"ddim-all": ("ddim", "ddim-reference"), "ddim-sr": ("fast", "ddim-reference"), "ddim-fair": ("fast", "ddim"),
        "paper": ("fast", "paper"), "fast": ("fast", "fast")}


def save(key, value):
    save_part(OUT, key, value, STAMP, indent=1)


def pil(scene, res):
    return Image.fromarray((world.render(scene, res) * 255).round().astype(np.uint8))


def scores(rec, truth, scorer, caps):
    return {"mse": metrics.mse(rec, truth).tolist(), "psnr": metrics.psnr(rec, truth).tolist(),
            "ssim": metrics.ssim(rec, truth).tolist(), "clip": scorer.score(rec, caps).tolist()}


METRICS = ("mse", "psnr", "ssim", "clip")


def summary(per):
    return {k: statistics.mean(v) if k in METRICS else v for k, v in per.items()}


def table(size, n_paper, n):
    cas = iterinv.Cascade(engine.load(DEFAULT_MODEL).model, engine.load(DEFAULT_UPSCALER).model)
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)
    ss = world.scenes(106, n)
    caps, pils = [s.caption() for s in ss], [pil(s, size) for s in ss]
    truth = images.to_tensor(pils)
    vae = cas.sr.vae
    old = json.loads(OUT.read_text()).get(f"table_{size}", {}) if OUT.exists() else {}
    same_run = old.get("scenes") == n and old.get("model_version") == STAMP["model_version"]
    rows = old.get("per_scene", {}) if same_run else {}  # rows of earlier runs on these scenes and models
    with torch.no_grad():
        rows["vae"] = scores(vae.decode_latents(vae.encode_latents(truth)), truth, scorer, caps)
    print(f"{size}² vae: {statistics.mean(rows['vae']['psnr']):.2f} dB")
    for name in ARGS.methods:
        stage1, method = ROWS[name]
        k = n_paper if name == "paper" else n
        if k == 0:
            continue
        step, parts = ARGS.batch or k, []
        for i in range(0, k, step):  # saved after every batch of scenes, so a stopped run keeps what it finished
            t0 = time.perf_counter()
            inv = cas.invert(pils[i:i + step], caps[i:i + step], size, method, stage1)
            parts.append(scores(inv.images[-1], truth[i:i + step], scorer, caps[i:i + step]) | {
                "sr_solve_seconds": sum(st.seconds for st in inv.stages),
                "sr_evals": sum(st.evals for st in inv.stages), "total_seconds": time.perf_counter() - t0,
                "max_one_step_error": [None if st.errors is None else max(e.max().item() for e in st.errors)
                                       for st in inv.stages]})
            rows[name] = merge(parts) | {"batch": step}
            save_table(size, n, rows)
        print(f"{size}² {name}: {statistics.mean(rows[name]['psnr']):.2f} dB, "
              f"SR solve {rows[name]['sr_solve_seconds']:.0f}s")
    save_table(size, n, rows)


def merge(parts):
    """One row from the rows of consecutive batches of scenes: scores concatenated, times and calls summed."""
    row = {m: sum((p[m] for p in parts), []) for m in METRICS}
    row |= {m: sum(p[m] for p in parts) for m in ("sr_solve_seconds", "sr_evals", "total_seconds")}
    row["max_one_step_error"] = [None if None in e else max(e) for e in zip(*(p["max_one_step_error"] for p in parts))]
    return row | {"scenes": len(row["psnr"])}


def save_table(size, n, rows):
    if "paper" in rows and "fast" in rows:  # fast and the ceiling on paper's scenes (batching changes nothing)
        k = rows["paper"]["scenes"]
        rows["fast-on-paper-scenes"] = {m: rows["fast"][m][:k] for m in METRICS} | {"scenes": k}
        rows["vae-on-paper-scenes"] = {m: rows["vae"][m][:k] for m in METRICS} | {"scenes": k}
    save(f"table_{size}", {"scenes": n, "paper_scenes": rows.get("paper", {}).get("scenes", 0), "seed": 106,
                           "rows": {r: summary(v) for r, v in rows.items()}, "per_scene": rows})


def timing(k=4, rounds=2):
    """The SR-stage solve alone (64² render as conditioning → 256²), paper vs fast on the same batch of k
    scenes, alternating which goes first, `rounds` times; nothing else running."""
    cas = iterinv.Cascade(engine.load(DEFAULT_MODEL).model, engine.load(DEFAULT_UPSCALER).model)
    c = cas.sr
    ss = world.scenes(106, k)
    low, truth = (torch.from_numpy(world.render_batch(ss, r)) for r in (64, 256))
    den = cas.sr_denoiser(low, randn_tensor(low.shape, generator(0)), 100)
    cond = constant(cas.sr.encode_prompt([s.caption() for s in ss], None, False))
    runs = []
    with torch.no_grad():
        z0 = c.vae.encode_latents(truth)
        for r in range(rounds):
            for mode in iterinv.MODES if r % 2 == 0 else iterinv.MODES[::-1]:
                t0 = time.perf_counter()
                sol = iterinv.solve(mode, den, z0, cond, c.scheduler, 50, progress=False)
                dt = time.perf_counter() - t0
                z = ddim(den, sol.latents[-1], cond, c.scheduler, 50, progress=False)
                runs.append({"round": r, "mode": mode, "seconds": dt, "evals": sol.evals,
                             "psnr": metrics.psnr(c.vae.decode_latents(z), truth).mean().item(),
                             "latent_mse": (z - z0).square().mean().item()})
                print(runs[-1])
        traj = invert(den, z0, cond, c.scheduler, 50, progress=False)  # fair DDIM, for the latent error
        z = ddim(den, traj.latents[-1], cond, c.scheduler, 50, progress=False)
        runs.append({"round": None, "mode": "ddim", "psnr": metrics.psnr(c.vae.decode_latents(z), truth).mean().item(),
                     "latent_mse": (z - z0).square().mean().item()})
    ratios = [next(x["seconds"] for x in runs if x["round"] == r and x["mode"] == "fast") /
              next(x["seconds"] for x in runs if x["round"] == r and x["mode"] == "paper") for r in range(rounds)]
    save("timing_256", {"scenes": k, "batch": k, "runs": runs, "fast_over_paper": ratios,
                        "median_fast_over_paper": statistics.median(ratios)})
    print("fast / paper time:", ratios)


def mask(n=20):
    """DiffEdit mask settings on the base model: IoU and recall against the world's mask of the recoloured object."""
    from bench_direct import edits

    base = engine.load(DEFAULT_MODEL)
    ss = world.scenes(106, n)
    x = torch.from_numpy(world.render_batch(ss, 64))
    truth = torch.from_numpy(np.stack([world.masks(s, 64)[0] for s in ss]))[:, None] > 0.5
    den = Denoiser(base.model.unet, 3.0)
    rep = lambda ps: constant(base.model.encode_prompt(ps * 10, None, True))  # noqa: E731
    src, tgt = rep([s.caption() for s in ss]), rep([s.caption() for s in edits(ss)])
    out = []
    with torch.no_grad():
        z0 = base.model.vae.encode_latents(x)
        for strength, ratio in ((0.1, 1.0), (0.3, 3.0), (0.5, 2.0), (0.5, 3.0), (0.5, 4.0), (0.8, 3.0)):
            m = diffedit.diffedit_mask(den, z0, src, tgt, base.model.scheduler, 50, strength, 10, ratio, generator(0))
            m = torch.nn.functional.interpolate(m, size=(64, 64), mode="nearest") > 0.5
            inter, union = (m & truth).sum((1, 2, 3)), (m | truth).sum((1, 2, 3))
            out.append({"strength": strength, "ratio": ratio, "iou": (inter / union).mean().item(),
                        "recall": (inter / truth.sum((1, 2, 3))).mean().item(), "mask_fraction": m.float().mean().item()})
            print(out[-1])
    save("mask", {"scenes": n, "seed": 106, "object_fraction": truth.float().mean().item(), "settings": out})


def edit(backproject=3):
    """The 1024² edit twice from one inversion: as the reference (each ×4 stage as sampled) and with ours,
    each ×4 stage back-projected onto the edited stage below."""
    size = 1024
    cas = iterinv.Cascade(engine.load(DEFAULT_MODEL).model, engine.load(DEFAULT_UPSCALER).model)
    src = world.Scene((world.Obj("circle", "red", "large", "in the center"),), "striped", "gray")
    tgt = src.replace(0, colour="blue")
    image = pil(src, size)
    t0 = time.perf_counter()
    inv = cas.invert(image, src.caption(), size, "fast", "fast")
    t_inv, vae = time.perf_counter() - t0, cas.sr.vae
    truth, gt = images.to_tensor(image), images.to_tensor(pil(tgt, size))
    obj = torch.from_numpy(world.masks(src, size)[:1])[None]
    grown = torch.nn.functional.max_pool2d(obj, 2 * 16 + 1, 1, 16)  # the object dilated by 16 px
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)

    def outside(ims):  # PSNR outside the dilated object at every stage, against the source at that side
        return [metrics.psnr(im, images.to_tensor(pil(src, im.shape[-1])), torch.nn.functional.interpolate(
            1 - grown, size=im.shape[-2:], mode="area").round()).item() for im in ims]
    result = {"source": src.caption(), "edit": tgt.caption(), "size": size,
              "reconstruction_psnr": metrics.psnr(inv.images[-1], truth).item(),
              "vae_ceiling_psnr": metrics.psnr(vae.decode_latents(vae.encode_latents(truth)), truth).item(),
              "reconstruction_psnr_outside_object_by_stage": outside(inv.images),
              "clip_edit_prompt_source": scorer.score(truth, [tgt.caption()]).item(),
              "seconds_invert": t_inv, "rows": {}}
    sheet = []
    for bp in (0, backproject):
        t0 = time.perf_counter()
        outs, mask = cas.edit(image, src.caption(), tgt.caption(), inv.stages, backproject=bp)
        edited = outs[-1]
        up = torch.nn.functional.interpolate(mask, size=(size, size), mode="nearest")
        name = f"backproject-{bp}" if bp else "reference"
        result["rows"][name] = {
            "backproject": bp, "mask_fraction": mask.mean().item(),
            "psnr_outside_diffedit_mask": metrics.psnr(edited, truth, 1 - up).item(),
            "psnr_outside_object_dilated_16px": metrics.psnr(edited, truth, 1 - grown).item(),
            "psnr_outside_object_by_stage": outside(outs),
            "psnr_to_ground_truth_edit": metrics.psnr(edited, gt).item(),
            "clip_edit_prompt": scorer.score(edited, [tgt.caption()]).item(),
            "seconds_edit": time.perf_counter() - t0}
        first = [(image, "source 1024²: " + src.caption()),
                 (images.to_pil((up * 2 - 1).expand(-1, 3, -1, -1))[0], "DiffEdit mask (16² latent)")] if not bp \
            else [(images.to_pil(inv.images[-1])[0], "IterInv reconstruction 1024²"),
                  (images.to_pil(gt)[0], "the edit drawn by the world (truth)")]
        sheet += first + [(images.to_pil(o)[0], f"{name} {o.shape[-1]}²") for o in outs]
    images.save(images.contact_sheet(sheet, columns=len(sheet) // 2), RESULTS / "iterinv_edit_1024.png")
    save("edit_1024", result)
    print(json.dumps(result, indent=1))


def edit_scenes(n, size):
    """The edit tables' n held-out scenes (seed 109) at `size`, object 0 recoloured (bench_direct.edits): the scenes
    and edited scenes, their captions, images and renders, the mask outside the object dilated by size/64 px, and
    the 8 recoloured captions of each edit with the one wanted."""
    from bench_direct import edits

    ss = world.scenes(109, n)
    new = edits(ss)
    caps, targets = [s.caption() for s in ss], [s.caption() for s in new]
    pils = [pil(s, size) for s in ss]
    src, truth = images.to_tensor(pils), images.to_tensor([pil(s, size) for s in new])
    r = size // 64
    obj = torch.from_numpy(np.stack([world.masks(s, size)[0] for s in ss]))[:, None]
    keep = 1 - torch.nn.functional.max_pool2d(obj, 2 * r + 1, 1, r)
    cands = [[t.replace(0, colour=c).caption() for c in world.COLOURS] for t in new]
    target = torch.tensor([list(world.COLOURS).index(t.objects[0].colour) for t in new])
    return ss, new, caps, targets, pils, src, truth, keep, cands, target


def edit_table(n=20, size=256, backproject=3):
    """IterInv + DiffEdit on n held-out scenes (seed 109, object 0 recoloured), as the reference and with
    back-projection, from one inversion: edit success (tiny CLIP picks the target colour among the 8), PSNR outside
    the object dilated by size/64 px against the source, PSNR to the world's drawn edit, CLIP of the edit prompt."""
    cas = iterinv.Cascade(engine.load(DEFAULT_MODEL).model, engine.load(DEFAULT_UPSCALER).model)
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)
    ss, new, caps, targets, pils, src, truth, keep, cands, target = edit_scenes(n, size)
    t0 = time.perf_counter()
    inv = cas.invert(pils, caps, size, "fast", "fast", progress=False)
    result = {"scenes": n, "seed": 109, "size": size, "seconds_invert": time.perf_counter() - t0,
              "reconstruction_psnr": metrics.psnr(inv.images[-1], src).mean().item(), "rows": {}}
    for bp in (0, backproject):
        t0 = time.perf_counter()
        outs, _ = cas.edit(pils, caps, targets, inv.stages, backproject=bp, progress=False)
        x = outs[-1]
        per = {"success": (scorer.classify(x, cands) == target).tolist(),
               "psnr_outside_object": metrics.psnr(x, src, keep).tolist(),
               "psnr_to_ground_truth_edit": metrics.psnr(x, truth).tolist(),
               "clip_edit_prompt": scorer.score(x, targets).tolist()}
        name = f"backproject-{bp}" if bp else "reference"
        result["rows"][name] = {"backproject": bp, "seconds_edit": time.perf_counter() - t0,
                                **{k: statistics.mean(map(float, v)) for k, v in per.items()}, "per_scene": per}
        print(name, {k: round(v, 3) for k, v in result["rows"][name].items() if isinstance(v, float)}, flush=True)
    save(f"edit_table_{size}", result)


def edit_zt(n=20, size=256):
    """IterInv for editing: does the inversion matter? The edit table's scenes and edits (reference settings, no
    back-projection), the SR stages sampled from three z_T under the same ĉ, below them the same DiffEdit edit of
    stage 1: IterInv's (fast), fair DDIM inversion's (v-aware) and a random one (plain SR of the edited stage).
    At full resolution: edit success (tiny CLIP; from the pixels, engine.judge), PSNR / SSIM outside the object
    dilated by size/64 px against the source, PSNR to the world's drawn edit and edge sharpness against it."""
    from bench_direct import judged
    from bench_tiny import sharpness

    cas = iterinv.Cascade(engine.load(DEFAULT_MODEL).model, engine.load(DEFAULT_UPSCALER).model)
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)
    ss, new, caps, targets, pils, src, truth, keep, cands, target = edit_scenes(n, size)
    starts = {}
    for name, method in (("IterInv", "fast"), ("fair DDIM", "ddim")):
        t0 = time.perf_counter()
        inv = cas.invert(pils, caps, size, method, "fast", progress=False)
        starts[name] = dict(stages=inv.stages, seconds_invert=time.perf_counter() - t0,
                            reconstruction_psnr=metrics.psnr(inv.images[-1], src).mean().item())
    g = torch.Generator().manual_seed(0)
    starts["random"] = dict(stages=[SRInversion(torch.randn(st.z_T.shape, generator=g).to(st.z_T), st.noise)
                                    for st in starts["IterInv"]["stages"]], seconds_invert=0.0,
                            reconstruction_psnr=None)
    rows = {}
    for name, start in starts.items():
        t0 = time.perf_counter()
        x = cas.edit(pils, caps, targets, start.pop("stages"), progress=False)[0][-1]
        per = {"success": (scorer.classify(x, cands) == target).float().tolist(),
               "psnr_outside_object": metrics.psnr(x, src, keep).tolist(),
               "ssim_outside_object": metrics.ssim(x, src, keep).tolist(),
               "psnr_to_ground_truth_edit": metrics.psnr(x, truth).tolist()}
        rows[name] = {**start, "seconds_edit": time.perf_counter() - t0, **judged(x, new),
                      "sharpness_to_truth": sharpness(x, truth),
                      **{k: statistics.mean(v) for k, v in per.items()}, "per_scene": per}
        print(name, {k: v for k, v in rows[name].items() if k != "per_scene"}, flush=True)
    save(f"edit_zt_{size}", {"scenes": n, "seed": 109, "size": size, "rows": rows})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, choices=[256, 1024])
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--paper-scenes", type=int, default=4)
    ap.add_argument("--batch", type=int, help="scenes per cascade call, each saved when done (default: all at once)")
    ap.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--edit", action="store_true", help="only the 1024² edit example")
    ap.add_argument("--edit-table", action="store_true", help="only the edit on --scenes scenes at --size, both ways")
    ap.add_argument("--edit-zt", action="store_true", help="only the edit on --scenes scenes at --size from three z_T")
    ap.add_argument("--timing", action="store_true", help="only the paper-vs-fast solve timing at 256²")
    ap.add_argument("--mask", action="store_true", help="only the DiffEdit mask settings against the world's masks")
    ARGS = ap.parse_args()
    STAMP = stamp("bench_iterinv.py")
    torch.manual_seed(0)
    if ARGS.timing:
        timing()
    elif ARGS.mask:
        mask()
    elif ARGS.edit:
        edit()
    elif ARGS.edit_table:
        edit_table(ARGS.scenes, ARGS.size)
    elif ARGS.edit_zt:
        edit_zt(ARGS.scenes, ARGS.size)
    else:
        table(ARGS.size, ARGS.paper_scenes, ARGS.scenes)
