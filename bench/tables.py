"""The docs' number tables, generated from bench/results/*.json: never edit them by hand.

    python bench/tables.py            # rewrite every table region in place
    python bench/tables.py --check    # change nothing; exit 1 if any file would change

A region is `<!-- table:NAME -->` ... `<!-- /table:NAME -->` in README.md, bench/README.md or
weights/README.md, NAME one of TABLES; everything between the markers is replaced.
"""
import argparse
import json
import math
import re
import statistics as st
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "weights" / "README.md"]
REGION = re.compile(r"(<!-- table:([\w-]+) -->\n).*?(<!-- /table:\2 -->)", re.S)
TABLES = {}


def table(name, srcs, *cmds):
    """Register fn(*jsons) -> markdown as NAME. Its footer names the JSON files and the commands
    that wrote them ({key} is filled from the first file; a recorded "command" or "commit" wins)."""
    def reg(fn):
        TABLES[name] = (fn, srcs.split(), cmds)
        return fn
    return reg


def load(src):
    return json.loads((ROOT / "bench" / "results" / src).read_text())


def md(head, rows):
    line = lambda r: "| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |"
    return "\n".join([line(head), "|" + "---|" * len(head)] + [line(r) for r in rows])


def f(x, n=2, sign=""):
    return "" if x is None else f"{x:{sign}.{n}f}".replace("-", "−")


def pct(x, n=0):
    return f"{100 * x:.{n}f}%"


def paired(a, b, n=2, short=False):
    """Mean ± standard error of a − b over paired items, and on how many a is the larger."""
    d = [x - y for x, y in zip(a, b)]
    se = st.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    k = sum(v > 0 for v in d)
    return f"{f(st.mean(d), n, '+')} ± {f(se, n)}" + (f" ({k}/{len(d)})" if short else
                                                    f"; better on {k} of {len(d)}")


@table("headline", "tiny_gates.json tiny_vs_diffusers_cpu.json unet_step_cpu_float32.json "
       "direct_inversion.json iterinv.json blended.json multires.json")
def headline(g, t, u, d, it, b, m):
    lam = next(r for r in d["tradeoff"]["rows"] if r["lam"] == 0.5)
    fast, vae = it["table_256"]["rows"]["fast"], it["table_256"]["rows"]["vae"]
    bl, cl = b["size_1024_dilated"], m["fig3"]["baselines"]
    def on(j):  # the embedded model version a result was measured on
        v = j.get("model_version")
        return f"tiny {v['tiny']}" if isinstance(v, dict) else "—"

    return md(["what", "measure", "result", "model"], [
        ["embedded base model", "named-object colour / shape, read from the pixels (template; free phrasing)",
         f"{pct(g['base']['colour'], 1)} / {pct(g['base']['shape'], 1)}; "
         f"{pct(g['base']['colour_free'], 1)} / {pct(g['base']['shape_free'], 1)}", on(g["base"])],
        ["`generate` vs diffusers, embedded model", "max pixel difference; time ours / diffusers",
         f"{f(t['max_abs_pixel_diff'] * 255, 3)}/255; {f(t['ratio_ours_over_diffusers'])}", on(t)],
        ["SD1.5 UNet, one CFG step (CPU)", "time ours / diffusers",
         f(u["ratio_ours_over_diffusers"], 3), on(u)],
        ["Direct Inversion, λ 0.5, CFG 3", "edit success; PSNR outside the object",
         f"{pct(lam['edit_success'])}; {f(lam['psnr_outside'], 1)} dB", on(d["tradeoff"])],
        ["null-text inversion, fast vs reference", "time fast / reference; PSNR gap",
         f"{f(d['nti']['time_ratio_median'])}; {f(d['nti']['psnr_gap_db'], 2, '+')} dB", on(d["nti"])],
        ["IterInv fast, 64² → 256²", "PSNR vs the VAE ceiling; solve time fast / paper",
         f"{f(fast['psnr'])} vs {f(vae['psnr'])} dB; "
         f"{f(it['timing_256']['median_fast_over_paper'], 3)}", on(it["table_256"])],
        ["multi-stage blended diffusion, 1024², dilated masks",
         "PSNR in the mask: defaults / MSBD's settings / stage 1 + bicubic; recoloured (pixels): defaults / MSBD's",
         " / ".join(f(bl["summary"][k]["psnr_mask"]) for k in ("ours", "msbd", "bicubic")) + " dB; "
         + " / ".join(pct(bl["summary"][k]["judge_colour"]) for k in ("ours", "msbd")), on(bl)],
        ["multiresolution textual inversion", "stripes of a learned striped star, read from the pixels: `<C>` / "
         "one-vector TI / the planted word (ceiling); training speed",
         " / ".join(pct(cl[k]["stripes"]) for k in ("native <C>", "one vector (textual inversion)",
                                                  "planted <stripes> (the ceiling)"))
         + f"; {f(m['speed']['ratio_ours_over_diffusers'])}× the diffusers loop",
         f"tiny-stripes {m['fig3']['model_version']['tiny-stripes']}"]])


