"""`python -m engine COMMAND ...`: the argument parser (flags whose defaults come from the Python
API, engine.flags) and main; engine.commands runs each command."""
import argparse
import signal
import sys
import threading

from .blend_options import (BLENDS, LOWPASS, RERANKS, STAGE_MODELS, STAGE_RATIOS, START_ON,
                            UPSCALERS)
from .embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from .flags import cascade_args, flag, model_args, prompt_args, sampling_args
from .templates import TEMPLATES

MULTIPLE = "its sides must be multiples of the VAE factor"


def _sampling(sub):
    gen, i2i, up = (f"engine.pipeline:Pipeline.{m}" for m in ("generate", "img2img", "upscale"))
    g = sub.add_parser("generate", help="text → image",
                       description="Text → image with classifier-free guidance, sampled with "
                       "DDIM or a σ-space sampler (--sampler).")
    sampling_args(g, gen, DEFAULT_MODEL)
    flag(g, "--height", gen, "image height in pixels, a multiple of the VAE factor: "
         "8 for SD, 4 for the embedded model", none="the model's size", type=int)
    flag(g, "--width", gen, "image width in pixels, a multiple of the VAE factor",
         none="the model's size", type=int)
    i = sub.add_parser("img2img", help="image + text → image (SDEdit)", description="Noise an "
                       "image to a level set by --strength, then denoise it under the prompt.")
    sampling_args(i, i2i, DEFAULT_MODEL)
    i.add_argument("--image", required=True, help=f"input image; {MULTIPLE} (8 for SD, 4 for the "
                   "embedded model)")
    flag(i, "--strength", i2i, "how much of the schedule to run, in (0, 1]: 1 ignores "
         "the image")
    ip = "engine.pipeline:Pipeline.inpaint"
    n = sub.add_parser("inpaint", help="image + mask + text → image", description="Repaint the "
                       "white part of --mask under the prompt: an inpainting model (9 input "
                       "channels) sees the mask and the masked image; with an ordinary model the "
                       "kept part is put back after every step.")
    sampling_args(n, ip, DEFAULT_MODEL)
    n.add_argument("--image", required=True, help=f"input image; {MULTIPLE}")
    n.add_argument("--mask", required=True, help="mask image of the image's size (or aspect): "
                   "white = repaint, black = keep, grey thresholded at 0.5")
    flag(n, "--strength", ip, "how much of the schedule to run, in (0, 1]: 1 starts from pure "
         "noise")
    u = sub.add_parser("upscale", help="×4 super-resolution (SD x4-upscaler models)",
                       description="×4 super-resolution conditioned on the noise-augmented "
                       "low-res image.")
    sampling_args(u, up, DEFAULT_UPSCALER)
    u.add_argument("--image", required=True, help="the low-resolution input image")
    flag(u, "--noise-level", up, "noise added to the low-res image, "
         "0..max_noise_level")
    flag(u, "--tile", up, "run the UNet on TILE×TILE windows of the low-res image, "
         "blended every step (for inputs larger than the model was trained on, e.g. 64)", type=int)
    flag(u, "--overlap", up, "overlap of neighbouring tiles in pixels")
    flag(u, "--backproject", up, "iterations of back-projection onto the input after "
         "decoding: each 4×4 block of the output then averages to its input pixel, which undoes "
         "colour drift; 3 is plenty", note=", the diffusers pipeline's output")


def _invert(sub):
    v = sub.add_parser("invert", help="image → DDIM-inverted noise trajectory (+ null-text "
                       "embeddings)", description="DDIM-invert an image; write the trajectory "
                       "(latents, noises, null-text embeddings) as .safetensors and the image "
                       "sampled back from it.")
    model_args(v, DEFAULT_MODEL)
    prompt_args(v)
    v.add_argument("--image", required=True, help=f"input image; {MULTIPLE} (8 for SD, 4 for the "
                   "embedded model)")
    inv = "engine.pipeline:Pipeline.invert"
    flag(v, "--prompt", inv, "prompt the image is inverted under", none="empty")
    flag(v, "--steps", inv, "DDIM inversion steps")
    flag(v, "--convention", inv, "evaluate the noise at the next timestep (null-text inversion, "
         "diffusers) or the current one (Direct Inversion)", choices=["destination", "source"])
    flag(v, "--null-text", inv, "also optimise per-step unconditional embeddings for guided "
         "reconstruction: the reference method (P2P's), our fast variant, or IterInv's settings "
         "(51 Adam steps at lr 1e-3 per step)", choices=["reference", "fast", "iterinv"])
    flag(v, "--guidance", inv, "CFG scale the null-text embeddings are optimised for")
    v.add_argument("--out", required=True, help="trajectory file (.safetensors); written only when "
                   "complete")
    v.add_argument("--reconstruction", help="image sampled back from the trajectory (default: OUT "
                   "with .png)")


