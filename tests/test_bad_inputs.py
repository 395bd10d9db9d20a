"""Bad inputs, one table: every command and the Python API.

A command given a bad input exits 2 with one `error: <what> — <how to fix>` line on stderr, no
traceback, and writes nothing; one that needs no model to be checked is refused before a model
loads. The API raises the error type of the case with the same kind of message. Model-file
corruption cases are in test_errors.py."""
import json
import os
import re
import shlex
import struct
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import engine
from engine import checkpoints, multires, prompt
from engine.blended import MultiStage, Options
from engine.cli import main
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.iterinv import Cascade
from engine.prompt import Concept

DIM = json.loads((DEFAULT_MODEL / "text_encoder" / "config.json").read_text())["hidden_size"]
MODELS = {"tiny": DEFAULT_MODEL, "x4": DEFAULT_UPSCALER}

# what a CLI case leaves out: valid, cheap settings
DEFAULTS = {
    "generate": "--prompt a --steps 2 --out out.png",
    "img2img": "--image in.png --prompt a --steps 2 --out out.png",
    "upscale": "--image small.png --prompt a --steps 2 --out out.png",
    "invert": "--image in.png --steps 2 --out inv.safetensors",
    "edit": "--image in.png --prompt a --steps 2 --out out.png",
    "p2p": "--image in.png --source a --prompt b --steps 2 --out out.png",
    "iterinv": "--image in.png --prompt a --steps 2 --out res",
    "iterinv-edit": "--image in.png --prompt a --edit b --steps 2 --out res",
    "blend": "--image in.png --mask mask.png --prompt a --steps 2 --out out.png",
    "train-ti": "--images imgs --token c --init-token star --steps 2 --out c.safetensors",
    "export-ti": "--embeddings mr.safetensors --row 0 --out e.safetensors",
    "demo": "--steps 2 --sr-steps 2 --out d",
}


@dataclass(frozen=True)
class Case:
    """args: a CLI command line (model paths as {tiny} / {x4}), or a function of the inputs that
    calls the Python API. match: in the message. error: the API's exception type. loads: the
    check needs the model, so it comes after the model loads."""
    id: str
    args: object
    match: str
    error: type = ValueError
    loads: bool = False


def cli(id, args, match, loads=False):
    return Case(id, args, match, loads=loads)


def api(id, call, error, match):
    return Case(f"api-{id}", call, match, error)


class Quick:
    """A Pipeline or Cascade whose methods default to 2 steps and no progress bar, so that a bad
    input the engine took would still end quickly."""

    def __init__(self, obj):
        self.obj, self.model = obj, getattr(obj, "model", None)

    def __getattr__(self, name):
        method = getattr(self.obj, name)
        return lambda *a, **kw: method(*a, **{"steps": 2, "progress": False, **kw})


def _img(side=64, height=None):
    return Image.fromarray(np.zeros((height or side, side, 3), np.uint8))


