"""`python -m engine generate|img2img|upscale ...`: a thin layer over the Python API."""
import argparse
import sys
import time
from pathlib import Path

from . import demo, editing, images
from .load import DEFAULT_MODEL, DEFAULT_UPSCALER
from .profile import profiled


def _model_args(p: argparse.ArgumentParser, model: Path):
    p.add_argument("--model", default=str(model), help="a diffusers model folder (with model_index.json) or a "
                   f"single-file SD 1.x/2.x checkpoint in LDM key layout (.safetensors only); default: the embedded "
                   f"model {model.relative_to(model.parent.parent)}")
    p.add_argument("--config", help="single-file checkpoints only: a diffusers folder whose configs and "
                   "tokenizer to use (its weights are not needed)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"],
                   help="override the scheduler's prediction type (e.g. v_prediction for SD 2.x 768-v single files)")
    p.add_argument("--variant", help="load weight files of this variant, e.g. fp16 (unet/diffusion_pytorch_model.fp16.safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and compute dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace to DIR and print a "
                   "per-stage timing table (tokenize, text encode, each UNet step, VAE decode)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _prompt_args(p: argparse.ArgumentParser):
    p.add_argument("--embeddings", action="append", default=[], metavar="FILE", help="pseudo-words for the "
                   "prompts: a train-ti file (write <C>, <C|i|>, <C(i)>, <C[i]>, or C*|t|, C*(t), C*[t]) or a "
                   "diffusers / A1111 .safetensors embedding (write <name>); repeat for several")
    p.add_argument("--semi", choices=["zero", "remove"], default="zero", help="what <C(i)> puts in the concept's "
                   "place below bin i: a zero input vector (the paper's code) or nothing (default zero)")


def _common(p: argparse.ArgumentParser, steps: int, guidance: float, model: Path):
    _model_args(p, model)
    _prompt_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--negative", default=None, help="negative prompt, used as the unconditional branch of CFG (default: empty)")
    p.add_argument("--steps", type=int, default=steps, help=f"number of DDIM denoising steps (default {steps})")
    p.add_argument("--guidance", type=float, default=guidance,
                   help=f"classifier-free guidance scale; ≤ 1 turns CFG off (default {guidance})")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU generator; same seed → same image (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--out", required=True, help="output image file (.png/.jpg); written only when complete")


def _cascade_args(p: argparse.ArgumentParser, clip_use: str):
    _model_args(p, DEFAULT_MODEL)
    _prompt_args(p)
    p.add_argument("--upscaler", default=str(DEFAULT_UPSCALER), help="the ×4 super-resolution model folder "
                   "(default: the embedded weights/tiny-x4)")
    p.add_argument("--clip", help=f"CLIP checkpoint for {clip_use} (default: the model's tiny CLIP)")


def _iterinv_args(sub, name):
    edit = name == "iterinv-edit"
    p = sub.add_parser(name, help="IterInv + DiffEdit: edit an image through the cascade" if edit else
                       "image → inversion through the cascade (base + ×4 stages) by IterInv",
                       description=("Edit through the cascade: a DiffEdit mask and masked DDIM on the base stage, "
                                    "then every ×4 stage sampled from the source's IterInv latents under the edit "
                                    "prompt. Writes OUT/edit.png, mask.png, sheet.png and edit.json.") if edit else
                       ("Invert an image through the cascade: stage 1 by DDIM + null-text inversion, each ×4 stage "
                        "by IterInv. Writes OUT/inversion.safetensors, reconstruction.png, the lower stages, "
                        "sheet.png and metrics.json."))
    _cascade_args(p, "the CLIP score")
    p.add_argument("--image", required=True, help="a square input image; it is resized to each stage's side")
    p.add_argument("--prompt", required=True, help="the caption of the input image")
    if edit:
        p.add_argument("--edit", required=True, help="the edit prompt: the whole edited image described in words")
        p.add_argument("--inversion", help="inversion.safetensors written by `iterinv` for this image, size and "
                       "noise level (default: invert the image first)")
        p.add_argument("--strength", type=float, default=0.8, help="DiffEdit's inpaint strength: how much of the "
                       "base stage's schedule the edit runs (default 0.8)")
        p.add_argument("--edit-guidance", type=float, default=3.0, help="CFG of the mask and the edit (default 3)")
        p.add_argument("--mask-strength", type=float, default=0.5, help="DiffEdit mask: the noise level the two "
                       "predictions are compared at, as an img2img strength (default 0.5)")
        p.add_argument("--mask-ratio", type=float, default=3.0, help="DiffEdit mask: clamp the difference map at "
                       "this multiple of its mean before binarising at half of it (default 3; larger = tighter)")
        p.add_argument("--backproject", type=int, default=0, help="ours: back-projection iterations of each ×4 "
                       "stage's output onto the edited stage below, which keeps the ×4 stages from drifting in "
                       "colour (3 is plenty; default 0, the reference)")
    p.add_argument("--size", type=int, default=256, choices=[256, 1024], help="output side (default 256)")
    p.add_argument("--mode", default="fast", choices=["paper", "fast", "ddim", "ddim-reference"],
                   help="SR-stage inversion: IterInv paper (50 × 21 gradient steps) or fast (ours: Anderson "
                   "fixed point), or the baselines ddim (v-aware) and ddim-reference (the reference code's) "
                   "(default fast)")
    p.add_argument("--stage1", default="fast", choices=["fast", "reference", "npi", "ddim"],
                   help="base-stage inversion: null-text fast / reference, NPI, or plain DDIM (default fast)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every stage (default 50)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG of the base stage's null-text inversion (default 3)")
    p.add_argument("--noise-level", type=int, default=100, help="noise level of the low-res conditioning (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the low-res conditioning noise (default 0)")
    p.add_argument("--tile", type=int, default=64, help="×4 stages run tile by tile above this low-res side (default 64)")
    p.add_argument("--overlap", type=int, default=16, help="tile overlap in low-res pixels (default 16)")
    p.add_argument("--out", required=True, help="output folder (created; files written only when complete)")


def _blend_args(sub):
    from .blended import BLENDS, RERANKS, STAGE_MODELS, UPSCALERS, Options

    o = Options()
    p = sub.add_parser("blend", help="image + mask + text → high-resolution edit (multi-stage blended diffusion)",
                       description="Edit the masked region: blended latent diffusion at the base model's size "
                       "(RePaint, CLIP-reranked candidates), then ×4 stages of super-resolution + blended diffusion "
                       "from an intermediate step against a low-passed original, tiled above --max-side. The "
                       "result is the original outside the mask, pixel for pixel. Writes OUT, OUT_sheet.png "
                       "(every stage) and OUT.json.")
    _cascade_args(p, "reranking and the CLIP score")
    p.add_argument("--image", required=True, help="the input image")
    p.add_argument("--mask", required=True, help="the mask image: white = edit (grey values are thresholded at 0.5)")
    p.add_argument("--prompt", required=True, help="the edited image described in words")
    p.add_argument("--size", type=int, help="output side: the (square) image and mask are resized to SIZE² first, "
                   "e.g. 1024 or 2048 (default: the image's own size)")
    p.add_argument("--candidates", type=int, default=o.candidates, help="stage-1 samples reranked by CLIP "
                   f"(default {o.candidates})")
    p.add_argument("--rerank", choices=RERANKS, default=o.rerank, help="CLIP-score the whole "
                   f"candidate or only its masked region (default {o.rerank})")
    p.add_argument("--steps", type=int, default=o.steps, help=f"stage-1 DDIM steps (default {o.steps})")
    p.add_argument("--guidance", type=float, default=o.guidance, help=f"stage-1 CFG (default {o.guidance})")
    p.add_argument("--eta", type=float, default=o.eta, help=f"DDIM eta of every stage (default {o.eta})")
    p.add_argument("--repaint", type=int, default=o.repaint, help="RePaint resampling repeats per stage-1 step "
                   f"(default {o.repaint}; 0 = off)")
    p.add_argument("--jump", type=int, default=o.jump, help=f"RePaint jump length (default {o.jump})")
    p.add_argument("--blend", choices=BLENDS, default=o.blend, help="blend after each step "
                   "with the background at the step's t (MSBD), after at t_prev, or before the step (BLD's LDM code) "
                   f"(default {o.blend})")
    p.add_argument("--dilate", type=int, default=o.dilate, help="progressive mask dilation steps at stage 1 "
                   f"(default {o.dilate})")
    p.add_argument("--upscale-with", choices=UPSCALERS, default=o.upscaler, help="how each stage "
                   f"upscales the previous one: the ×4 model or bicubic (default {o.upscaler})")
    p.add_argument("--sr-steps", type=int, default=o.sr_steps, help=f"DDIM steps of each ×4 (default {o.sr_steps})")
    p.add_argument("--backproject", type=int, default=o.backproject, help="back-projection iterations on each "
                   "stage's output, so that its 4×4 means are the stage it upscaled; 0 gives MSBD's stages (default "
                   f"{o.backproject})")
    p.add_argument("--stage-model", choices=STAGE_MODELS, default=o.stage_model, help="the model of the stages' "
                   f"blended diffusion (default {o.stage_model})")
    p.add_argument("--stage-steps", type=int, default=o.stage_steps, help="the stages' DDIM schedule, of which "
                   f"the lowest --start runs (default {o.stage_steps})")
    p.add_argument("--start", type=float, default=o.start, help=f"start of whole stages (default {o.start})")
    p.add_argument("--tiled-start", type=float, default=o.tiled_start, help="start of tiled stages "
                   f"(default {o.tiled_start})")
    p.add_argument("--max-side", type=int, default=o.max_side, help="the memory budget: stages larger than this "
                   f"side run in tiles of it (default {o.max_side})")
    p.add_argument("--overlap", type=int, default=o.overlap, help=f"tile overlap in pixels (default {o.overlap})")
    p.add_argument("--margin", type=float, help="edit a square crop of MARGIN × the mask's bounding box around it "
                   "(e.g. 1.2, for large photos with small masks; default: the whole image)")
    p.add_argument("--seed", type=int, default=o.seed, help=f"seed of every stage and tile (default {o.seed})")
    p.add_argument("--out", required=True, help="output image (.png/.jpg); written only when complete")


def _train_ti_args(sub):
    from dataclasses import fields

    from .multires import TEMPLATES, TrainConfig

    o = {f.name: f.default for f in fields(TrainConfig)}

    p = sub.add_parser("train-ti", help="images of a concept → multiresolution textual-inversion embeddings",
                       description="Learn K time-indexed pseudo-word embeddings of a concept from a few images "
                       "(multiresolution textual inversion): each step trains the row of its timestep's bin; "
                       "everything else stays frozen. Checkpoints to OUT.ckpt.safetensors; a rerun of the same "
                       "command resumes from it. Sample with --embeddings OUT and <C>, <C|i|>, <C(i)>, <C[i]>.")
    _model_args(p, DEFAULT_MODEL)
    p.add_argument("--images", required=True, help="a folder of images of the concept (3–5 is typical)")
    p.add_argument("--token", required=True, help="the concept's name C, written <C|i|> etc. in prompts")
    p.add_argument("--init-token", required=True, help="a one-token word every row starts from, e.g. star")
    p.add_argument("--steps", type=int, default=o["steps"], help=f"optimiser steps (default {o['steps']})")
    p.add_argument("--bins", type=int, default=o["bins"], help=f"K, the number of time bins (default {o['bins']})")
    p.add_argument("--batch", type=int, default=o["batch"], help=f"examples per step (default {o['batch']})")
    p.add_argument("--lr", type=float, default=o["lr"], help=f"AdamW learning rate (default {o['lr']:g}: the reference's "
                   "5e-4 scaled by its batch of 4)")
    p.add_argument("--weight-decay", type=float, default=o["weight_decay"],
                   help=f"AdamW weight decay of the K rows (default {o['weight_decay']:g})")
    p.add_argument("--templates", default=o["templates"], choices=["auto", *TEMPLATES], help="prompt templates: the TI "
                   "object or style sets, or the embedded model's caption language; auto = object when the "
                   "tokenizer knows its words, else world (default auto)")
    p.add_argument("--flip", type=float, default=o["flip"], help=f"probability of a horizontal flip (default {o['flip']})")
    p.add_argument("--center-crop", action="store_true", help="centre-crop each image to a square first")
    p.add_argument("--resolution", type=int, help="training side in pixels (default: the model's size)")
    p.add_argument("--seed", type=int, default=o["seed"], help=f"seed of every step's draws (default {o['seed']})")
    p.add_argument("--checkpoint-every", type=int, default=o["checkpoint_every"],
                   help=f"steps between checkpoints (default {o['checkpoint_every']})")
    p.add_argument("--out", required=True, help="the embeddings file (.safetensors); written only when complete")
    x = sub.add_parser("export-ti", help="one row of a train-ti file → a diffusers learned_embeds.safetensors",
                       description="Write row I of a multiresolution embeddings file as a single-vector "
                       "embedding that diffusers' load_textual_inversion (and --embeddings) read.")
    x.add_argument("--embeddings", required=True, help="a file written by train-ti")
    x.add_argument("--row", type=int, required=True, help="the time bin to export, 0..K−1 (0 = finest detail)")
    x.add_argument("--token", help="the token string in the file (default <C>)")
    x.add_argument("--out", required=True, help="output .safetensors (e.g. learned_embeds.safetensors)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine", description="A small Stable-Diffusion-family engine.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text → image", description="Text → image with DDIM and classifier-free guidance.")
    _common(g, 50, 7.5, DEFAULT_MODEL)
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of the VAE factor: 8 for SD, "
                   "4 for the embedded model (default: the model's size)")
    g.add_argument("--width", type=int, help="image width in pixels, a multiple of the VAE factor "
                   "(default: the model's size)")
    i = sub.add_parser("img2img", help="image + text → image (SDEdit)",
                       description="Noise an image to a level set by --strength, then denoise it under the prompt.")
    _common(i, 50, 7.5, DEFAULT_MODEL)
    i.add_argument("--image", required=True, help="input image; its sides must be multiples of the VAE factor "
                   "(8 for SD, 4 for the embedded model)")
    i.add_argument("--strength", type=float, default=0.8,
                   help="how much of the schedule to run, in (0, 1]: 1 ignores the image (default 0.8)")
    u = sub.add_parser("upscale", help="×4 super-resolution (SD x4-upscaler models)",
                       description="×4 super-resolution conditioned on the noise-augmented low-res image.")
    _common(u, 75, 9.0, DEFAULT_UPSCALER)
    u.add_argument("--image", required=True, help="the low-resolution input image")
    u.add_argument("--noise-level", type=int, default=20,
                   help="noise added to the low-res image, 0..max_noise_level (default 20)")
    u.add_argument("--tile", type=int, help="run the UNet on TILE×TILE windows of the low-res image, blended "
                   "every step (for inputs larger than the model was trained on, e.g. 64)")
    u.add_argument("--overlap", type=int, default=16, help="overlap of neighbouring tiles in pixels (default 16)")
    u.add_argument("--backproject", type=int, default=0, help="iterations of back-projection onto the input "
                   "after decoding: each 4×4 block of the output then averages to its input pixel, which undoes "
                   "colour drift (3 is plenty; default 0, the diffusers pipeline's output)")
    v = sub.add_parser("invert", help="image → DDIM-inverted noise trajectory (+ null-text embeddings)",
                       description="DDIM-invert an image; write the trajectory (latents, noises, null-text "
                       "embeddings) as .safetensors and the image sampled back from it.")
    _model_args(v, DEFAULT_MODEL)
    _prompt_args(v)
    v.add_argument("--image", required=True, help="input image; its sides must be multiples of the VAE factor "
                   "(8 for SD, 4 for the embedded model)")
    v.add_argument("--prompt", default="", help="prompt the image is inverted under (default: empty)")
    v.add_argument("--steps", type=int, default=50, help="DDIM inversion steps (default 50)")
    v.add_argument("--convention", choices=["destination", "source"], default="destination",
                   help="evaluate the noise at the next timestep (null-text inversion, diffusers) or the current "
                   "one (Direct Inversion) (default destination)")
    v.add_argument("--null-text", choices=["reference", "fast"], help="also optimise per-step unconditional "
                   "embeddings for guided reconstruction: the reference method or our fast variant")
    v.add_argument("--guidance", type=float, default=7.5, help="CFG scale the null-text embeddings are "
                   "optimised for (default 7.5)")
    v.add_argument("--out", required=True, help="trajectory file (.safetensors); written only when complete")
    v.add_argument("--reconstruction", help="image sampled back from the trajectory (default: OUT with .png)")
    e = sub.add_parser("edit", help="image + text → edited image (Direct Inversion)",
                       description="Direct Inversion: DDIM-invert the image under --source, then sample the edit "
                       "prompt with CFG from the inverted noise, merging λ of the inverted noise on the injected "
                       "steps. Writes the edit, a before/after sheet (OUT_sheet.png) and metrics (OUT.json).")
    _model_args(e, DEFAULT_MODEL)
    _prompt_args(e)
    e.add_argument("--image", required=True, help="input image; its sides must be multiples of the VAE factor")
    prompt = e.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the edit prompt: the whole target image described in words")
    prompt.add_argument("--prompt-file", help="a text file of edit prompts, one per line: one edit each, "
                        "written as OUT_0, OUT_1, …")
    e.add_argument("--source", default="", help="prompt the image is inverted under (default: empty)")
    e.add_argument("--negative", default=None, help="negative prompt of CFG (default: empty)")
    e.add_argument("--lambda", dest="lam", type=float, default=0.5,
                   help="noise merge λ in [0, 1]: 0 = plain CFG from the inverted noise, 1 = the input back (default 0.5)")
    e.add_argument("--steps", type=int, default=100, help="inversion and sampling steps (default 100)")
    e.add_argument("--inject-steps", type=int, help="merge the inverted noise on the first K sampling steps "
                   "only (the paper's t_stop); 0 = only start from it (default: every step)")
    e.add_argument("--every", type=int, default=1, help="merge on every k-th of those steps (default 1)")
    e.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    e.add_argument("--convention", choices=["destination", "source"], default="source",
                   help="inversion convention (default source, as Direct Inversion's code)")
    e.add_argument("--clip", help="CLIP checkpoint for the CLIP scores in OUT.json: a transformers CLIPModel "
                   "folder (default: the model's own tiny CLIP when it has one, as the embedded model does)")
    e.add_argument("--out", required=True, help="output image (.png/.jpg); written only when complete")
    for name in ("iterinv", "iterinv-edit"):
        _iterinv_args(sub, name)
    _blend_args(sub)
    _train_ti_args(sub)
    d = sub.add_parser("demo", help="text→image, img2img and ×4 upscales on the embedded model, into out/",
                       description="Text→image, img2img, a ×4 upscale to 256² and a tiled ×4 upscale to 1024² "
                       "on the embedded model; PNGs and a captioned contact sheet under --out.")
    d.add_argument("--out", default="out", help="output folder (default out/)")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps of the base model (default 50)")
    d.add_argument("--sr-steps", type=int, default=20, help="DDIM steps of each upscale (default 20)")
    d.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def run(args) -> Path:
    import engine

    out, _ = images.check_out(args.out)
    with profiled(args.profile):
        t0 = time.perf_counter()
        pipe = engine.load(args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                           config=args.config, prediction_type=args.prediction_type, embeddings=args.embeddings,
                           semi=args.semi)
        t_load = time.perf_counter() - t0
        common = dict(negative=args.negative, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      eta=args.eta, progress=not args.quiet)
        if args.command == "generate":
            image = pipe.generate(args.prompt, height=args.height, width=args.width, **common)[0]
        elif args.command == "img2img":
            image = pipe.img2img(args.image, args.prompt, strength=args.strength, **common)[0]
        else:
            image = pipe.upscale(args.image, args.prompt, noise_level=args.noise_level, tile=args.tile,
                                 overlap=args.overlap, backproject=args.backproject, **common)[0]
    images.save(image, out)
    print(f"wrote {out} ({image.width}×{image.height}; load {t_load:.1f}s, total {time.perf_counter() - t0:.1f}s)")
    return out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo.run(args.out, args.steps, args.sr_steps, seed=args.seed, progress=not args.quiet)
        elif args.command in ("invert", "edit"):
            editing.run(args)
        elif args.command in ("iterinv", "iterinv-edit"):
            editing.run_iterinv(args)
        elif args.command == "blend":
            editing.run_blend(args)
        elif args.command in ("train-ti", "export-ti"):
            editing.run_ti(args)
        else:
            run(args)
    except (ValueError, OSError, KeyError, FloatingPointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