def _edit_inputs(e, what: str):
    """The model, the input image and the edit prompts, as edit and p2p take them."""
    model_args(e, DEFAULT_MODEL)
    prompt_args(e)
    e.add_argument("--image", required=True, help=f"input image; {MULTIPLE}")
    prompt = e.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help=f"the edit prompt: {what}")
    prompt.add_argument("--prompt-file", help="a text file of edit prompts, one per line: one edit "
                        "each, written as OUT_0, OUT_1, …")


def _edit(sub):
    e = sub.add_parser("edit", help="image + text → edited image (Direct Inversion)",
                       description="Direct Inversion: DDIM-invert the image under --source, then "
                       "sample the edit prompt with CFG from the inverted noise, merging λ of the "
                       "inverted noise on the injected steps. Writes the edit, a before/after "
                       "sheet (OUT_sheet.png) and metrics (OUT.json).")
    _edit_inputs(e, "the whole target image described in words")
    ed = "engine.pipeline:Pipeline.edit"
    flag(e, "--source", ed, "prompt the image is inverted under", none="empty")
    flag(e, "--negative", ed, "negative prompt of CFG", none="empty")
    flag(e, "--lambda", ed, "noise merge λ in [0, 1]: 0 = plain CFG from the inverted noise, 1 = "
         "the input back", dest="lam")
    flag(e, "--steps", ed, "inversion and sampling steps")
    flag(e, "--inject-steps", ed, "merge the inverted noise on the first K sampling steps only "
         "(the paper's t_stop); 0 = only start from it", none="every step", type=int)
    flag(e, "--every", ed, "merge on every k-th of those steps")
    flag(e, "--guidance", ed, "classifier-free guidance scale")
    flag(e, "--convention", ed, "inversion convention", note=", as Direct Inversion's code",
         choices=["destination", "source"])
    flag(e, "--pairing", ed, "which inverted noise a step merges: the mirror of its own step "
         "(λ 1 = the input back); as the authors' code, the one evaluated at its timestep (one "
         "grid step higher under the source convention); or x_T, the inverted noise itself, as "
         "the paper", choices=["mirror", "authors", "x_T"])
    e.add_argument("--clip", help="CLIP checkpoint for the CLIP scores in OUT.json: a transformers "
                   "CLIPModel folder (default: the model's own tiny CLIP when it has one, as the "
                   "embedded model does)")
    e.add_argument("--out", required=True, help="output image (.png/.jpg); written only when "
                   "complete")


def _p2p(sub):
    e = sub.add_parser("p2p", help="image + text → edited image (null-text inversion + "
                       "Prompt-to-Prompt)", description="Prompt-to-Prompt on a real image, as "
                       "P2P's null-text notebook: invert the image under --source with null-text "
                       "embeddings, then sample the source and the edit prompt side by side, the "
                       "edit taking the source's attention maps on the early steps, so that the "
                       "layout stays and the changed words change. Write the edit as --source "
                       "with a few words changed, added or removed. Writes the edit, a "
                       "before/after sheet (OUT_sheet.png) and metrics (OUT.json).")
    _edit_inputs(e, "--source with words swapped, added or removed")
    pp = "engine.pipeline:Pipeline.prompt_to_prompt"
    e.add_argument("--source", required=True, help="the words that describe the input image")
    flag(e, "--steps", pp, "inversion and sampling steps")
    flag(e, "--guidance", pp, "classifier-free guidance scale")
    flag(e, "--cross", pp, "fraction of the steps whose cross-attention maps the edit takes from "
         "the source")
    flag(e, "--self-attention", pp, "fraction of the steps whose self-attention maps (at levels of "
         "≤ 32² pixels) the edit takes from the source")
    flag(e, "--null-text", pp, "null-text embeddings for the inversion: our fast method, the "
         "reference one (P2P's), IterInv's settings, or none (plain DDIM inversion, guided by "
         "\"\")",
         choices=["fast", "reference", "iterinv", "none"])
    e.add_argument("--clip", help="CLIP checkpoint for the CLIP scores in OUT.json (default: the "
                   "model's own tiny CLIP when it has one)")
    e.add_argument("--out", required=True, help="output image (.png/.jpg); written only when "
                   "complete")