CASES = [
    # ---- generate
    cli("generate-unknown-pseudo-word", "generate --prompt 'a <b> star'",
        "unknown pseudo-word <b>"),
    cli("generate-unclosed-pseudo-word", "generate --prompt 'a <b(3 star'", "unclosed"),
    cli("generate-mismatched-brackets", "generate --prompt '<b(3]>'",
        "opened with '(' but closed with ']'"),
    cli("generate-paper-t-above-1", "generate --prompt 'b*(1.5)'", "t = 1.5 is above 1"),
    cli("generate-negative-bad-bin", "generate --negative '<b|x|>'", "'x' is not a whole bin"),
    cli("generate-bin-out-of-range", "generate --embeddings mr.safetensors --prompt '<c|12|>'",
        "bin 12 is out of range"),
    cli("generate-bins-of-ordinary-word", "generate --embeddings plain.safetensors "
        "--prompt '<p|2|>'", "ordinary pseudo-word with no time bins"),
    cli("generate-embeddings-missing", "generate --embeddings nope.safetensors",
        "no such embeddings file"),
    cli("generate-embeddings-not-safetensors", "generate --embeddings text.safetensors",
        "not a readable .safetensors file"),
    cli("generate-embeddings-pickled", "generate --embeddings emb.pt", "pickled embeddings"),
    cli("generate-embeddings-two-tensors", "generate --embeddings two.safetensors",
        "are not an embedding file"),
    cli("generate-embeddings-3d", "generate --embeddings rank3.safetensors",
        "need (n, D) or (D,) float vectors"),
    cli("generate-embeddings-sdxl", "generate --embeddings xl.safetensors",
        f"2048-d vectors but this model's text encoder is {DIM}-d", loads=True),
    cli("generate-embeddings-other-width", "generate --embeddings dim7.safetensors",
        f"7-d vectors but this model's text encoder is {DIM}-d", loads=True),
    cli("generate-embeddings-nan", "generate --embeddings nan.safetensors", "NaN/inf", loads=True),
    cli("generate-out-unknown-suffix", "generate --out out.xyz", "unknown image extension '.xyz'"),
    cli("generate-out-no-suffix", "generate --out out", "unknown image extension ''"),
    cli("generate-out-is-a-folder", "generate --out imgs", "is a folder"),
    cli("generate-out-folder-missing", "generate --out no/such/dir.png", "does not exist"),
    cli("generate-out-read-only-folder", "generate --out ro/out.png", "is not writable"),
    cli("generate-out-checked-before-the-model", "generate --model nope --out imgs",
        "is a folder"),
    cli("generate-steps-zero", "generate --steps 0", "steps=0"),
    cli("generate-steps-negative", "generate --steps -3", "steps=-3"),
    cli("generate-steps-over-the-schedule", "generate --steps 5000",
        "steps=5000: need a whole number in [1, 1000]", loads=True),
    cli("generate-steps-not-a-number", "generate --steps abc", "--steps"),
    cli("generate-guidance-nan", "generate --guidance nan", "guidance=nan"),
    cli("generate-guidance-inf", "generate --guidance inf", "guidance=inf"),
    cli("generate-guidance-negative", "generate --guidance -1", "guidance=-1.0"),
    cli("generate-eta-nan", "generate --eta nan", "eta=nan"),
    cli("generate-height-zero", "generate --height 0", "height=0"),
    cli("generate-width-negative", "generate --width -64", "width=-64"),
    cli("generate-height-not-a-multiple", "generate --height 62", "height=62", loads=True),
    cli("generate-sides-100000", "generate --height 100000 --width 100000", "over the limit"),
    cli("generate-over-max-memory", "generate --height 4096 --width 4096 --max-memory 1G",
        "fits); pass a smaller height / width", loads=True),
    cli("generate-max-memory-not-a-size", "generate --max-memory lots", "max_memory='lots'"),
    cli("blend-over-max-memory", "blend --size 4096 --max-memory 1G",
        "fits); pass a smaller --size, or edit a crop around the mask (--margin)", loads=True),
    cli("upscale-over-max-memory", "upscale --image big.png --max-memory 700M",
        "fits); pass a smaller image", loads=True),
    cli("generate-seed-too-big", "generate --seed 18446744073709551616",
        "seed=18446744073709551616"),
    cli("generate-model-missing", "generate --model nope", "does not exist", loads=True),
    cli("generate-model-not-a-checkpoint", "generate --model in.png",
        "unknown checkpoint type '.png'", loads=True),
    cli("generate-model-folder-without-index", "generate --model imgs", "has no model_index.json",
        loads=True),
    cli("generate-model-is-an-upscaler", "generate --model {x4}", "this is an x4 upscaler model",
        loads=True),
    cli("generate-variant-missing", "generate --variant fp16", "(variant 'fp16')", loads=True),
    cli("generate-device-unavailable", "generate --device warp9", "not a torch device",
        loads=True),
    cli("generate-profile-is-a-file", "generate --profile in.png", "exists and is not a folder"),
    cli("generate-profile-taken-back", "generate --profile prof --width 62", "width=62",
        loads=True),
    # ---- img2img
    cli("img2img-image-missing", "img2img --model nope --image missing.png", "no such image file"),
    cli("img2img-image-is-a-folder", "img2img --image imgs", "is a folder; pass an image file"),
    cli("img2img-image-is-text", "img2img --image text.png", "not a readable image"),
    cli("img2img-image-0-bytes", "img2img --image empty.png", "not a readable image"),
    cli("img2img-image-truncated", "img2img --image trunc.png", "image file is truncated"),
    cli("img2img-image-header-30000", "img2img --model nope --image huge.png", "over the limit"),
    cli("img2img-image-header-200000", "img2img --image bomb.png", "over the limit"),
    cli("img2img-image-not-a-multiple", "img2img --image odd.png", "multiples of 4", loads=True),
    cli("img2img-strength-zero", "img2img --strength 0", "strength=0.0"),
    cli("img2img-strength-above-1", "img2img --strength 1.5", "strength=1.5"),
    cli("img2img-strength-nan", "img2img --strength nan", "strength=nan"),
    cli("img2img-strength-leaves-no-step", "img2img --strength 0.01",
        "leaves no denoising step", loads=True),
    # ---- upscale
    cli("upscale-base-model", "upscale --model {tiny}", "needs an x4 upscaler model", loads=True),
    cli("upscale-noise-level-above-max", "upscale --noise-level 400", "noise_level=400",
        loads=True),
    cli("upscale-noise-level-negative", "upscale --noise-level -1", "noise_level=-1", loads=True),
    cli("upscale-backproject-negative", "upscale --backproject -1", "backproject=-1"),
    cli("upscale-tile-not-a-multiple-of-8", "upscale --tile 12", "tile=12"),
    cli("upscale-overlap-not-below-tile", "upscale --tile 8 --overlap 8", "overlap=8"),
    cli("upscale-image-header-200000", "upscale --image bomb.png", "over the limit"),
    # ---- invert
    cli("invert-out-not-safetensors", "invert --out inv.png", "need a .safetensors path"),
    cli("invert-out-folder-missing", "invert --out no/inv.safetensors", "in an existing folder"),
    cli("invert-reconstruction-unknown-suffix", "invert --reconstruction rec.xyz",
        "unknown image extension '.xyz'"),
    cli("invert-reconstruction-is-a-folder", "invert --reconstruction imgs", "is a folder"),
    cli("invert-steps-zero", "invert --steps 0", "steps=0"),
    cli("invert-prompt-unknown-pseudo-word", "invert --prompt '<b>'", "unknown pseudo-word <b>"),
    cli("invert-image-truncated", "invert --image trunc.png", "not a readable image"),
    cli("invert-null-text-without-guidance", "invert --null-text fast --guidance 1",
        "needs guidance > 1"),
    # ---- edit
    cli("edit-lambda-above-1", "edit --lambda 1.5", "lambda=1.5"),
    cli("edit-inject-steps-above-steps", "edit --inject-steps 5", "inject_steps=5"),
    cli("edit-every-zero", "edit --every 0", "every=0"),
    cli("edit-pairing-unknown", "edit --pairing next", "pairing"),
    cli("edit-prompt-file-missing", "edit --prompt-file nope.txt", "no such prompt file"),
    cli("edit-prompt-file-empty", "edit --prompt-file blank.txt", "has no prompts"),
    cli("edit-source-unknown-pseudo-word", "edit --source '<b>'", "unknown pseudo-word <b>"),
    cli("edit-clip-missing", "edit --clip nope", "no CLIP image tower"),
    cli("edit-out-unknown-suffix", "edit --out out.txt", "unknown image extension '.txt'"),
    cli("edit-image-not-a-multiple", "edit --image odd.png", "multiples of 4", loads=True),
    # ---- iterinv
    cli("iterinv-image-not-square", "iterinv --image rect.png", "square"),
    cli("iterinv-out-is-a-file", "iterinv --out in.png", "exists and is not a folder"),
    cli("iterinv-out-parent-missing", "iterinv --out no/res", "does not exist"),
    cli("iterinv-steps-zero", "iterinv --steps 0", "steps=0"),
    cli("iterinv-guidance-nan", "iterinv --guidance nan", "guidance=nan"),
    cli("iterinv-tile-zero", "iterinv --tile 0", "tile=0"),
    cli("iterinv-upscaler-missing", "iterinv --upscaler nope", "nope does not exist"),
    cli("iterinv-size-not-a-choice", "iterinv --size 512", "--size"),
    cli("iterinv-upscaler-not-x4", "iterinv --upscaler {tiny}", "an x4 upscaler model",
        loads=True),
    cli("iterinv-noise-level-above-max", "iterinv --noise-level 1000", "noise_level=1000",
        loads=True),
    # ---- iterinv-edit
    cli("iterinv-edit-inversion-missing", "iterinv-edit --inversion nope.safetensors",
        "no such inversion file"),
    cli("iterinv-edit-inversion-not-safetensors", "iterinv-edit --inversion text.safetensors",
        "not a readable .safetensors file"),
    cli("iterinv-edit-inversion-of-something-else", "iterinv-edit --inversion two.safetensors",
        "not a cascade inversion file"),
    cli("iterinv-edit-strength-zero", "iterinv-edit --strength 0", "strength=0.0"),
    cli("iterinv-edit-mask-strength-zero", "iterinv-edit --mask-strength 0", "mask_strength=0.0"),
    cli("iterinv-edit-mask-ratio-nan", "iterinv-edit --mask-ratio nan", "mask_ratio=nan"),
    cli("iterinv-edit-backproject-negative", "iterinv-edit --backproject -1", "backproject=-1"),
    cli("iterinv-edit-edit-guidance-negative", "iterinv-edit --edit-guidance -2",
        "guidance=-2.0"),
    cli("iterinv-edit-edit-unknown-pseudo-word", "iterinv-edit --edit '<b>'",
        "unknown pseudo-word <b>"),
    # ---- blend
    cli("blend-mask-other-shape", "blend --mask wide.png", "but the image is 64×64"),
    cli("blend-mask-missing", "blend --mask nope.png", "no such image file"),
    cli("blend-mask-truncated", "blend --mask trunc.png", "not a readable image"),
    cli("blend-image-not-square-without-margin", "blend --image rect.png --mask rect.png",
        "without --margin"),
    cli("blend-size-not-a-multiple-of-16", "blend --size 100", "a multiple of 16"),
    cli("blend-size-100000", "blend --size 100000", "over the limit"),
    cli("blend-margin-below-1", "blend --margin 0.5", "margin=0.5"),
    cli("blend-max-side-not-a-multiple-of-16", "blend --max-side 100", "max_side=100"),
    cli("blend-candidates-zero", "blend --candidates 0", "candidates=0"),
    cli("blend-start-above-one", "blend --start 1.5", "start=1.5"),
    cli("blend-stage-guidance-negative", "blend --stage-guidance -1", "stage_guidance=-1.0"),
    cli("blend-stage-ratio-3", "blend --stage-ratio 3", "invalid choice: 3"),
    # ---- p2p
    cli("p2p-cross-above-1", "p2p --cross 1.5", "cross=1.5"),
    cli("p2p-self-attention-negative", "p2p --self-attention -0.5", "self_attention=-0.5"),
    cli("p2p-null-text-without-guidance", "p2p --guidance 1", "needs guidance > 1"),
    cli("p2p-source-unknown-pseudo-word", "p2p --source '<b>'", "unknown pseudo-word <b>"),
    cli("p2p-prompt-break", "p2p --prompt 'a BREAK b'", "BREAK starts a chunk", loads=True),
    cli("blend-seed-too-big", "blend --seed 18446744073709551616", "seed="),
    cli("blend-prompt-unknown-pseudo-word", "blend --prompt '<b>'", "unknown pseudo-word <b>"),
    cli("blend-clip-missing", "blend --clip nope", "no CLIP image tower"),
    cli("blend-candidates-without-clip", "blend --model noclip", "needs a CLIP scorer"),
    cli("blend-out-is-a-folder", "blend --out imgs", "is a folder"),
    cli("blend-image-below-base-side", "blend --image small.png --mask small_mask.png",
        "at least the base model's 64²", loads=True),
    # ---- train-ti
    cli("train-ti-images-missing", "train-ti --images nope", "no such folder of training images"),
    cli("train-ti-images-none", "train-ti --images noimgs", "no images"),
    cli("train-ti-image-unreadable", "train-ti --images badimgs", "not a readable image"),
    cli("train-ti-token-with-space", "train-ti --token 'a b'", "token='a b'"),
    cli("train-ti-lr-nan", "train-ti --lr nan", "lr=nan"),
    cli("train-ti-bins-zero", "train-ti --bins 0", "bins=0"),
    cli("train-ti-resolution-negative", "train-ti --resolution -64", "resolution=-64"),
    cli("train-ti-out-not-safetensors", "train-ti --out c.png", "need a .safetensors path"),
    cli("train-ti-flip-above-1", "train-ti --flip 2", "flip=2"),
    cli("train-ti-init-token-of-several-tokens", "train-ti --init-token 'two words'",
        "need a single token", loads=True),
    # ---- export-ti
    cli("export-ti-embeddings-missing", "export-ti --embeddings nope.safetensors",
        "no such embeddings file"),
    cli("export-ti-ordinary-embedding", "export-ti --embeddings plain.safetensors",
        "an ordinary embedding already"),
    cli("export-ti-row-out-of-range", "export-ti --row 4", "row=4"),
    cli("export-ti-out-not-safetensors", "export-ti --out e.png", "need a .safetensors path"),
    # ---- demo
    cli("demo-steps-zero", "demo --steps 0", "steps=0"),
    cli("demo-sr-steps-zero", "demo --sr-steps 0", "sr_steps=0"),
    cli("demo-out-in-a-read-only-folder", "demo --out ro/d", "the folder ro is not writable"),
    cli("demo-out-is-a-file", "demo --out in.png", "exists and is not a folder"),
    cli("demo-out-under-a-file", "demo --out in.png/d", "exists and is not a folder"),
    cli("demo-seed-too-big", "demo --seed 18446744073709551616", "seed="),
    # ---- Python API
    api("load-missing-path", lambda f: engine.load(f.dir / "nope"), engine.LoadError,
        "does not exist"),
    api("load-dtype", lambda f: engine.load(dtype="float64"), ValueError, "dtype='float64'"),
    api("load-semi", lambda f: engine.load(semi="half"), ValueError, "semi='half'"),
    api("load-max-memory", lambda f: engine.load(max_memory="8X"), ValueError,
        "max_memory='8X'"),
    api("load-device", lambda f: engine.load(device="warp9"), engine.LoadError,
        "not a torch device"),
    api("load-embeddings-missing", lambda f: engine.load(embeddings=str(f.dir / "no.safetensors")),
        FileNotFoundError, "no.safetensors"),
    api("load-embeddings-pickled", lambda f: engine.load(embeddings=f.dir / "emb.pt"),
        engine.LoadError, "pickled"),
    api("generate-steps-float", lambda f: f.base.generate("a", steps=2.5), ValueError, "steps=2.5"),
    api("generate-guidance-string", lambda f: f.base.generate("a", guidance="7"), ValueError,
        "guidance='7'"),
    api("generate-eta-negative", lambda f: f.base.generate("a", eta=-1), ValueError, "eta=-1"),
    api("generate-height-bool", lambda f: f.base.generate("a", height=True), ValueError,
        "height=True"),
    api("generate-width-not-a-multiple", lambda f: f.base.generate("a", width=66), ValueError,
        "width=66"),
    api("generate-sides-100000", lambda f: f.base.generate("a", height=100000, width=100000),
        ValueError, "over the limit"),
    api("generate-seed-string", lambda f: f.base.generate("a", seed="x"), ValueError, "seed='x'"),
    api("generate-seed-float", lambda f: f.base.generate("a", seed=1.5), ValueError, "seed=1.5"),
    api("generate-prompt-not-a-string", lambda f: f.base.generate(123), ValueError,
        "prompt: need a string"),
    api("generate-prompt-empty-list", lambda f: f.base.generate([]), ValueError,
        "prompt: need a string"),
    api("generate-negative-count", lambda f: f.base.generate(["a", "b"], negative=["x"]),
        ValueError, "1 negative prompts for 2 prompts"),
    api("generate-negative-not-a-string", lambda f: f.base.generate("a", negative=5), ValueError,
        "negative: need a string"),
    api("generate-output", lambda f: f.base.generate("a", output="np"), ValueError, "output='np'"),
    api("generate-unknown-pseudo-word", lambda f: f.base.generate("<zz>"),
        prompt.PromptError, "unknown pseudo-word <zz>"),
    api("generate-on-upscaler", lambda f: f.sr.generate("a"), ValueError,
        "this is an x4 upscaler model"),
    api("model-size", lambda f: f.base.model.size(62, 64), ValueError, "height=62"),
    api("img2img-strength-zero", lambda f: f.base.img2img(_img(), "a", strength=0), ValueError,
        "strength=0"),
    api("img2img-nan-pixels", lambda f: f.base.img2img(torch.full((1, 3, 64, 64), np.nan), "a"),
        ValueError, "NaN/inf"),
    api("img2img-tensor-shape", lambda f: f.base.img2img(torch.zeros(3, 64, 64), "a"), ValueError,
        "(B, 3, H, W) tensor"),
    api("img2img-path-missing", lambda f: f.base.img2img(f.dir / "nope.png", "a"),
        FileNotFoundError, "no such image file"),
    api("img2img-batch-of-sizes", lambda f: f.base.img2img([_img(), _img(64, 48)], "a"),
        ValueError, "need one size for a batch"),
    api("upscale-on-base", lambda f: f.base.upscale(_img(16), "a"), ValueError,
        "needs an x4 upscaler model"),
    api("upscale-noise-level", lambda f: f.sr.upscale(_img(16), "a", noise_level=351), ValueError,
        "noise_level=351"),
    api("upscale-tile", lambda f: f.sr.upscale(_img(16), "a", tile=12), ValueError, "tile=12"),
    api("upscale-overlap", lambda f: f.sr.upscale(_img(16), "a", tile=8, overlap=8), ValueError,
        "overlap=8"),
    api("upscale-backproject", lambda f: f.sr.upscale(_img(16), "a", backproject=1.5),
        ValueError, "backproject=1.5"),
    api("invert-null-text", lambda f: f.base.invert(_img(), null_text="exact"), ValueError,
        "null_text='exact'"),
    api("invert-convention", lambda f: f.base.invert(_img(), convention="sideways"), ValueError,
        "convention='sideways'"),
    api("invert-prompt-count", lambda f: f.base.invert(torch.zeros(2, 3, 64, 64), ["a"] * 3),
        ValueError, "3 prompts for 2 images"),
    api("edit-lambda", lambda f: f.base.edit(_img(), "a", lam=-0.1), ValueError, "lambda=-0.1"),
    api("p2p-cross", lambda f: f.base.prompt_to_prompt(_img(), "a", "b", cross=2), ValueError,
        "cross=2"),
    api("edit-every", lambda f: f.base.edit(_img(), "a", steps=4, every=0), ValueError,
        "every=0"),
    api("edit-inject-steps", lambda f: f.base.edit(_img(), "a", steps=4, inject_steps=5),
        ValueError, "inject_steps=5"),
    api("options-margin", lambda f: Options(margin=0.5), ValueError, "margin=0.5"),
    api("options-overlap", lambda f: Options(overlap=256), ValueError, "overlap=256"),
    api("options-blend", lambda f: Options(blend="sideways"), ValueError, "blend='sideways'"),
    api("multistage-order", lambda f: MultiStage(f.sr.model, f.base.model), ValueError,
        "need a text→image model and an x4 upscaler model"),
    api("cascade-pipelines", lambda f: Cascade(f.base.obj, f.sr.obj), TypeError,
        "need engine.model.Model objects"),
    api("cascade-tile", lambda f: Cascade(f.base.model, f.sr.model, tile=0), ValueError,
        "tile=0"),
    api("cascade-invert-size", lambda f: f.cascade.invert(_img(), "a", size=512), ValueError,
        "size=512"),
    api("cascade-invert-not-square", lambda f: f.cascade.invert(_img(64, 48), "a"), ValueError,
        "square"),
    api("cascade-invert-method", lambda f: f.cascade.invert(_img(), "a", method="magic"),
        ValueError, "method='magic'"),
    api("cascade-edit-mask-strength", lambda f: f.cascade.edit(_img(), "a", "b", [],
                                                               mask_strength=0), ValueError,
        "mask_strength=0"),
    api("trainconfig-token", lambda f: multires.TrainConfig("a b", "star").check(), ValueError,
        "token='a b'"),
    api("trainconfig-flip", lambda f: multires.TrainConfig("c", "star", flip=2.0).check(),
        ValueError, "flip=2.0"),
    api("export-row", lambda f: multires.export_row(multires.load_concepts(
        f.dir / "mr.safetensors")[0], 7, f.dir / "e.safetensors"), ValueError, "row=7"),
    api("parse-bin", lambda f: prompt.parse("<c|x|>"), prompt.PromptError,
        "'x' is not a whole bin number"),
]