GATE_ROWS = [  # (part, key, what, unit): unit "%" for a share, "dB", "/255" for a difference of pixel values
    ("clip", "colour", "tiny CLIP: colour of the named object, template captions", "%"),
    ("clip", "shape", "tiny CLIP: shape of the named object, template captions", "%"),
    ("clip", "colour_free", "tiny CLIP: colour of the named object, held-out free phrasings", "%"),
    ("clip", "shape_free", "tiny CLIP: shape of the named object, held-out free phrasings", "%"),
    ("vae", "psnr_64", "VAE round trip: 64² renders", "dB"),
    ("vae", "psnr_256", "VAE round trip: 256² renders", "dB"),
    ("vae", "psnr_photo_64", "VAE round trip: held-out photos, 64² crops", "dB"),
    ("vae", "psnr_photo_256", "VAE round trip: held-out photos, 256² crops", "dB"),
    ("base", "colour", "base model, template captions: colour of each named object", "%"),
    ("base", "shape", "base model, template captions: shape of each named object (in its colour)", "%"),
    ("base", "bg_colour", "base model, template captions: background colour", "%"),
    ("base", "size", "base model, template captions: size of each named object", "%"),
    ("base", "position", "base model, template captions: place of each named object", "%"),
    ("base", "colour_free", "base model, held-out free phrasings: colour of each named object", "%"),
    ("base", "shape_free", "base model, held-out free phrasings: shape of each named object (in its colour)", "%"),
    ("base", "bg_colour_free", "base model, held-out free phrasings: background colour, where named", "%"),
    ("base", "size_free", "base model, held-out free phrasings: size, where named", "%"),
    ("base", "position_free", "base model, held-out free phrasings: place, where named", "%"),
    ("base", "border_excess", "base model: border frame on plain backgrounds, minus the true renders'", "/255"),
]


@table("gates", "tiny_gates.json", "python bench/bench_tiny.py")
def gates(j):
    def val(part, key, unit):
        stem, free = (key[:-5], "_free") if key.endswith("_free") else (key, "")
        v, by = j[part][key], j[part].get(f"{stem}_by_objects{free}")
        if unit == "%":
            out = pct(v, 1)
            if by and None not in (by.get("1"), by.get("2")):
                out += f" (1 object {pct(by['1'], 1)}, 2 objects {pct(by['2'], 1)})"
            return out
        return f"{f(v * 255, 2)}/255" if unit == "/255" else f"{f(v)} dB"

    def bound(part, key, unit):
        g = j[part]["gates"].get(key)
        if not g:
            return "(report only)", ""
        op, num = g["bound"].split()
        num = float(num)
        text = {"%": pct(num), "/255": f"{f(num * 255, 0)}/255"}.get(unit, f"{f(num, 0)} dB")
        return f"{op} {text}", "pass" if g["pass"] else "**fail**"

    rows = [[what, val(part, key, unit), *bound(part, key, unit)]
            for part, key, what, unit in GATE_ROWS if part in j and key in j[part]]
    sr = j.get("sr", {})
    for suffix, what in (("", "64² → 256²"), ("_1024", "256² → 1024², in tiles")) if sr else ():
        rows.append([f"x4 {what}, back-projected (`--backproject 3`): vs the true render, minus bicubic "
                     f"back-projected the same way (plain bicubic {f(sr['psnr_bicubic' + suffix])} dB)",
                     f"{f(sr['psnr_sr' + suffix])} − {f(sr['psnr_bicubic_backprojected' + suffix])} = "
                     f"{f(sr['gain_db' + suffix], 2, '+')} dB", *bound("sr", "gain_db" + suffix, "dB")])
        rows.append([f"x4 {what}: edge sharpness (gradient on the true edges, share of the truth's)",
                     f"{pct(sr['sharpness_sr' + suffix])} (bicubic {pct(sr['sharpness_bicubic' + suffix])}, "
                     f"back-projected {pct(sr['sharpness_bicubic_backprojected' + suffix])})",
                     *bound("sr", "sharpness_sr" + suffix, "%")])
    rows += [["x4 64² → 256²: the plain sample, diffusers' StableDiffusionUpscalePipeline output",
              f"{f(sr['psnr_sr_plain'])} dB, sharpness {pct(sr['sharpness_sr_plain'])}", "(report only)", ""],
             ["x4 64² → 256²: VAE round trip of the true render (its ceiling)",
              f"{f(sr['psnr_vae_roundtrip'])} dB", "(report only)", ""]] if sr else []
    return md(["gate", "measured", "bound", ""], rows)


@table("vs-diffusers", "unet_step_cpu_float32.json tiny_vs_diffusers_cpu.json",
       "python bench/bench_unet.py --repeats {repeats} --warmup 2",
       "python bench/bench_tiny_vs_diffusers.py --repeats 7")