def _iterinv(sub, edit: bool):
    p = sub.add_parser(
        "iterinv-edit" if edit else "iterinv",
        help="IterInv + DiffEdit: edit an image through the cascade" if edit else
        "image → inversion through the cascade (base + ×4 stages) by IterInv",
        description="Edit through the cascade: a DiffEdit mask and masked DDIM on the base stage, "
        "then every ×4 stage sampled from the source's IterInv latents under the edit prompt. "
        "Writes OUT/edit.png, mask.png, sheet.png and edit.json." if edit else "Invert an image "
        "through the cascade: stage 1 by DDIM + null-text inversion, each ×4 stage by IterInv. "
        "Writes OUT/inversion.safetensors, reconstruction.png, the lower stages, sheet.png and "
        "metrics.json.")
    cascade_args(p, "the CLIP score")
    p.add_argument("--image", required=True, help="a square input image; it is resized to each "
                   "stage's side")
    p.add_argument("--prompt", required=True, help="the caption of the input image")
    cas = "engine.iterinv:Cascade"
    inv, ed = f"{cas}.invert", f"{cas}.edit"
    if edit:
        p.add_argument("--edit", required=True, help="the edit prompt: the whole edited image "
                       "described in words")
        p.add_argument("--inversion", help="inversion.safetensors written by `iterinv` for this "
                       "image, size and noise level (default: invert the image first)")
        flag(p, "--strength", ed, "DiffEdit's inpaint strength: how much of the base stage's "
             "schedule the edit runs")
        flag(p, "--edit-guidance", ed, "CFG of the mask and the edit", param="guidance")
        flag(p, "--mask-strength", ed, "DiffEdit mask: the noise level the two predictions are "
             "compared at, as an img2img strength")
        flag(p, "--mask-ratio", ed, "DiffEdit mask: clamp the difference map at this multiple of "
             "its mean before binarising at half of it", note="; larger = tighter")
        flag(p, "--backproject", ed, "ours: back-projection iterations of each ×4 stage's output "
             "onto the edited stage below, which keeps the ×4 stages from drifting in colour; 3 is "
             "plenty", note=", the reference")
    flag(p, "--size", inv, "output side", choices=[256, 1024])
    flag(p, "--mode", inv, "SR-stage inversion: IterInv paper (50 × 21 gradient steps) or fast "
         "(ours: Anderson fixed point), or the baselines ddim (v-aware) and ddim-reference (the "
         "reference code's)", param="method", choices=["paper", "fast", "ddim", "ddim-reference"])
    flag(p, "--stage1", inv, "base-stage inversion: null-text fast / reference (P2P's settings) / "
         "iterinv (IterInv's), NPI, or plain DDIM",
         choices=["fast", "reference", "iterinv", "npi", "ddim"])
    flag(p, "--steps", inv, "DDIM steps of every stage")
    flag(p, "--guidance", inv, "CFG of the base stage's null-text inversion")
    flag(p, "--noise-level", inv, "noise level of the low-res conditioning")
    flag(p, "--seed", inv, "seed of the low-res conditioning noise")
    flag(p, "--tile", cas, "×4 stages run tile by tile above this low-res side")
    flag(p, "--overlap", cas, "tile overlap in low-res pixels")
    p.add_argument("--out", required=True, help="output folder (created; files written only when "
                   "complete)")


