"""Command-line flags written once: a flag that sets a parameter of the Python API takes its default
from the API (`flag`), and the flag groups that several commands share. The defaults are read from
the API's source, so building the parser imports no torch and `--help` is quick."""
import argparse
import ast
import functools
import importlib.util
from pathlib import Path

from .embedded import DEFAULT_MODEL, DEFAULT_UPSCALER


@functools.cache
def _source(module: str) -> ast.Module:
    return ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))


def _defaults(fn: ast.FunctionDef) -> dict:
    a = fn.args
    named = [p.arg for p in a.posonlyargs + a.args]
    out = dict(zip(named[len(named) - len(a.defaults):], a.defaults))
    out.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    return out


def api_default(src: str, name: str):
    """The default of parameter `name` of `src`: "module:function", "module:Class.method" or
    "module:Class" (its __init__, or a dataclass's field), a literal in the module's source."""
    module, qualname = src.split(":")
    node = _source(module)
    for part in qualname.split("."):
        node = next(n for n in node.body if getattr(n, "name", None) == part)
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if getattr(n, "name", None) == "__init__"), None)
        if init is None:
            fields = {n.target.id: n.value for n in node.body if isinstance(n, ast.AnnAssign)}
            return ast.literal_eval(fields[name])
        node = init
    return ast.literal_eval(_defaults(node)[name])


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def flag(p, name: str, src, help: str, *, param: str | None = None, note: str = "",
         none: str | None = None, **kw) -> argparse.Action:
    """Add option `name` to parser `p` with the default of `src`'s `param` (default: the option's
    dest) and a help that ends in "(default X)": X the default then `note`, or ": `none`" for a
    None or empty default. int and float defaults set the option's type."""
    dest = kw.get("dest") or name.lstrip("-").replace("-", "_")
    default = api_default(src, param or dest)
    if none is not None and default in (None, ""):
        help += f" (default: {none})"
    elif default is not None:
        help += f" (default {_show(default)}{note})"
    if type(default) in (int, float) and "type" not in kw and "action" not in kw:
        kw["type"] = type(default)
    return p.add_argument(name, default=default, help=help, **kw)


def model_args(p, model, job: bool = True):
    """The model to load and how: every command but demo and export-ti; job: also --profile and
    --quiet, which a server has not."""
    where = model.relative_to(model.parent.parent)
    p.add_argument("--model", default=str(model), help="a diffusers model folder (with "
                   "model_index.json) or a single-file checkpoint (.safetensors only: SD 1.x/2.x, "
                   "SDXL, their inpainting models, the x4 upscaler); default: the embedded model "
                   f"{where}")
    flag(p, "--config", "engine:load", "single-file checkpoints only: a diffusers folder whose "
         "configs and tokenizer to use instead of those inferred (its weights are not needed)")
    flag(p, "--tokenizer", "engine:load", "single-file checkpoints only: a CLIP tokenizer folder "
         "(vocab.json + merges.txt); without one the Hugging Face cache, then the BPE file of an "
         "installed open-clip-torch, is used", none="looked for")
    flag(p, "--prediction-type", "engine:load", "override the scheduler's prediction type (e.g. "
         "v_prediction for SD 2.x 768-v single files)",
         choices=["epsilon", "v_prediction", "sample"])
    flag(p, "--variant", "engine:load", "load weight files of this variant, e.g. fp16 "
         "(unet/diffusion_pytorch_model.fp16.safetensors)")
    flag(p, "--dtype", "engine:load", "weights and compute dtype",
         choices=["float32", "float16", "bfloat16"])
    flag(p, "--device", "engine:load", "torch device, e.g. cpu or cuda")
    flag(p, "--max-memory", "engine:load", "memory this process may use in all, e.g. 8G: a job "
         "whose estimated peak does not fit is refused before it starts, naming a size that fits",
         none="what the device has free")
    if not job:
        return
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace to DIR "
                   "and print a per-stage timing table (tokenize, text encode, each UNet step, "
                   "VAE decode)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def prompt_args(p):
    """Pseudo-words for the prompts."""
    p.add_argument("--embeddings", action="append", default=[], metavar="FILE",
                   help="pseudo-words for the prompts: a train-ti file (write <C>, <C|i|>, <C(i)>, "
                   "<C[i]>, or C*|t|, C*(t), C*[t]) or a diffusers / A1111 .safetensors embedding "
                   "(write <name>); repeat for several. A backslash keeps text as written: "
                   "\\<b> is the text <b>")
    flag(p, "--semi", "engine:load", "what <C(i)> puts in the concept's place: a zero input vector "
         "up to bin i (the paper's code) or nothing below bin i (its DreamBooth pipeline)",
         choices=["zero", "remove"])
    p.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="FILE[:SCALE]",
                   help="a LoRA merged into the model's weights at SCALE (default 1): kohya / "
                   "AUTOMATIC1111 (with LoCon) or diffusers / PEFT .safetensors; repeat for "
                   "several. Only the base model of iterinv / blend takes LoRAs")
    flag(p, "--lora-dir", "engine:load", "where <lora:NAME:SCALE> in a prompt finds "
         "NAME.safetensors (searched below it too); such a LoRA is merged for that job",
         none="none")
    p.add_argument("--lora-strict", type=on_off, default=True, metavar="on|off", help="on: a LoRA "
                   "key this model cannot take is an error naming it; off: such keys are listed "
                   "in a warning and skipped (default on)")


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off")
    return text == "on"