# ---- the inputs every case may name, relative to the test's folder

def _png_header(path, side):
    """A PNG whose header says side × side: refused before any pixel is decoded."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def make_inputs(d):
    for name, (w, h, v) in {"in.png": (64, 64, 0), "odd.png": (62, 64, 0),
                            "rect.png": (64, 48, 255), "small.png": (16, 16, 0),
                            "small_mask.png": (16, 16, 255), "mask.png": (64, 64, 255),
                            "wide.png": (64, 32, 255), "big.png": (256, 256, 0)}.items():
        Image.fromarray(np.full((h, w, 3), v, np.uint8)).save(d / name)
    (d / "empty.png").write_bytes(b"")
    (d / "trunc.png").write_bytes((d / "in.png").read_bytes()[:60])
    (d / "text.png").write_text("not an image")
    _png_header(d / "huge.png", 30000)
    _png_header(d / "bomb.png", 200000)
    (d / "text.safetensors").write_text("hello")
    (d / "emb.pt").write_bytes(b"pickle")
    save_file({"a": torch.zeros(2, DIM), "b": torch.zeros(2, DIM)}, d / "two.safetensors")
    save_file({"<c>": torch.zeros(2, 3, DIM)}, d / "rank3.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, d / "xl.safetensors")
    save_file({"<c>": torch.zeros(1, 7)}, d / "dim7.safetensors")
    save_file({"<c>": torch.full((1, DIM), float("nan"))}, d / "nan.safetensors")
    save_file({"<p>": torch.zeros(1, DIM)}, d / "plain.safetensors")
    multires.save_concept(Concept("c", torch.zeros(4, DIM), True, "star"), d / "mr.safetensors")
    (d / "blank.txt").write_text("\n \n")
    for folder in ("imgs", "noimgs", "badimgs", "ro", "noclip"):
        (d / folder).mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "imgs" / "a.png")
    (d / "noimgs" / "notes.txt").write_text("no images here")
    (d / "badimgs" / "a.png").write_text("not an image")
    for part in DEFAULT_MODEL.iterdir():  # the embedded model without its CLIP scorer
        if part.name != "clip_scorer":
            (d / "noclip" / part.name).symlink_to(part)
    (d / "ro").chmod(0o555)


def listing(d):
    """Every path under d, with each file's size and modification time."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in d.rglob("*")}


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    if os.geteuid() == 0:  # root writes into a 0o555 folder: make the check see it as others do
        access, ro = os.access, tmp_path / "ro"
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (
            mode & os.W_OK and os.path.realpath(p) == str(ro.resolve())) else access(p, mode, **kw))
    yield tmp_path
    (tmp_path / "ro").chmod(0o755)