def vs_diffusers(u, t):
    gf = u["gflops_achieved"]
    return md(["", "ours s", "diffusers s", "ours / diffusers", "goal", "max difference"], [
        [f"SD1.5 UNet, one CFG step, random weights ({u['repeats']} runs; GFLOP/s ours "
         f"{f(gf['ours'], 1)}, diffusers {f(gf['diffusers'], 1)})",
         f(u["median_s"]["ours"]), f(u["median_s"]["diffusers"]),
         f"{f(u['ratio_ours_over_diffusers'], 3)} (paired {f(u['median_of_paired_ratios'], 3)})",
         "", f"{u['max_abs_diff_vs_diffusers']:.1e}"],
        [f"embedded model, `generate`, 50 steps, compiled graphs ({len(t['seconds']['ours'])} runs; "
         f"compiled once in {f(t['compile_s'], 0)} s)",
         f(t["median_s"]["ours"], 3), f(t["median_s"]["diffusers"], 3),
         f(t["ratio_ours_over_diffusers"]), f"≤ {f(t['goal_ratio'])}",
         f"{f(t['max_abs_pixel_diff'] * 255, 3)}/255"],
        ["the same, eager (`ENGINE_COMPILE=off`)", f(t["median_s"]["ours_eager"], 3),
         f(t["median_s"]["diffusers"], 3), f(t["ratio_eager_over_diffusers"]), "",
         f"{f(t['max_abs_pixel_diff_eager'] * 255, 3)}/255"]])


def vendor(cpu_name):
    """'Intel ' or 'AMD ' from a CPU's model name (the docs name no CPU model), else ''."""
    return next((v + " " for v in ("Intel", "AMD") if v in cpu_name), "")


@table("cpu-peers", "cpu_peers.json", "python bench/bench_cpu_peers.py")
@table("cpu-peers-epyc", "cpu_peers_epyc.json",
       "python bench/bench_cpu_peers.py --out bench/results/cpu_peers_epyc.json")
def cpu_peers(j):
    ov = j["openvino_inference_precision"]
    label = {"ours": "ours, fp32", "ours_bf16": "ours, bf16", "diffusers": "diffusers, fp32",
             "onnxruntime": "ONNX Runtime, fp32", "openvino_f32": "OpenVINO, f32 hint",
             "openvino_default": f"OpenVINO, default hint ({ov.get('openvino_default', '')})"}
    setup = {"ours": "ours_load_s", "ours_bf16": "ours_bf16_load_s", "diffusers": "diffusers_load_s",
             "onnxruntime": "onnxruntime_session_s", "openvino_f32": "openvino_f32_compile_s",
             "openvino_default": "openvino_default_compile_s"}
    med, runs = j["median_s"], j["seconds"]

    def ratio(ours, k):  # of the medians, and (in brackets) the median of the rounds' own ratios
        if ours not in med:
            return ""
        rounds = st.median(a / b for a, b in zip(runs[ours], runs[k]))
        return f"{f(med[ours] / med[k])} ({f(rounds)})"
    rows = [[label[k], f(v), f(j["gflop_per_step"] / v, 1), ratio("ours", k), ratio("ours_bf16", k),
             f"{j['max_rel_diff_vs_ours_fp32'][k]:.1e}", f(j["one_time_s"][setup[k]], 1)] for k, v in med.items()]
    return (md(["runner", "median s", "GFLOP/s", "ours fp32 / runner", "ours bf16 / runner",
                "max difference (relative)", "load or compile s"], rows)
            + f"\n\n{vendor(j['cpu'])}CPU {'with' if j['native_bf16'] else 'without'} native bf16, "
            f"{j['threads']} threads; "
            f"{len(j['seconds']['ours'])} alternating runs each, one of every runner per round (in "
            "brackets: the median of the rounds' own ratios, which a drift in the machine's speed moves "
            "less); "
            f"{f(j['gflop_per_step'], 0)} GFLOP per step; the ONNX export (done once, then cached) "
            + (f"took {f(export, 0)} s" if (export := j["one_time_s"].get("onnx_export_s")) else "was a cached one")
            + f"; peak RSS of the process, memory-mapped weight files "
            f"included: {f(j['peak_rss_gib'], 1)} GiB.")


@table("direct-recon", "direct_inversion.json", "python bench/bench_direct.py --only recon")
def direct_recon(j):
    g, s = j["recon"]["grid"], (10, 20, 50, 100, 200)
    diag = [[k, f(g[f"{k}/{k}"]["psnr"], 1), f(g[f"{k}/{k}"]["psnr_to_vae"], 1)] for k in s]
    diag.append(["VAE round trip alone", f(j["recon"]["vae_only_psnr"], 1), ""])
    return md(["steps (inversion = inference)", "PSNR to the input (dB)",
               "PSNR to the VAE's reconstruction (dB)"], diag) + "\n\n" + md(
        ["PSNR to the input: inversion \\ inference steps", *s],
        [[i, *(f(g[f"{i}/{k}"]["psnr"], 1) for k in s)] for i in s])