def lora_arg(text: str) -> tuple[str, float]:
    """FILE[:SCALE] → (FILE, SCALE); a colon not followed by a number belongs to the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


# engine.ksample's, written out so that --help imports no torch
SAMPLER_NAMES = ("ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm")
SCHEDULE_NAMES = ("default", "karras", "exponential")
# --fast: the deterministic sampler and step count that match DDIM-50 with the fewest UNet calls on
# the embedded model (bench/bench_samplers.py → bench/results/samplers.json, "fast_default")
FAST = {"sampler": "dpmpp_2m", "steps": 15}


class Fast(argparse.Action):
    """--fast: set --sampler and --steps to FAST (flags after it still win)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for k, v in FAST.items():
            setattr(namespace, k, v)


def sampling_args(p, api, model):
    """generate / img2img / inpaint / upscale: the model, the prompts and the sampling flags of
    method `api`."""
    model_args(p, model)
    prompt_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    flag(p, "--negative", api, "negative prompt, used as the unconditional branch of CFG",
         none="empty")
    flag(p, "--steps", api, "number of DDIM denoising steps")
    flag(p, "--guidance", api, "classifier-free guidance scale; ≤ 1 turns CFG off")
    flag(p, "--seed", api, "seed of the CPU generator; same seed → same image")
    flag(p, "--eta", api, "DDIM eta: 0 deterministic, 1 DDPM-like")
    flag(p, "--sampler", api, "ddim, or a σ-space sampler with the same image as its diffusers "
         "scheduler: euler (EulerDiscrete), euler_a (EulerAncestralDiscrete), heun "
         "(HeunDiscrete), dpmpp_2m and dpmpp_2m_sde (DPMSolverMultistep), unipc "
         "(UniPCMultistep), lcm (LCM, for LCM-distilled models)",
         choices=list(SAMPLER_NAMES))
    flag(p, "--schedule", api, "the σ grid of a σ-space sampler: the scheduler's default, karras "
         "or exponential", choices=list(SCHEDULE_NAMES))
    p.add_argument("--fast", action=Fast, nargs=0, help=f"--sampler {FAST['sampler']} --steps "
                   f"{FAST['steps']}: as good as 50 DDIM steps on the embedded model with the "
                   "fewest UNet calls (bench/README.md); flags after it still win")
    p.add_argument("--out", required=True, help="output image file (.png/.jpg); written only when "
                   "complete")


def cascade_args(p, clip_use: str):
    """iterinv / iterinv-edit / blend: the base model, its ×4 stage and the CLIP scorer."""
    model_args(p, DEFAULT_MODEL)
    prompt_args(p)
    p.add_argument("--upscaler", default=str(DEFAULT_UPSCALER), help="the ×4 super-resolution "
                   "model folder (default: the embedded weights/tiny-x4)")
    p.add_argument("--clip", help=f"CLIP checkpoint for {clip_use} (default: the model's tiny "
                   "CLIP)")