@pytest.fixture(scope="module")
def models():
    base, sr = engine.load(), engine.load(DEFAULT_UPSCALER)
    return SimpleNamespace(base=base, sr=sr, cascade=Cascade(base.model, sr.model))


def argv(args: str) -> list[str]:
    """The case's command line completed with DEFAULTS for every flag it leaves out."""
    cmd, *given = shlex.split(args.format(**MODELS))
    skip = set(given) | ({"--prompt"} if "--prompt-file" in given else set())
    base = shlex.split(DEFAULTS[cmd])
    rest = [t for k, v in zip(base[::2], base[1::2]) if k not in skip for t in (k, v)]
    return [cmd, *rest, *given] + ([] if cmd == "export-ti" else ["--quiet"])


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("a model loaded before the bad input was refused")


def _check_cli(case, d, monkeypatch, capsys):
    if not case.loads:
        monkeypatch.setattr(checkpoints, "load", _refuse_to_load)
    before = listing(d)
    try:
        rc = main(argv(case.args))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.match in lines[0], lines[0]
    assert out == ""
    assert listing(d) == before  # no output, no temporary, no folder, no input touched


def _check_api(case, d, models):
    f = SimpleNamespace(dir=d, base=Quick(models.base), sr=Quick(models.sr),
                        cascade=Quick(models.cascade))
    before = listing(d)
    with pytest.raises(case.error, match=re.escape(case.match)) as e:
        case.args(f)
    assert "\n" not in str(e.value)
    assert listing(d) == before


def test_the_table_has_one_row_per_id():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {shlex.split(c.args)[0] for c in CASES if isinstance(c.args, str)} == set(DEFAULTS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, monkeypatch, capsys, request):
    if isinstance(case.args, str):
        _check_cli(case, inputs, monkeypatch, capsys)
    else:
        _check_api(case, inputs, request.getfixturevalue("models"))
