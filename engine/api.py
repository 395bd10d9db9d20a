"""The HTTP APIs a server speaks, as requests → jobs (engine.jobs) → response bodies, with no web
framework: OpenAI's Images API, AUTOMATIC1111's sdapi, and the engine's own commands. Every
request is checked here, before it queues; a bad one raises BadRequest with one line naming the
field and the fix."""
import base64
import binascii
import io
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import images, ksample, lora, prompt as pr, rng
from .jobs import Job
from .sample import check_args, check_fraction

# AUTOMATIC1111's sampler names (and its `scheduler` names) → ours
A1111_SAMPLERS = {"DDIM": ("ddim", "default"), "Euler": ("euler", "default"),
                  "Euler a": ("euler_a", "default"), "Heun": ("heun", "default"),
                  "DPM++ 2M": ("dpmpp_2m", "default"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
                  "DPM++ 2M SDE": ("dpmpp_2m_sde", "default"),
                  "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
                  "UniPC": ("unipc", "default"), "LCM": ("lcm", "default")}
A1111_SCHEDULERS = {"Automatic": None, "Karras": "karras", "Exponential": "exponential"}
# A1111 fields whose truthy value asks for what this engine does not do: refused, not ignored
A1111_UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "script_name", "alwayson_scripts",
                     "override_settings", "refiner_checkpoint", "subseed_strength",
                     "inpaint_full_res", "image_cfg_scale")
# the engine's commands a server runs, and the flags a request may not set (the server's model,
# its files and its output paths are its own); images travel in the body as base64
COMMANDS = ("edit", "blend", "iterinv-edit")
SERVER_FLAGS = {"model", "upscaler", "config", "tokenizer", "prediction_type", "variant", "dtype",
                "device", "max_memory", "embeddings", "semi", "lora", "lora_dir", "lora_strict",
                "clip", "out", "profile", "quiet", "prompt_file", "inversion", "help"}
FILE_FLAGS = {"image", "mask"}