@table("direct-nti", "direct_inversion.json", "python bench/bench_direct.py --only nti")
def direct_nti(j):
    n = j["nti"]
    ratios = (f"{f(n['time_ratio_median'])} (median per image), {f(n['time_ratio_total'])} "
              f"(total), {f(n['time_ratio_with_inversion'])} (counting the shared DDIM inversion)")
    return md(["method", "reconstruction PSNR (dB)", "median optimisation time per image (s)"], [
        ["reference (P2P's `NullInversion`)", f(n["reference_psnr"]),
         f(n["reference_s_median"], 1)],
        ["fast (ours)", f(n["fast_psnr"]), f(n["fast_s_median"], 1)],
        ["fast / reference", f(n["psnr_gap_db"], 2, "+"), ratios],
        ["no optimisation, sampled without CFG", f(n["no_cfg_psnr"]), ""]])


@table("direct-tradeoff", "direct_inversion.json", "python bench/bench_direct.py --only tradeoff",
       "python bench/bench_direct.py --only tradeoff --source caption")
def direct_tradeoff(j):
    rows = []
    for key, src in (("tradeoff", '""'), ("tradeoff_source_caption", "caption")):
        t = j[key]["rows"]
        rows.append([f"edit success (source {src})", *(pct(r["edit_success"]) for r in t)])
        rows.append([f"recoloured, from the pixels (source {src})", *(pct(r["judge_colour"]) for r in t)])
        rows.append([f"PSNR outside, dB (source {src})", *(f(r["psnr_outside"], 1) for r in t)])
    lam = [f"**{r['lam']:g}**" if r["lam"] == 0.5 else f"{r['lam']:g}" for r in t]
    return md(["λ (CFG 3)", *lam], rows)


@table("direct-rivals", "direct_inversion.json", "python bench/bench_direct.py --only rivals")
def direct_rivals(j):
    r, truth = j["rivals"], j["rivals"]["judge_on_truth"]
    rows = [[x["method"], pct(x["edit_success"]), pct(x["judge_colour"]), pct(x["judge_scene"]),
             f(x["psnr_outside"], 1), f(x["ssim_outside"], 3), f(x["psnr_to_truth"], 1),
             f(x["seconds_per_edit"], 1)] for x in r["rows"]]
    rows.append(["the true edit (re-rendered)", "", pct(truth["judge_colour"]),
                 pct(truth["judge_scene"]), "", "", "", ""])
    return md(["method", "edit success (tiny CLIP)", "recoloured (pixels)", "whole scene right (pixels)",
               "PSNR outside (dB)", "SSIM outside", "PSNR to the true edit (dB)", "s per edit"], rows)


@table("iterinv-edit-zt", "iterinv.json", "python bench/bench_iterinv.py --edit-zt --scenes 20",
       "python bench/bench_iterinv.py --edit-zt --size 1024 --scenes 6")
def iterinv_edit_zt(j):
    out, truth = "psnr_outside_object", "psnr_to_ground_truth_edit"
    rows = []
    for size in (256, 1024):
        t = j[f"edit_zt_{size}"]
        ref = t["rows"]["IterInv"]["per_scene"]
        for name, r in t["rows"].items():
            d = name != "IterInv"
            rows.append([f"{size}² ({t['scenes']} scenes)", name, f(r["reconstruction_psnr"]), pct(r["success"]),
                         pct(r["judge_colour"]), pct(r["judge_scene"]), f(r[out]),
                         paired(r["per_scene"][out], ref[out]) if d else "", f(r["ssim_outside_object"], 3),
                         f(r[truth]), paired(r["per_scene"][truth], ref[truth]) if d else "",
                         f(r["sharpness_to_truth"])])
    return md(["size", "z_T of the ×4 stage", "its reconstruction (dB)", "success (tiny CLIP)", "recoloured (pixels)",
               "whole scene right (pixels)", "outside (dB)", "Δ vs IterInv", "SSIM outside",
               "to the world's edit (dB)", "Δ vs IterInv", "edge sharpness vs the world's edit"], rows)


ITERINV = {"vae": "VAE round trip (the ceiling)", "ddim-all": "DDIM, all stages (reference's)",
           "ddim-sr": "DDIM, SR stages only", "ddim-fair": "fair DDIM (v-aware, same ĉ)",
           "fast": "IterInv fast (ours)", "paper": "IterInv paper"}


@table("iterinv", "iterinv.json", "python bench/bench_iterinv.py --size 256 --scenes 20 "
       "--paper-scenes 20", "python bench/bench_iterinv.py --size 1024 --scenes 5 --methods fast "
       "ddim-all ddim-sr ddim-fair", "python bench/bench_iterinv.py --timing")