BLEND_FLAGS = (  # (flag, help, flag()'s keywords): every one an Options field
    ("--candidates", "stage-1 samples reranked by CLIP", {}),
    ("--rerank", "CLIP-score the whole candidate or only its masked region", {"choices": RERANKS}),
    ("--steps", "stage-1 DDIM steps", {}),
    ("--guidance", "stage-1 CFG", {}),
    ("--eta", "DDIM eta of every stage", {}),
    ("--repaint", "RePaint resampling repeats per stage-1 step", {"note": "; 0 = off"}),
    ("--jump", "RePaint jump length", {}),
    ("--blend", "blend after each step with the background at the step's t (MSBD), after at "
     "t_prev, or before the step (BLD's LDM code)", {"choices": BLENDS}),
    ("--dilate", "progressive mask dilation steps at stage 1", {}),
    ("--upscale-with", "how each stage upscales the previous one: the ×4 model or bicubic",
     {"choices": UPSCALERS, "param": "upscaler"}),
    ("--sr-steps", "DDIM steps of each ×4", {}),
    ("--backproject", "back-projection iterations on each stage's output, so that its 4×4 means "
     "are the stage it upscaled; 0 gives MSBD's stages", {}),
    ("--stage-ratio", "the side ratio between stages: 4, the ×4 model's own, or 2, MSBD's "
     "(≤ ×2.7), the ×4 upscale of each stage resized to twice its input; the ×4 model then "
     "draws twice --max-side", {"choices": STAGE_RATIOS}),
    ("--stage-model", "the model of the stages' blended diffusion", {"choices": STAGE_MODELS}),
    ("--stage-guidance", "CFG of the stages' blended diffusion, e.g. 7.5 as MSBD",
     {"none": "the stage model's: none for the ×4 model, --guidance for the base", "type": float}),
    ("--stage-steps", "the stages' DDIM schedule, of which the lowest --start runs", {}),
    ("--start", "start of whole stages (0: no diffusion, the upscale as it is)", {}),
    ("--tiled-start", "start of tiled stages (0: as --start 0)", {}),
    ("--start-on", "the schedule --start and --tiled-start count on: the stage model's own, or "
     "SD's (MSBD's), carried over by noise level", {"choices": START_ON}),
    ("--lowpass", "the original the stages blend in outside the mask: low-passed to the previous "
     "stage's detail (MSBD's), to half the stage's side, or as it is", {"choices": LOWPASS}),
    ("--max-side", "the memory budget: stages larger than this side run in tiles of it", {}),
    ("--overlap", "tile overlap in pixels", {}),
    ("--margin", "edit a square crop of MARGIN × the mask's bounding box around it, e.g. 1.2 for "
     "large photos with small masks", {"none": "the whole image", "type": float}),
    ("--seed", "seed of every stage and tile", {}))


def _blend(sub):
    p = sub.add_parser(
        "blend", help="image + mask + text → high-resolution edit (multi-stage blended diffusion)",
        description="Edit the masked region: blended latent diffusion at the base model's size "
        "(RePaint, CLIP-reranked candidates), then stages of ×4 super-resolution (×2 as MSBD "
        "with --stage-ratio 2) + blended diffusion from an intermediate step against a low-passed "
        "original, tiled above --max-side. The result is the original outside the mask, pixel "
        "for pixel. Writes OUT, OUT_sheet.png (every stage) and OUT.json.")
    cascade_args(p, "reranking and the CLIP score")
    p.add_argument("--image", required=True, help="the input image")
    p.add_argument("--mask", required=True, help="the mask image: white = edit (grey values are "
                   "thresholded at 0.5)")
    p.add_argument("--prompt", required=True, help="the edited image described in words")
    p.add_argument("--size", type=int, help="output side: the (square) image and mask are resized "
                   "to SIZE² first, e.g. 1024 or 2048 (default: the image's own size)")
    for name, help, kw in BLEND_FLAGS:
        flag(p, name, "engine.blend_options:Options", help, **kw)
    p.add_argument("--out", required=True, help="output image; .png keeps the outside of the mask "
                   "exact, .jpg does not; written only when complete")


def _ti(sub):
    p = sub.add_parser(
        "train-ti", help="images of a concept → multiresolution textual-inversion embeddings",
        description="Learn K time-indexed pseudo-word embeddings of a concept from a few images "
        "(multiresolution textual inversion): each step trains the row of its timestep's bin; "
        "everything else stays frozen. Checkpoints to OUT.ckpt.safetensors; a rerun of the same "
        "command resumes from it. Sample with --embeddings OUT and <C>, <C|i|>, <C(i)>, <C[i]>.")
    model_args(p, DEFAULT_MODEL)
    p.add_argument("--images", required=True, help="a folder of images of the concept (3–5 is "
                   "typical)")
    p.add_argument("--token", required=True, help="the concept's name C, written <C|i|> etc. in "
                   "prompts")
    p.add_argument("--init-token", required=True, help="a one-token word every row starts from, "
                   "e.g. star")
    cfg = "engine.multires:TrainConfig"
    flag(p, "--steps", cfg, "optimiser steps")
    flag(p, "--bins", cfg, "K, the number of time bins")
    flag(p, "--batch", cfg, "examples per step")
    flag(p, "--lr", cfg, "AdamW learning rate", note=": the reference's 5e-4 scaled by its "
         "batch of 4")
    flag(p, "--weight-decay", cfg, "AdamW weight decay of the K rows")
    flag(p, "--templates", cfg, "prompt templates: the TI object or style sets, or the "
         "embedded model's caption language; auto = object when the tokenizer knows its words, "
         "else world", choices=["auto", *TEMPLATES])
    flag(p, "--flip", cfg, "probability of a horizontal flip")
    p.add_argument("--center-crop", action="store_true", help="centre-crop each image to a square "
                   "first")
    p.add_argument("--resolution", type=int, help="training side in pixels (default: the model's "
                   "size)")
    flag(p, "--seed", cfg, "seed of every step's draws")
    flag(p, "--checkpoint-every", cfg, "steps between checkpoints")
    p.add_argument("--out", required=True, help="the embeddings file (.safetensors); written only "
                   "when complete")
    x = sub.add_parser("export-ti", help="one row of a train-ti file → a diffusers "
                       "learned_embeds.safetensors", description="Write row I of a "
                       "multiresolution embeddings file as a single-vector embedding that "
                       "diffusers' load_textual_inversion (and --embeddings) read.")
    x.add_argument("--embeddings", required=True, help="a file written by train-ti")
    x.add_argument("--row", type=int, required=True, help="the time bin to export, 0..K−1 (0 = "
                   "finest detail)")
    x.add_argument("--token", help="the token string in the file (default <C>)")
    x.add_argument("--out", required=True, help="output .safetensors (e.g. "
                   "learned_embeds.safetensors)")


