"""Direct Inversion and null-text inversion on the embedded model, over held-out world scenes (seed 104).

    pip install -e ".[bench]"                    # matplotlib for the plots
    python bench/bench_direct.py                 # all parts → bench/results/direct_inversion.json + PNGs
    python bench/bench_direct.py --only tradeoff --scenes 50

recon     paper Fig. 5/6/8: DDIM reconstruction MSE / PSNR vs inversion and inference steps (10 … 200), inversion
          under "" (source convention, as Direct Inversion), sampling under "" without CFG and without injection.
tradeoff  paper Fig. 7: editability vs fidelity as λ sweeps 0 → 1 (100/100 steps, injection on every step).
          Edit: object 0's colour → another colour, the prompt is the edited scene's caption. Success: the tiny
          CLIP picks the target colour among the 8 captions that differ only in that colour; also read from the
          pixels (engine.judge): object 0 in the target colour, every attribute of the edited scene. Fidelity:
          PSNR / SSIM to the source outside the edited object (its mask dilated by 2 px). Also PSNR to the
          re-rendered ground truth of the edit (the whole image).
nti       null-text inversion (50 steps, CFG 7.5), reference vs fast: reconstruction PSNR and wall time of the
          optimisation, one image at a time (as the reference runs), alternating which goes first.
rivals    the tradeoff's scenes and edits through the paper's rivals and its variants, each at its authors'
          settings, one image at a time through the Pipeline (pixels in, pixels out), with the time per edit:
          Direct Inversion (100/100 steps, CFG 3, source "") at λ 0, 0.5, 1 and the x̃_T-only pairing;
          SDEdit (img2img, 50 steps, CFG 7.5) at strengths 0.5 and 0.75; Prompt-to-Prompt word swap (50 steps,
          CFG 7.5, cross 0.8, self 0.5) after null-text inversion (our fast method) and after plain DDIM
          inversion. Besides the tradeoff's metrics, the edit read from the pixels (engine.judge): object 0
          drawn in the target colour, and every attribute of the edited scene drawn.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import engine
from engine import direct, images, judge, metrics, world
from engine.denoiser import Denoiser, constant
from engine.invert import invert, null_text
from engine.embedded import DEFAULT_MODEL
from engine.sample import ddim
from stamps import save_part, stamp

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "direct_inversion.json"
STEPS = (10, 20, 50, 100, 200)
LAMBDAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def load():
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save(part, value):
    save_part(OUT, part, value, STAMP, indent=1)


def data(n):
    ss = world.scenes(104, n)
    return ss, torch.from_numpy(world.render_batch(ss, 64))


def edits(ss, seed=104):
    """Object 0 recoloured to a colour not already in the scene (deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in ss:
        used = {o.colour for o in s.objects} | {s.bg_colour}
        out.append(s.replace(0, colour=str(rng.choice([c for c in world.COLOURS if c not in used]))))
    return out


def edit_set(n):
    """The tradeoff's and rivals' edits: the scenes and their images, the edited scenes and their renders, the
    mask outside object 0 dilated by 2 px, and the 8 recoloured captions of each edit with the one wanted."""
    ss, x = data(n)
    tgt = edits(ss)
    truth = torch.from_numpy(world.render_batch(tgt, 64))
    obj = torch.from_numpy(np.stack([world.masks(s, 64)[0] for s in ss]))[:, None]
    outside = 1 - F.max_pool2d(obj, 5, 1, 2).gt(0.01).float()
    cands = [[t.replace(0, colour=col).caption() for col in world.COLOURS] for t in tgt]
    want = torch.tensor([list(world.COLOURS).index(t.objects[0].colour) for t in tgt])
    return ss, x, tgt, truth, outside, cands, want


@torch.no_grad()
def part_recon(pipe, n):
    c = pipe.model
    ss, x = data(n)
    z0 = c.vae.encode_latents(x)
    vae_only = c.vae.decode_latents(z0)
    den, empty = Denoiser(c.unet), constant(pipe.model.encode_prompt([""] * n, None, False))
    grid = {}
    for n_inv in STEPS:
        t0 = time.perf_counter()
        traj = invert(den, z0, empty, c.scheduler, n_inv, convention="source", progress=False)
        for n_inf in STEPS:
            z = ddim(den, traj.latents[-1], empty, c.scheduler, n_inf, progress=False)
            rec = c.vae.decode_latents(z)
            grid[f"{n_inv}/{n_inf}"] = dict(
                inversion_steps=n_inv, inference_steps=n_inf, latent_mse=(z - z0).square().mean().item(),
                mse=metrics.mse(rec, x).mean().item(), psnr=metrics.psnr(rec, x).mean().item(),
                psnr_to_vae=metrics.psnr(rec, vae_only).mean().item())
            print(f"recon {n_inv}/{n_inf}: {grid[f'{n_inv}/{n_inf}']}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = dict(scenes=n, seed=104, vae_only_psnr=metrics.psnr(vae_only, x).mean().item(), grid=grid)
    save("recon", out)
    return out


@torch.no_grad()
def part_tradeoff(pipe, n, guidances=(3.0,), source="empty"):
    c = pipe.model
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)
    ss, x, tgt, truth, outside, cands, want = edit_set(n)
    src_col = torch.tensor([list(world.COLOURS).index(s.objects[0].colour) for s in ss])
    z0 = c.vae.encode_latents(x)
    src_prompts = [""] * n if source == "empty" else [s.caption() for s in ss]
    traj = invert(Denoiser(c.unet), z0, constant(pipe.model.encode_prompt(src_prompts, None, False)), c.scheduler, 100,
                  convention="source", progress=False)
    base = scorer.classify(x, cands)
    rows = []
    for w in guidances:
        den = Denoiser(c.unet, w)
        cond = constant(pipe.model.encode_prompt([t.caption() for t in tgt], None, True))
        for lam in LAMBDAS:
            t0 = time.perf_counter()
            out = c.vae.decode_latents(direct.edit(den, traj, cond, c.scheduler, lam, progress=False))
            pred = scorer.classify(out, cands)
            row = dict(source=source, guidance=w, lam=lam, edit_success=(pred == want).float().mean().item(),
                       **judged(out, tgt),
                       kept_source_colour=(pred == src_col).float().mean().item(),
                       clip_score=scorer.score(out, [t.caption() for t in tgt]).mean().item(),
                       psnr_outside=metrics.psnr(out, x, outside).mean().item(),
                       ssim_outside=metrics.ssim(out, x, outside).mean().item(),
                       psnr_whole=metrics.psnr(out, x).mean().item(),
                       psnr_to_truth=metrics.psnr(out, truth).mean().item())
            rows.append(row)
            print(f"tradeoff {row}  ({time.perf_counter() - t0:.0f}s)", flush=True)
            if lam == 0.5 and w == guidances[0]:
                keep = out[:8]
    sheet = [(im, cap) for k in range(min(8, n)) for im, cap in
             ((images.to_pil(x[k:k + 1])[0], ss[k].caption()),
              (images.to_pil(keep[k:k + 1])[0], f"lambda 0.5, CFG {guidances[0]}: {tgt[k].caption()}"))]
    key = "tradeoff" if source == "empty" else "tradeoff_source_caption"
    images.save(images.contact_sheet(sheet, cell=128, columns=4), RESULTS / f"direct_inversion_edits_{source}.png")
    out = dict(scenes=n, seed=104, steps=100, source_prompt="" if source == "empty" else "the source caption",
               convention="source",
               clip_source_colour_accuracy=(base == src_col).float().mean().item(),
               clip_target_on_source=(base == want).float().mean().item(), rows=rows)
    save(key, out)
    return out


def part_nti(pipe, n):
    c = pipe.model
    ss, x = data(n)
    rows = []
    for k in range(n):
        cap = ss[k].caption()
        with torch.no_grad():
            cond = pipe.model.encode_prompt([cap], None, False)
            uncond = pipe.model.encode_prompt([""], None, False)
            t0 = time.perf_counter()
            traj = invert(Denoiser(c.unet), c.vae.encode_latents(x[k:k + 1]), constant(cond), c.scheduler, 50,
                          progress=False)
        row = {"scene": k, "inversion_s": time.perf_counter() - t0}
        for m in (("reference", "fast") if k % 2 == 0 else ("fast", "reference")):
            t0 = time.perf_counter()
            nt = null_text(Denoiser(c.unet, 7.5), traj, cond, uncond, c.scheduler, m, progress=False)
            row[f"{m}_s"] = time.perf_counter() - t0
            rec = pipe.reconstruct(nt, cap, output="pt", progress=False)
            row[f"{m}_psnr"] = metrics.psnr(rec, x[k:k + 1]).item()
        with torch.no_grad():
            plain = pipe.reconstruct(traj, cap, output="pt", progress=False)  # no CFG: the inversion's own ceiling
        row["no_cfg_psnr"] = metrics.psnr(plain, x[k:k + 1]).item()
        rows.append(row)
        print(f"nti {row}", flush=True)
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    total = lambda m: sum(r[f"{m}_s"] + r["inversion_s"] for r in rows)  # noqa: E731
    out = dict(scenes=n, seed=104, steps=50, guidance=7.5, note="times: null-text optimisation alone (same DDIM "
               "inversion for both, timed apart); *_with_inversion adds it", rows=rows,
               reference_psnr=mean("reference_psnr"), fast_psnr=mean("fast_psnr"), no_cfg_psnr=mean("no_cfg_psnr"),
               psnr_gap_db=mean("fast_psnr") - mean("reference_psnr"),
               reference_s_median=med("reference_s"), fast_s_median=med("fast_s"),
               time_ratio_median=statistics.median(r["fast_s"] / r["reference_s"] for r in rows),
               time_ratio_total=sum(r["fast_s"] for r in rows) / sum(r["reference_s"] for r in rows),
               time_ratio_with_inversion=total("fast") / total("reference"))
    save("nti", out)
    return out


RIVALS = {
    "direct λ 0": lambda p, x, s, t: p.edit(x, t, "", lam=0.0, **DI)[0],
    "direct λ 0.5": lambda p, x, s, t: p.edit(x, t, "", lam=0.5, **DI)[0],
    "direct λ 1": lambda p, x, s, t: p.edit(x, t, "", lam=1.0, **DI)[0],
    "direct x̃_T λ 0.5": lambda p, x, s, t: p.edit(x, t, "", lam=0.5, pairing="x_T", **DI)[0],
    "SDEdit 0.5": lambda p, x, s, t: p.img2img(x, t, strength=0.5, **QUIET),
    "SDEdit 0.75": lambda p, x, s, t: p.img2img(x, t, strength=0.75, **QUIET),
    "null-text + P2P": lambda p, x, s, t: p.prompt_to_prompt(x, t, s, **QUIET)[0],
    "DDIM inversion + P2P": lambda p, x, s, t: p.prompt_to_prompt(x, t, s, null_text=None, **QUIET)[0],
}
QUIET = dict(output="pt", progress=False)
DI = dict(steps=100, guidance=3.0, **QUIET)


def judged(x, scenes):
    """From the pixels (engine.judge): object 0 drawn in its colour, and every attribute of the scene drawn."""
    checked = [judge.check(judge.read(im), s) for im, s in zip((x.permute(0, 2, 3, 1).numpy() + 1) / 2, scenes)]
    return dict(judge_colour=float(np.mean([c["colour"][0] for c in checked])),
                judge_scene=float(np.mean([all(v for vs in judge.named(c).values() for v in vs) for c in checked])))


def part_rivals(pipe, n):
    scorer = metrics.Scorer.from_pretrained(DEFAULT_MODEL)
    ss, x, tgt, truth, outside, cands, want = edit_set(n)
    rows = []
    for name, run in RIVALS.items():
        out, secs = [], []
        for k in range(n):
            t0 = time.perf_counter()
            out.append(run(pipe, x[k:k + 1], ss[k].caption(), tgt[k].caption()).float())
            secs.append(time.perf_counter() - t0)
        out = torch.cat(out)
        row = dict(method=name, edit_success=(scorer.classify(out, cands) == want).float().mean().item(),
                   **judged(out, tgt),
                   psnr_outside=metrics.psnr(out, x, outside).mean().item(),
                   ssim_outside=metrics.ssim(out, x, outside).mean().item(),
                   psnr_to_truth=metrics.psnr(out, truth).mean().item(),
                   seconds_per_edit=statistics.median(secs))
        rows.append(row)
        print(f"rivals {row}", flush=True)
    out = dict(scenes=n, seed=104, source_edit="object 0 recoloured; prompts: the source and edited captions",
               judge_on_truth=judged(truth, tgt), rows=rows)
    save("rivals", out)
    return out


def plots():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = load()
    if "recon" in d:
        g = d["recon"]["grid"]
        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        diag = [g[f"{s}/{s}"] for s in STEPS]
        ax[0].plot(STEPS, [r["mse"] for r in diag], "o-")
        ax[0].set(xscale="log", xlabel="inversion = inference steps", ylabel="pixel MSE", title="Fig. 5 analogue")
        ax0 = ax[0].twinx()
        ax0.plot(STEPS, [r["psnr"] for r in diag], "s--", color="C1")
        ax0.set_ylabel("PSNR (dB)", color="C1")
        for n_inf in STEPS:
            ax[1].plot(STEPS, [g[f"{s}/{n_inf}"]["mse"] for s in STEPS], "o-", label=f"{n_inf} inference")
        ax[1].set(xscale="log", yscale="log", xlabel="inversion steps", ylabel="pixel MSE", title="Fig. 6 analogue")
        ax[1].legend(fontsize=7)
        m = np.array([[g[f"{a}/{b}"]["psnr"] for b in STEPS] for a in STEPS])
        im = ax[2].imshow(m, origin="lower")
        ax[2].set(xticks=range(5), yticks=range(5), xticklabels=STEPS, yticklabels=STEPS, xlabel="inference steps",
                  ylabel="inversion steps", title="Fig. 8 analogue: PSNR (dB)")
        for i in range(5):
            for j in range(5):
                ax[2].text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax[2])
        fig.tight_layout()
        fig.savefig(RESULTS / "direct_inversion_recon.png", dpi=100)
    if "tradeoff" in d:
        rows = d["tradeoff"]["rows"] + d.get("tradeoff_source_caption", {}).get("rows", [])
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for src, w in sorted({(r.get("source", "empty"), r["guidance"]) for r in rows}):
            rs = [r for r in rows if r["guidance"] == w and r.get("source", "empty") == src]
            w = f"{w}, source " + ("caption" if src == "caption" else '""')
            lams = [r["lam"] for r in rs]
            ax[0].plot(lams, [100 * r["edit_success"] for r in rs], "o-", label=f"edit success, CFG {w}")
            ax[0].plot(lams, [r["psnr_outside"] for r in rs], "s--", label=f"PSNR outside object (dB), CFG {w}")
            ax[1].plot([r["psnr_outside"] for r in rs], [100 * r["edit_success"] for r in rs], "o-", label=f"CFG {w}")
            for r in rs:
                ax[1].annotate(f"λ {r['lam']}", (r["psnr_outside"], 100 * r["edit_success"]), fontsize=7)
        ax[0].set(xlabel="noise merge λ", title="Fig. 7 analogue")
        ax[0].legend(fontsize=7)
        ax[1].axvline(25, color="gray", lw=0.5)
        ax[1].axhline(80, color="gray", lw=0.5)
        ax[1].set(xlabel="fidelity: PSNR outside the edited object (dB)", ylabel="edit success (%)",
                  title="editability vs fidelity")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "direct_inversion_tradeoff.png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=["recon", "tradeoff", "nti", "rivals"],
                    default=["recon", "tradeoff", "nti", "rivals"])
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--nti-scenes", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="CFG scales of the λ sweep")
    ap.add_argument("--source", choices=["empty", "caption"], default="empty",
                    help="inversion prompt of the λ sweep: \"\" (Direct Inversion's default) or the source caption")
    args = ap.parse_args()
    global STAMP
    STAMP = stamp("bench_direct.py")
    torch.manual_seed(0)
    pipe = engine.load()
    for part in args.only:
        if part == "recon":
            part_recon(pipe, args.scenes)
        elif part == "tradeoff":
            part_tradeoff(pipe, args.scenes, tuple(args.guidance), args.source)
        elif part == "rivals":
            part_rivals(pipe, args.scenes)
        else:
            part_nti(pipe, args.nti_scenes)
        plots()


if __name__ == "__main__":
    main()