def iterinv(j):
    rows = []
    for size in (256, 1024):
        t = j[f"table_{size}"]
        for key, label in ITERINV.items():
            if key not in t["rows"]:
                continue
            r, p = t["rows"][key], t["per_scene"]
            d = [a - b for a, b in zip(p[key]["psnr"], p["vae"]["psnr"])]
            gap = f"{f(min(d), 3, '+')} … {f(max(d), 3, '+')}" if key != "vae" else ""
            rows.append([f"{size}²", label, f"{r['mse']:.2e}", f(r["psnr"]), f(r["ssim"], 3),
                         f(r["clip"], 1), gap,
                         r.get("sr_evals", ""), r.get("batch", r.get("scenes", "")),
                         f(r.get("sr_solve_seconds"), 0)])
    t = j["timing_256"]
    s = {m: st.median(r["seconds"] for r in t["runs"] if r["mode"] == m) for m in ("fast", "paper")}
    n = {r["mode"]: r["evals"] for r in t["runs"] if "evals" in r}
    rows.append(["256²", "fast / paper, timed alone (`--timing`)", *[""] * 5,
                 f"{n['fast']} / {n['paper']}", t["batch"],
                 f"{f(s['fast'], 1)} / {f(s['paper'], 1)}: {f(t['median_fast_over_paper'], 3)}"])
    return md(["size", "row", "MSE", "PSNR", "SSIM", "CLIP", "PSNR − ceiling, per scene",
               "SR-stage UNet calls", "scenes per call", "solve s"], rows)


@table("iterinv-edits", "iterinv.json", "python bench/bench_iterinv.py --edit-table --scenes 20",
       "python bench/bench_iterinv.py --edit-table --size 1024 --scenes 10")
def iterinv_edits(j):
    rows, out, truth = [], "psnr_outside_object", "psnr_to_ground_truth_edit"
    for t in (j["edit_table_256"], j["edit_table_1024"]):
        ref, bp = t["rows"]["reference"], t["rows"]["backproject-3"]
        inv = f(t["reconstruction_psnr"])
        size = f"{t['size']}² ({t['scenes']}; inversion {inv} dB; model {t['model_version']['tiny']})"
        for name, r in (("reference", ref), ("`--backproject 3`", bp)):
            d = [paired(bp["per_scene"][k], ref["per_scene"][k]) if r is bp else ""
                 for k in (out, truth)]
            rows.append([size, name, pct(r["success"]), f(r[out]), d[0], f(r[truth]), d[1],
                         f(r["clip_edit_prompt"], 1)])
    return md(["size (scenes; inversion; model)", "edit", "success", "outside (dB)", "Δ vs reference (mean ± s.e.)",
               "to the world's edit (dB)", "Δ vs reference", "CLIP"], rows)


BLENDED = {"msbd": "MSBD", "msbd-x4": "MSBD, ×4 stages", "msbd-nocfg": "MSBD, no CFG in the stages",
           "msbd-ownstart": "MSBD, starts on the ×4 model's schedule", "msbd-backproject": "MSBD + back-projection",
           "msbd-nolowpass": "MSBD, no low-pass", "ours": "the defaults (all four of ours)",
           "sr-only": "stage 1 + ×4 SR only", "bicubic": "stage 1 + bicubic", "direct-1": "direct, 1 candidate",
           "direct-equal": "direct, stage 1's settings", "truth": "the true edit, pasted in the mask"}
MASKS = ("object", "dilated", "box")


def blended_parts(j, size):
    return [j.get(f"size_{size}_{m}") for m in MASKS]


@table("blended", "blended.json", "python bench/bench_blended.py --size 256 1024 --scenes 8 --direct-scenes 2")
def blended(j):
    out = []
    for size in (256, 1024):
        parts = blended_parts(j, size)
        rows = []
        for k, label in BLENDED.items():
            if k not in parts[0]["summary"]:
                continue
            cells = []
            for p in parts:
                r = p["summary"][k]
                psnr = f(r["psnr_mask"]) if k != "truth" else "∞"  # the truth pasted: no error in the mask
                cells += [psnr, f(r["sharpness"]), f(r["edge_energy"]), pct(r["judge_colour"])]
            r = parts[0]["summary"][k]
            secs = (f(r["seconds"], 0) if "seconds" in r else
                    f"+{f(r['seconds_after_stage1'], 0)}" if "seconds_after_stage1" in r else "")
            n = "" if r["scenes"] == parts[0]["scenes"] else f" ({r['scenes']} scenes)"
            rows.append([label + n, *cells, secs])
        stage1 = [r["stage1_seconds"] for p in parts for r in p["per_scene"] if "stage1_seconds" in r]
        stage1 = f"{f(st.median(stage1), 0)} s (median)" if stage1 else "the 256² runs'"
        out.append(f"**{size}²**, {parts[0]['scenes']} scenes; stage 1: {stage1}\n\n" + md(
            ["row", *[f"{m}: {x}" for m in MASKS
                      for x in ("PSNR in mask", "sharpness", "edge energy", "recoloured")],
             "s (after stage 1)"], rows))
    return "\n\n".join(out)


BLENDED_PAIRS = (("msbd", "bicubic"), ("ours", "bicubic"), ("sr-only", "bicubic"), ("msbd", "direct-1"),
                 ("msbd", "direct-equal"), *((k, "msbd") for k in ("msbd-x4", "msbd-nocfg", "msbd-ownstart",
                                                                  "msbd-backproject", "msbd-nolowpass", "ours")))