def _serve(sub):
    s = sub.add_parser("serve", help="an HTTP server: OpenAI Images API, AUTOMATIC1111 sdapi, the "
                       "engine's edits", description="Serve the model over HTTP: OpenAI's "
                       "/v1/images/generations and /v1/images/edits, AUTOMATIC1111's "
                       "/sdapi/v1/txt2img and /sdapi/v1/img2img, /engine/v1/edit, blend and "
                       "iterinv-edit with the commands' options, /health and /metrics. "
                       "Concurrent requests that can share a denoising loop run as one batch, "
                       "each image the same as alone. With ENGINE_API_KEY set in the "
                       "environment, every route but /health asks for Authorization: Bearer "
                       "KEY. Needs the extra engine[serve].")
    model_args(s, DEFAULT_MODEL, job=False)
    prompt_args(s)
    s.add_argument("--upscaler", default=str(DEFAULT_UPSCALER), help="the ×4 model of blended "
                   "edits (default: the embedded weights/tiny-x4)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w, lim = "engine.jobs:Worker", "engine.api:Limits"
    flag(s, "--max-batch", w, "images run in one denoising loop at most")
    flag(s, "--max-wait", w, "seconds a batch waits for more requests to join it")
    flag(s, "--max-queue", w, "images waiting at most; more are answered 503 with Retry-After")
    flag(s, "--max-images", lim, "images one request may ask for")
    flag(s, "--max-pixels", lim, "pixels of one image at most")
    flag(s, "--max-steps", lim, "sampling steps one request may ask for")


def _demo(sub):
    d = sub.add_parser("demo", help="text→image, img2img and ×4 upscales on the embedded model, "
                       "into out/", description="Text→image, img2img, a ×4 upscale to 256² and a "
                       "tiled ×4 upscale to 1024² on the embedded model; PNGs and a captioned "
                       "contact sheet under --out.")
    flag(d, "--out", "engine.demo:run", "output folder", note="/")
    flag(d, "--steps", "engine.demo:run", "DDIM steps of the base model")
    flag(d, "--sr-steps", "engine.demo:run", "DDIM steps of each upscale")
    flag(d, "--seed", "engine.demo:run", "seed of every stage")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


class Parser(argparse.ArgumentParser):
    """Its errors (and its subcommands') are one `error:` line, exit 2, as every bad input is."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class RaisingParser(argparse.ArgumentParser):
    """Its errors raise ValueError (a server's requests)."""

    def error(self, message):
        raise ValueError(message)


def parser(cls=Parser) -> argparse.ArgumentParser:
    ap = cls(prog="python -m engine", description="A small Stable-Diffusion-family engine.")
    sub = ap.add_subparsers(dest="command", required=True)
    _sampling(sub)
    _invert(sub)
    _edit(sub)
    _p2p(sub)
    _iterinv(sub, edit=False)
    _iterinv(sub, edit=True)
    _blend(sub)
    _ti(sub)
    _serve(sub)
    _demo(sub)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""
    signum = signal.SIGTERM


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    """Run one command. A bad input: one `error:` line, exit 2. Ctrl-C or SIGTERM: one
    `interrupted:` line, exit 130 or 143. Either way the command's outputs are taken back."""
    args = parser().parse_args(argv)
    from . import commands, images  # torch: after parsing, so that --help is quick
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        with images.outputs():
            commands.HANDLERS[args.command](args)
    except (ValueError, OSError, KeyError, FloatingPointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = 128 + getattr(e, "signum", signal.SIGINT)
        line = f"interrupted: {getattr(e, 'hint', None) or 'no output written'}"
    else:
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(line, file=sys.stderr)  # once the traceback is freed, so progress bars have closed
    return code