class BadRequest(ValueError):
    """A request the server refuses: `status` (400, 413, ...) and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""
    max_images: int = 16  # per request
    max_pixels: int = 1048576  # per image (1024²)
    max_steps: int = 150
    max_prompt: int = 4000  # characters
    max_body: int = 33554432  # bytes (32 MiB)

    def __post_init__(self):
        for k, v in vars(self).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}: need a whole number >= 1")


def _field(body: dict, name: str, kind, default=None, required=False):
    """body[name] checked to be of `kind` (int accepts whole floats from JSON clients)."""
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"{name}: required")
        return default
    v = body[name]
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        want = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
                list: "a list", dict: "an object"}[kind]
        raise BadRequest(f"{name}={v!r}: need {want}")
    return v


def decode_image(data, name: str, limits: Limits, keep_alpha=False) -> Image.Image:
    """A base64 (optionally a data: URL) or raw image → a PIL image, refused above max_pixels·4
    before it is decoded."""
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{name}: not base64 image data; send a PNG or JPEG as base64") \
                from None
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequest(f"{name}: need an image as a base64 string")
    try:
        im = images.decode(io.BytesIO(data), name, 4 * limits.max_pixels)
    except images.TooLarge as e:
        raise BadRequest(str(e), 413) from None
    except ValueError:
        raise BadRequest(f"{name}: not a readable image; send a PNG or JPEG") from None
    return im.convert("RGBA" if keep_alpha and "A" in im.getbands() else "RGB")


def encode_png(image: Image.Image) -> str:
    """Base64 of the PNG the CLI writes for the image (the same bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Models:
    """A server's loaded pipeline (`path`) and its ×4 stage (`upscaler`, loaded on first use by
    `load`, which the engine's commands call in place of engine.load)."""
    pipe: object
    path: str
    upscaler: str
    name: str = "engine"
    loaded: dict = field(default_factory=dict)

    def load(self, path=None):
        if path is None or str(path) == str(self.path):
            return self.pipe
        if str(path) != str(self.upscaler):
            raise ValueError(f"{path}: this server serves {self.path} and {self.upscaler} only")
        if "sr" not in self.loaded:
            import engine

            m = self.pipe.model
            self.loaded["sr"] = engine.load(self.upscaler, dtype=m.dtype, device=m.device)
        return self.loaded["sr"]


class Api:
    """Requests of the three APIs for a server's models."""

    def __init__(self, models: Models, limits: Limits = Limits()):
        self.models, self.pipe, self.limits = models, models.pipe, limits
        self.model_name = models.name

    # ---- shared checks ----------------------------------------------------------------------------

    def _seeds(self, seed, n: int) -> list[int]:
        """n seeds from `seed` (seed, seed + 1, ...; none or -1: a random start)."""
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**32)
        try:
            rng.check_seed(seed)
            rng.check_seed(seed + n - 1)
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e)) from None
        return [seed + i for i in range(n)]

    def _count(self, n, name="n") -> int:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.limits.max_images:
            raise BadRequest(f"{name}={n!r}: need 1 to {self.limits.max_images} images")
        return n

    def _texts(self, *texts):
        m = self.pipe.model
        for t in texts:
            if t is not None and len(t) > self.limits.max_prompt:
                raise BadRequest(f"prompt: {len(t)} characters, over this server's limit of "
                                 f"{self.limits.max_prompt}")
        try:
            pr.check([t for t in texts if t is not None], m.concepts)
            for name in pr.lora_tags([t for t in texts if t is not None]):
                lora.find(m.lora_dir, name)
        except (ValueError, OSError) as e:
            raise BadRequest(str(e).splitlines()[0]) from None

    def _sampling(self, params: dict, height: int, width: int) -> dict:
        """params (steps, guidance, sampler, schedule, eta, strength) and the size checked as the
        Pipeline checks them."""
        try:
            if params["steps"] > self.limits.max_steps:
                raise ValueError(f"steps={params['steps']}: this server takes at most "
                                 f"{self.limits.max_steps}")
            check_args(params["steps"], params["guidance"], params.get("eta", 0.0))
            ksample.pick(params["sampler"], params["schedule"], params.get("eta", 0.0))
            if "strength" in params:
                check_fraction("strength", params["strength"])
            self.pipe.model.size(height, width)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if height * width > self.limits.max_pixels:
            raise BadRequest(f"{width}×{height}: over this server's limit of "
                             f"{self.limits.max_pixels} pixels per image", 413)
        return params

    def _jobs(self, kind, prompt, negative, seeds, params, **more) -> list[Job]:
        self._texts(prompt, negative)
        return [Job(kind, prompt, negative, s, params, **more) for s in seeds]

    # ---- OpenAI -----------------------------------------------------------------------------------

    def _size(self, size) -> tuple[int, int]:
        side = self.pipe.model.side
        if size in (None, "auto"):
            return side, side
        try:
            w, h = (int(x) for x in str(size).lower().split("x"))
        except ValueError:
            raise BadRequest(f"size={size!r}: need WIDTHxHEIGHT, e.g. {side}x{side}") from None
        return h, w

    def _openai_params(self, body: dict) -> dict:
        fmt = _field(body, "response_format", str, "b64_json")
        if fmt != "b64_json":
            raise BadRequest(f"response_format={fmt!r}: this server returns images inline; use "
                             "b64_json")
        out = _field(body, "output_format", str, "png")
        if out != "png":
            raise BadRequest(f"output_format={out!r}: this server writes png")
        return dict(steps=_field(body, "steps", int, 50),
                    guidance=_field(body, "guidance_scale", float, 7.5),
                    sampler=_field(body, "sampler", str, "ddim"),
                    schedule=_field(body, "schedule", str, "default"))

    def _openai_reply(self, results, seeds) -> dict:
        return {"created": int(time.time()),
                "data": [{"b64_json": encode_png(im), "seed": s} for im, s in zip(results, seeds)]}

    def openai_generations(self, body: dict):
        """POST /v1/images/generations: prompt, n, size, response_format b64_json; extensions:
        seed, negative_prompt, steps, guidance_scale, sampler, schedule. Image i has seed
        seed + i."""
        prompt = _field(body, "prompt", str, required=True)
        n = self._count(_field(body, "n", int, 1))
        h, w = self._size(body.get("size"))
        params = self._sampling(dict(self._openai_params(body), height=h, width=w), h, w)
        seeds = self._seeds(_field(body, "seed", int), n)
        jobs = self._jobs("generate", prompt, _field(body, "negative_prompt", str), seeds, params)
        return jobs, lambda results: self._openai_reply(results, seeds)

    def openai_edits(self, form: dict, files: dict):
        """POST /v1/images/edits (multipart): image, mask (its fully transparent pixels are the
        part to edit; without one, the image's own), prompt, n, size, response_format; run as the
        engine's blended edit (`blend`), whose options are further fields."""
        image = files.get("image") or files.get("image[]")
        if image is None:
            raise BadRequest("image: required, a PNG file")
        im = decode_image(image, "image", self.limits, keep_alpha=True)
        holder = decode_image(files["mask"], "mask", self.limits, keep_alpha=True) \
            if files.get("mask") is not None else im
        if "A" not in holder.getbands():
            raise BadRequest("mask: need a PNG with an alpha channel whose fully transparent "
                             "pixels mark the part to edit (or an image with such pixels)")
        if holder.size != im.size:
            raise BadRequest(f"mask is {holder.width}×{holder.height} but the image is "
                             f"{im.width}×{im.height}; give them one size")
        edit = holder.getchannel("A").point(lambda a: 255 if a == 0 else 0)
        if edit.getbbox() is None:
            raise BadRequest("mask: no fully transparent pixel, so nothing to edit")
        fmt = form.pop("response_format", "b64_json")
        if fmt != "b64_json":
            raise BadRequest(f"response_format={fmt!r}: this server returns images inline; use "
                             "b64_json")
        n = self._count(_int(form.pop("n", "1"), "n"))
        size = form.pop("size", None)
        if size not in (None, "auto"):
            h, w = self._size(size)
            if h != w:
                raise BadRequest(f"size={size!r}: edits are square, e.g. 256x256")
            form["size"] = str(h)
        for k in ("model", "user", "quality", "background", "input_fidelity", "output_format"):
            form.pop(k, None)
        seeds = self._seeds(_int(form.pop("seed", None), "seed"), n)
        pics = {"image": im.convert("RGB"), "mask": edit.convert("RGB")}
        calls = [self._command("blend", dict(form, seed=str(s)), pics) for s in seeds]
        jobs = [Job("call", call=c) for c, _ in calls]
        return jobs, lambda results: {"created": int(time.time()), "data": [
            {"b64_json": r["image"], "seed": s} for r, s in zip(results, seeds)]}

    # ---- AUTOMATIC1111 ----------------------------------------------------------------------------

    def _a1111(self, body: dict, strength: bool):
        for k in A1111_UNSUPPORTED:
            if body.get(k):
                raise BadRequest(f"{k}: not supported by this server; leave it unset")
        name = _field(body, "sampler_name", str) or _field(body, "sampler_index", str) or "DDIM"
        if name not in A1111_SAMPLERS:
            raise BadRequest(f"sampler_name={name!r}: use one of {', '.join(A1111_SAMPLERS)}")
        sampler, schedule = A1111_SAMPLERS[name]
        sched = _field(body, "scheduler", str, "Automatic")
        if sched not in A1111_SCHEDULERS:
            raise BadRequest(f"scheduler={sched!r}: use one of {', '.join(A1111_SCHEDULERS)}")
        schedule = A1111_SCHEDULERS[sched] or schedule
        side = self.pipe.model.side
        h, w = _field(body, "height", int, side), _field(body, "width", int, side)
        params = dict(steps=_field(body, "steps", int, 50),
                      guidance=_field(body, "cfg_scale", float, 7.0), sampler=sampler,
                      schedule=schedule, eta=_field(body, "eta", float, 0.0))
        if strength:
            params["strength"] = _field(body, "denoising_strength", float, 0.75)
        params = self._sampling(params, h, w)
        n = self._count(_field(body, "batch_size", int, 1) * _field(body, "n_iter", int, 1),
                        "batch_size × n_iter")
        seeds = self._seeds(_field(body, "seed", int, -1), n)
        prompt = _field(body, "prompt", str, "")
        negative = _field(body, "negative_prompt", str) or None
        return params, (h, w), seeds, prompt, negative

    def _a1111_reply(self, body, results, seeds, prompt, negative, params) -> dict:
        info = {"prompt": prompt, "negative_prompt": negative or "", "seed": seeds[0],
                "all_seeds": seeds, "all_prompts": [prompt] * len(seeds),
                "steps": params["steps"], "cfg_scale": params["guidance"],
                "sampler_name": body.get("sampler_name") or "DDIM",
                "width": results[0].width, "height": results[0].height,
                "sd_model_name": self.model_name}
        return {"images": [encode_png(im) for im in results], "parameters": body,
                "info": json.dumps(info)}

    def a1111_txt2img(self, body: dict):
        """POST /sdapi/v1/txt2img."""
        params, (h, w), seeds, prompt, negative = self._a1111(body, False)
        jobs = self._jobs("generate", prompt, negative, seeds, dict(params, height=h, width=w))
        return jobs, lambda r: self._a1111_reply(body, r, seeds, prompt, negative, params)

    def a1111_img2img(self, body: dict):
        """POST /sdapi/v1/img2img: init_images[0] resized to width × height, denoising_strength;
        with `mask` (white = repaint), inpainting."""
        params, (h, w), seeds, prompt, negative = self._a1111(body, True)
        inits = _field(body, "init_images", list, required=True)
        if len(inits) != 1:
            raise BadRequest(f"init_images: {len(inits)} images; send one")
        image = decode_image(inits[0], "init_images[0]", self.limits)
        if image.size != (w, h):
            image = image.resize((w, h), Image.LANCZOS)
        if body.get("mask") is None:
            jobs = self._jobs("img2img", prompt, negative, seeds, params, image=image)
        else:
            mask = decode_image(body["mask"], "mask", self.limits).convert("L")
            mask = mask.resize((w, h), Image.NEAREST)
            if _field(body, "inpainting_mask_invert", int, 0):
                mask = mask.point(lambda v: 255 - v)
            jobs = self._jobs("inpaint", prompt, negative, seeds, params, image=image, mask=mask)
        return jobs, lambda r: self._a1111_reply(body, r, seeds, prompt, negative, params)

    def a1111_samplers(self) -> list:
        return [{"name": k, "aliases": [v[0]], "options": {}} for k, v in A1111_SAMPLERS.items()]

    def a1111_models(self) -> list:
        return [{"title": self.model_name, "model_name": self.model_name, "hash": None,
                 "filename": self.model_name}]

    # ---- the engine's commands --------------------------------------------------------------------

    def command(self, name: str, body: dict):
        """POST /engine/v1/NAME: the command `python -m engine NAME` with the body's fields as its
        flags (e.g. {"prompt": "...", "lam": 0.5, "image": "<base64>"}); answers every file it
        writes: images as base64 under "images", reports under "reports", and the edit as
        "image"."""
        if name not in COMMANDS:
            raise BadRequest(f"/engine/v1/{name}: use one of {', '.join(COMMANDS)}", 404)
        pics = {k: decode_image(body[k], k, self.limits) for k in FILE_FLAGS if k in body}
        call, _ = self._command(name, {k: v for k, v in body.items() if k not in pics}, pics)
        return [Job("call", call=call)], lambda results: results[0]

    def _command(self, name: str, fields: dict, pics: dict):
        """(call(pipe) that runs the command in a scratch folder and returns its files, argv),
        the flags parsed and checked now."""
        from . import cli

        argv = [name]
        for k, v in fields.items():
            flag = k.replace("-", "_")
            if flag in SERVER_FLAGS:
                raise BadRequest(f"{k}: set by the server, not by a request")
            if v is None or v is False:
                continue
            argv += [f"--{flag.replace('_', '-')}"] + ([] if v is True else
                                                       [str(x) for x in _listed(v)])

        def args(scratch: Path):
            paths = [x for k in pics for x in (f"--{k}", str(scratch / f"{k}.png"))]
            out = scratch / ("out" if name == "iterinv-edit" else "out.png")
            return argv + paths + ["--out", str(out), "--quiet"]

        parser = cli.parser(cli.RaisingParser)
        try:
            parser.parse_args(args(Path("/nonexistent")))
        except ValueError as e:
            raise BadRequest(f"{name}: {e}") from None
        self._texts(fields.get("prompt"), fields.get("edit"))
        models = self.models

        def call(pipe):
            from . import commands

            scratch = Path(tempfile.mkdtemp(prefix="engine-serve-"))
            try:
                for k, im in pics.items():
                    im.save(scratch / f"{k}.png")
                a = parser.parse_args(args(scratch))
                a.loader, a.model, a.upscaler = models.load, str(models.path), \
                    str(models.upscaler)
                commands.HANDLERS[name](a)
                return _collect(scratch, set(pics))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return call, argv


def _int(v, name):
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}={v!r}: need a whole number") from None


def _listed(v):
    return v if isinstance(v, (list, tuple)) else [v]


def _collect(scratch: Path, inputs: set) -> dict:
    """Every file a command wrote under `scratch`: PNGs base64 under "images", JSON under
    "reports", the main PNG (out.png or edit.png) as "image"."""
    out = {"images": {}, "reports": {}}
    for p in sorted(scratch.rglob("*")):
        rel = str(p.relative_to(scratch))
        if not p.is_file() or p.stem in inputs and p.parent == scratch:
            continue
        if p.suffix == ".png":
            out["images"][rel] = base64.b64encode(p.read_bytes()).decode()
        elif p.suffix == ".json":  # the scratch folder's paths as the names the answer uses
            out["reports"][rel] = json.loads(p.read_text().replace(f"{scratch}/", ""))
    main = next((k for k in ("out.png", "out/edit.png") if k in out["images"]), None)
    out["image"] = out["images"].get(main)
    return out