@table("blended-paired", "blended.json", "python bench/bench_blended.py --size 256 1024 --scenes 8 --direct-scenes 2")
def blended_paired(j):
    metrics = (("PSNR in mask (dB)", lambda r: r["psnr_mask"], 2), ("sharpness", lambda r: r["sharpness"], 3),
               ("edge-energy error", lambda r: abs(math.log(r["edge_energy"])), 3))
    rows = []
    for size in (256, 1024):
        parts = blended_parts(j, size)
        for a, b in ((a, b) for a, b in BLENDED_PAIRS if a in parts[0]["summary"] and b in parts[0]["summary"]):
            cells = []
            for _, get, n in metrics:
                for p in parts:
                    pairs = [(get(r[a]), get(r[b])) for r in p["per_scene"] if a in r and b in r]
                    cells.append(paired(*zip(*pairs), n, short=True))
            rows.append([f"{size}²", f"{BLENDED[a]} − {BLENDED[b]}", *cells])
    return md(["size", "a − b, paired over the scenes", *[f"Δ {x}, {m} mask" for x, _, _ in metrics
                                                          for m in MASKS]], rows)


@table("blended-rss", "blended.json", "python bench/bench_blended.py --rss 2048 1024 2048:512")
def blended_rss(j):
    return md(["command", "output", "peak RSS (GiB)", "s", "s per stage", "tiles run"], [
        [f"`{r['command']}`", f"{r['size']}²", f(r["peak_rss_gib"]), f(r["seconds"], 0),
         " / ".join(f(s["seconds"], 0) for s in r["stages"]),
         ", ".join(f"stage {s['stage']}: {s['tiles'] - s['skipped_tiles']} of {s['tiles']}"
                   for s in r["stages"] if s.get("tiles", 1) > 1)] for r in j["rss"]])


def _seen(r):
    return f"{pct(r['stripes'])} ({pct(r['shape'])} / {pct(r['drawn'])})"


@table("multires-model", "multires.json", "python bench/bench_multires.py --part model")
def multires_model(j):
    m = j["model"]
    return md(["model, captions", "colour", "shape", "stripes right: striped objects", "no stripes: plain objects"],
              [[k.replace("<stripes>", "`<stripes>`"), *(pct(v[c]) for c in ("colour", "shape", "striped object",
                                                                             "plain object"))]
               for k, v in m["rates"].items()])


@table("multires-fig3", "multires.json", "python bench/bench_multires.py --part fig3")
def multires_fig3(j):
    t, b = j["fig3"]["table"], j["fig3"]["baselines"]
    mode = {"fixed": "fixed `<C|i|>`", "semi": "semi `<C(i)>`", "fully": "fully `<C[i]>`"}
    return md(["mode: stripes right (star / both)", *(f"i = {i}" for i in t["fixed"])],
              [[mode[m], *map(_seen, t[m].values())] for m in t]) + "\n\n" + md(
        ["baseline", "prompt", "stripes right (star / both)"],
        [[k.replace("<C>", "`<C>`").replace("<stripes>", "`<stripes>`"), f"`{v['prompt']}`", _seen(v)]
         for k, v in b.items()] + [["the 4 concept renders", "", _seen(j["fig3"]["concept_renders"])]])


@table("multires-compose", "multires.json", "python bench/bench_multires.py --part compose")
def multires_compose(j):
    rows = j["compose"]["rows"]
    return md(["row", "prompt", "star: stripes right", "square: stripes right", "both in one sample"],
              [[k.replace("<", "`<").replace(">", ">`"), f"`{v['prompt']}`",
                *(map(pct, v["objects_striped"]) if len(v["objects_striped"]) == 2 else
                  ["", pct(v["objects_striped"][0])]),
                pct(v["all_striped"]) if len(v["objects_striped"]) == 2 else ""]
               for k, v in rows.items()])


@table("multires-speed", "multires.json", "python bench/bench_multires.py --part speed")
def multires_speed(j):
    s = j["speed"]
    med = s["median_steps_per_s"]
    return md([f"loop (batch {s['batch']} at {s['resolution']}², {s['threads']} threads)",
               f"steps/s (median of {s['repeats']})", "÷ diffusers loop", "ours ÷ this"],
              [[k, f(v), f"{f(v / med['diffusers'])}×", f"{f(med['ours'] / v)}×"]
               for k, v in med.items()])


@table("tiled-vae", "tiled_vae.json", "python bench/bench_tiled_vae.py",
       "python bench/bench_tiled_vae.py --only rss --sizes 2048 4096",
       "python bench/bench_tiled_vae.py --only sd_rss --sizes 2048")
def tiled_vae(j):
    cases = (("SD-VAE-architecture decode, random weights", j["sd"], "decode"),
             ("the same, buffer 1/16 (the layers 2048² keeps)", j["sd"], "decode_buffer_1_16"),
             ("tiny VAE decode", j["tiny"], "decode"), ("tiny VAE encode", j["tiny"], "encode"))
    exact = [[f"{label}, {c['output_px']}²", c[p]["tile_latent_px"],
              *(f"{c[p][k]:.1e}" for k in ("max_abs_diff", "untiled_vs_fp64", "tiled_vs_fp64")),
              f(c[p]["untiled_s"], 1), f(c[p]["tiled_s"], 1), f(c[p]["tiled_s"] / c[p]["untiled_s"])]
             for label, c, p in cases]
    r, run = j["rss"], lambda v: f"{v['peak_rss_mib']} MiB ({f(v['seconds'], 0)} s)"
    sd = [[f"SD-VAE-architecture decode, {v['output_px']}²", run(v), "not run", f"{v['rss_before_decode_mib']} MiB"]
          for k, v in sorted(j.get("sd_rss", {}).items()) if isinstance(v, dict) and "peak_rss_mib" in v]
    return md(["max abs difference", "tile (latent px)", "tiled vs untiled", "untiled vs float64",
               "tiled vs float64", "untiled s", "tiled s", "tiled / untiled"], exact) + "\n\n" + md(
        ["decode", "tiled: peak RSS (s)", "untiled: peak RSS (s)", "RSS before decoding"],
        [[f"tiny VAE, {px}²", run(r[f"tiled_{px}"]), run(r[f"untiled_{px}"]),
          f"{r[f'tiled_{px}']['rss_before_decode_mib']} MiB"]
         for px in sorted({v["output_px"] for v in r.values() if isinstance(v, dict) and "output_px" in v})] + sd)


@table("memory", "memory.json", "{command}")
def memory_table(j):
    mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    return md(["case (fp32, CPU)", "latent", "batch", "measured peak MB", "estimate MB",
               "estimate / measured", "with the overhead"],
              [[c["case"] + (f" in {j['tile_latent_px']}² latent tiles" if "tiled" in c["case"]
                             else ""), f"{c['latent']}²", c["batch"], mb(c["measured_bytes"]),
                mb(c["estimate_bytes"]), f(c["ratio"]), f(c["check_ratio"])] for c in j["cases"]])


@table("first-prompts", "tiny_gates.json", "python bench/bench_tiny.py --only base")
def first_prompts(j):
    return md(["prompt", "images showing everything it names", "a training caption"],
               [[f"`{t}`", pct(v["shows_all"]), "yes" if v["a_training_caption"] else "no"]
                for t, v in j["base"]["first_prompts"].items()])


@table("recipe-times", "recipe_times.json", "{command}")
def recipe_times(j):
    def hm(s):
        if s < 3600:
            return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"
        return f"{int(s // 3600)} h" + (f" {int(s % 3600 // 60):02d} min" if s % 3600 >= 60 else "")

    rows = [[f"`{name}`", hm(t["seconds"]), t["runs"],  # the CPU is in the JSON
             f'{t["machine"].rsplit(", ", 1)[-1]}, {t.get("precision", "fp32")}'] for name, t in j["stages"].items()]
    total, target = j["total_seconds"], j["target_seconds"]
    verdict = (f"within the recipe's {hm(target)} target" if total <= target else
               f"{hm(total - target)} over the recipe's {hm(target)} target")
    return md(["stage", "wall time", "runs (resumed)", "threads, training precision"],
              rows + [["all", f"{hm(total)}, {verdict}", "", ""]])


@table("recipe-steps", "recipe_steps.json", "python bench/bench_recipe_steps.py")
def recipe_steps(j):
    sp, q = j["speed"], j["quality"]
    rows = [[name, f"{r['median_s']['fp32']:.3f} s", f"{r['median_s']['bf16']:.3f} s", f(r["ratio_bf16_over_fp32"])]
            for name, r in sp["models"].items()]
    speed = md(["training step", "fp32", "bf16 autocast", "bf16 / fp32"], rows)
    steps = [c["step"] for c in q["runs"]["fp32"]["curve"]]
    rows = [[p, *(f"{c['held_out']:.4f} ({c['held_out_ema']:.4f})" for c in r["curve"]),
             f"{r['seconds_per_step']:.3f} s"] for p, r in q["runs"].items()]
    quality = md(["base UNet from one initialisation", *(f"step {k}" for k in steps), "per step"], rows)
    native = ", ".join(sp["native_bf16"]) or "none"
    return (f"{speed}\n\nThe CPU's native bf16 instructions: {native}; {sp['threads']} threads, median of "
            f"{sp['repeats']} rounds of {sp['steps']} steps, alternating. Held-out v-loss of the base UNet "
            f"(its EMA's in brackets) on {q['held_out_scenes']} scenes of another seed, trained on "
            f"{q['train_scenes']} scenes:\n\n{quality}")


@table("samplers", "samplers.json", "{command}")
def samplers(j):
    steps = [k for k in next(v for k, v in j["table"].items() if k != "reference")]
    ref = j["table"]["reference"]
    cell = lambda r: f"{f(r['psnr'], 1)} dB · {pct(r['colour'])} / {pct(r['shape'])}"  # noqa: E731
    rows = [[f"`{s}`" + (" (fresh noise)" if t[steps[0]]["stochastic"] else ""), *map(cell, t.values()),
             "none" if j["matches_ddim_50_at"][s] is None else
             f"{j['matches_ddim_50_at'][s]} steps ({t[str(j['matches_ddim_50_at'][s])]['unet_calls']} UNet calls)"]
            for s, t in j["table"].items() if s != "reference"]
    rows.append([f"DDIM {ref['steps']}, the reference: {pct(ref['colour'])} / {pct(ref['shape'])}"]
                + [""] * (len(steps) + 1))
    fast = j["fast_default"]
    return (md(["sampler", *(f"{n} steps" for n in steps), "matches DDIM-50 at"], rows)
            + f"\n\nCells: PSNR to the reference · colour / shape of the named objects. `--fast` is "
            f"`--sampler {fast['sampler']} --steps {fast['steps']}`.")


@table("demo", "demo.json", "{command}")
def demo_table(j):
    rows = [[f"{s} steps", f(j["median_s"][s], 1), ", ".join(f(t, 1) for t in j["runs"][s]),
             f"{f(q['psnr_256'])} dB, {pct(q['sharpness_256'])}", f"{f(q['psnr_1024'])} dB, {pct(q['sharpness_1024'])}"]
            for s, q in j["quality"].items()]
    return (md(["×4 stages", "demo, median s", "runs (alternating)", "64² → 256²: PSNR, sharpness",
                "256² → 1024² tiled: PSNR, sharpness"], rows)
            + f"\n\nCPU, {j['threads']} threads; 10 steps take {f(j['ratio_10_over_20'])}× the time of 20.")


@table("serve-load", "serve_load.json", "{command}")
def serve_load(j):
    labels = {"one_at_a_time": "one image at a time (`--max-batch 1`)", "batched": "batched (`--max-batch 8`)"}
    rows = [[labels[k], f(r["throughput_per_s"]), f(r["p50_s"]), f(r["p95_s"]),
             ", ".join(f"{n}×{size}" for size, n in r["batches"].items()), f(r["mean_batch"]),
             ", ".join(f"{n} × {c}" for c, n in r["status"].items()), f"{r['left_early']} / {r['answered_499']}",
             f"{r['rss_mib']['first']:.0f} → {r['rss_mib']['max']:.0f} → {r['rss_mib']['last']:.0f}"]
            for k in labels for r in j["runs"][k]]
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    return (md(["server", "requests / s", "p50 s", "p95 s", "batches run (count×images)", "mean batch", "answers",
                "left early / 499", "RSS MiB first → max → last"], rows)
            + f"\n\n{j['requests']} requests from {j['clients']} clients, {j['steps']} steps each, 64², "
            f"{j['threads']} torch threads; every request answered 200: {yes(j['every_request_answered'])}; "
            f"the batched server's images the same bytes as one-at-a-time: "
            f"{yes(j['batched_equals_one_at_a_time'])}; throughput gain from batching: "
            f"{f(j['batching_gain'])}×.")


def stamp(j) -> str:
    """" (commit …, model …)" from a result file's stamps, or from its parts' when each part has its own."""
    parts = [j] if "commit" in j or "model_version" in j else [v for v in j.values() if isinstance(v, dict)]
    commits = sorted({v["commit"] for v in parts if "commit" in v})
    models = sorted({m if isinstance(m, str) else ", ".join(f"{k} {x}" for k, x in m.items())
                     for m in (v["model_version"] for v in parts if "model_version" in v)})
    said = ([f"commit {' / '.join(commits)}"] if commits else []) + ([f"model {' / '.join(models)}"] if models else [])
    return f" ({'; '.join(said)})" if said else ""


def render(name):
    fn, srcs, cmds = TABLES[name]
    js = [load(s) for s in srcs]
    if not cmds:  # the headline, from many files
        where, made = "`bench/results/*.json`", "the bench scripts named in `bench/README.md`"
    else:
        where = ", ".join(f"`bench/results/{s}`" + stamp(j) for s, j in zip(srcs, js))
        made = ", ".join(f"`{c}`" for c in ([js[0]["command"]] if "command" in js[0] else
                                            [c.format(**js[0]) for c in cmds]))
    return (f"{fn(*js)}\n\n<sub>Generated by `python bench/tables.py` from {where}; "
            f"made by {made}.</sub>\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a file would change")
    check, stale = ap.parse_args().check, 0
    for path in (p for p in DOCS if p.exists()):
        old, rel = path.read_text(), path.relative_to(ROOT)
        unknown = [m.group(2) for m in REGION.finditer(old) if m.group(2) not in TABLES]
        if unknown:
            sys.exit(f"{rel}: unknown table {unknown[0]!r}; known: {', '.join(TABLES)}")
        new = REGION.sub(lambda m: f"{m.group(1)}\n{render(m.group(2))}\n{m.group(3)}", old)
        if new != old:
            stale += 1
            print(f"{rel}: {'out of date' if check else 'rewritten'}")
            if not check:
                path.write_text(new)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
