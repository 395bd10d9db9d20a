"""Text→image, img2img and x4 upscaling on loaded components: the Python API the CLI is a thin layer over."""
import math

import torch
from PIL import Image

from . import direct, images, invert as inv, multires, prompt as pr, schedule
from .denoiser import Cond, Denoiser, constant
from .load import Components
from .profile import stage
from .rng import generator as make_generator, randn_tensor
from .sample import ddim
from .tiles import Tiled


def _check(steps, guidance, eta, output):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: need a positive whole number of denoising steps, e.g. 50")
    for name, v, hint in (("guidance", guidance, "7.5 is typical; ≤ 1 disables CFG"), ("eta", eta, "0 = deterministic DDIM")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r}: need a finite number ≥ 0 ({hint})")
    if output not in ("pil", "pt"):
        raise ValueError(f"output={output!r}: use 'pil' for PIL images or 'pt' for tensors in [-1, 1]")


class Pipeline:
    """A loaded model. Methods return PIL images (output="pil") or tensors in [-1, 1] (output="pt")."""

    def __init__(self, components: Components):
        self.c = components
        self.device = next(components.unet.parameters()).device
        self.dtype = next(components.unet.parameters()).dtype
        self.vae_dtype = next(components.vae.parameters()).dtype  # fp32 when the VAE asks for force_upcast
        self.concepts: dict[str, pr.Concept] = {}  # pseudo-words usable in prompts (load_embeddings)
        self.semi = "zero"  # semi mode <C(i)> below bin i: a zero input vector (the paper's code) or "remove"

    @property
    def is_upscaler(self) -> bool:
        return self.c.low_res_scheduler is not None

    def load_embeddings(self, *paths) -> list[str]:
        """Register the pseudo-words of embedding files (engine.multires.load_concepts); returns their names."""
        names = []
        for path in paths:
            for c in multires.load_concepts(path):
                self.concepts[c.name] = multires.check_dim(c, self.c.text_encoder, path)
                names.append(c.name)
        return names

    def _texts(self, prompts, negative, guided) -> list[str]:
        return (negative or [""] * len(prompts)) + prompts if guided else prompts

    def _encoder(self, texts) -> pr.Encoder | None:
        """The pseudo-word encoder when a text has a reference (any syntax error surfaces here), else None."""
        if not any(isinstance(seg, pr.Ref) for s in texts for seg in pr.parse(s)):
            return None
        return pr.Encoder(self.c.tokenizer, self.c.text_encoder, self.concepts, self.semi,
                          self.c.scheduler.num_train_timesteps)

    def encode_prompt(self, prompts: list[str], negative: list[str] | None, guided: bool) -> torch.Tensor:
        """(2B, 77, D) [negative; prompt] embeddings when guided, else (B, 77, D); pseudo-words must not change
        with t here (prompt_cond takes those)."""
        texts = self._texts(prompts, negative, guided)
        enc = self._encoder(texts)
        if enc is not None:
            ref = enc.dynamic(texts)
            if ref is not None:
                raise pr.PromptError(f"{ref} changes with t, but this method (an inversion) needs one fixed "
                                     f"prompt; write <{ref.name}|i|>")
            with stage("text encode"):
                return enc.encode(texts)
        with stage("tokenize"):
            ids = self.c.tokenizer(texts).to(self.device)
        with stage("text encode"):
            return self.c.text_encoder(ids)

    def prompt_cond(self, prompts: list[str], negative: list[str] | None, guided: bool) -> Cond:
        """Conditioning as a function of t: constant for plain prompts; with multiresolution pseudo-words the
        text encoder runs once per time bin the sampler enters."""
        texts = self._texts(prompts, negative, guided)
        enc = self._encoder(texts)
        if enc is not None and enc.dynamic(texts) is not None:
            return enc.cond(texts)
        return constant(self.encode_prompt(prompts, negative, guided))

    def _begin(self, prompt, negative, steps, guidance, eta, output, upscaler=False):
        """Check the arguments shared by every method before any work; returns (prompts, negatives)."""
        if upscaler != self.is_upscaler:
            raise ValueError("this is an x4 upscaler model: use upscale()" if self.is_upscaler else
                             "upscale() needs an x4 upscaler model (a folder with low_res_scheduler/)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: need a string or a non-empty list of strings")
        if negative is not None:
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"negative: {len(negative)} negative prompts for {len(prompts)} prompts")
        _check(steps, guidance, eta, output)
        return prompts, negative

    def _decode(self, latents, output):
        with stage("vae decode"):
            x = self.c.vae.decode_latents(latents.to(self.vae_dtype))
        if not torch.isfinite(x).all():
            raise FloatingPointError("the decoded image has NaN/inf values; try float32 (--dtype float32)")
        return x if output == "pt" else images.to_pil(x)

    @torch.no_grad()
    def generate(self, prompt, negative=None, steps=50, guidance=7.5, seed=0, height=None, width=None, eta=0.0,
                 output="pil", progress=True):
        """Text → image with DDIM. Same seed → same image as diffusers' StableDiffusionPipeline + DDIMScheduler."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output)
        f = self.c.vae.downscale
        height, width = self._size(height, width)
        den = Denoiser(self.c.unet, guidance)
        cond = self.prompt_cond(prompts, negative, den.guided)
        gen = make_generator(seed)
        shape = (len(prompts), self.c.unet.config.in_channels, height // f, width // f)
        x = randn_tensor(shape, gen, self.device, torch.float32).to(self.dtype)
        x = ddim(den, x, cond, self.c.scheduler, steps, eta=eta, generator=gen, progress=progress)
        return self._decode(x, output)

    @torch.no_grad()
    def img2img(self, image, prompt, negative=None, strength=0.8, steps=50, guidance=7.5, seed=0, eta=0.0,
                output="pil", progress=True):
        """SDEdit: noise the encoded image to t(strength), then DDIM down under the prompt (diffusers img2img)."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output)
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r}: need a number in (0, 1]; 1 ignores the image")
        x0 = self._image_tensor(image, self.c.vae.downscale, len(prompts))
        timesteps = schedule.timesteps(self.c.scheduler, steps, strength)
        if len(timesteps) == 0:
            raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; raise either")
        den = Denoiser(self.c.unet, guidance)
        cond = self.prompt_cond(prompts, negative, den.guided)
        gen = make_generator(seed)
        with stage("vae encode"):
            z0 = self.c.vae.encode_latents(x0.to(self.vae_dtype), sample=True, generator=gen).to(self.dtype)
        noise = randn_tensor(z0.shape, gen, self.device, torch.float32).to(self.dtype)
        x = schedule.q_sample(self.c.scheduler, z0, timesteps[:1].repeat(z0.shape[0]), noise)
        x = ddim(den, x, cond, self.c.scheduler, steps, strength, eta, gen, progress)
        return self._decode(x, output)

    @torch.no_grad()
    def upscale(self, image, prompt, negative=None, steps=75, guidance=9.0, noise_level=20, seed=0, eta=0.0,
                output="pil", progress=True, tile=None, overlap=16, backproject=0):
        """x4 super-resolution: latent DDIM conditioned on the noise-augmented low-res image (SD x4 upscaler).

        tile: run the UNet on tile × tile windows of the low-res image overlapping by `overlap` pixels and blend
        them every step (engine.tiles), for inputs larger than the model was trained on.
        backproject: iterations of back-projection onto the input after decoding (images.back_project): each
        4 × 4 block of the output then averages to its input pixel, which undoes colour drift; 3 is plenty.
        0 (default) gives diffusers' StableDiffusionUpscalePipeline output."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output, upscaler=True)
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 8 or tile % 8):
            raise ValueError(f"tile={tile!r}: need a multiple of 8 pixels of the low-res image, e.g. 64")
        images.check_backproject(backproject)
        top = self.c.max_noise_level if self.c.max_noise_level is not None else 350
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= top:
            raise ValueError(f"noise_level={noise_level!r}: need a whole number in [0, {top}]")
        low = self._image_tensor(image, 1, len(prompts))
        gen = make_generator(seed)
        noise = randn_tensor(low.shape, gen, self.device, torch.float32).to(self.dtype)
        den = self.upscaler_denoiser(low, noise_level, noise, guidance)
        cond = self.prompt_cond(prompts, negative, den.guided)
        shape = (low.shape[0], self.c.vae.config.latent_channels, *low.shape[2:])
        x = randn_tensor(shape, gen, self.device, torch.float32).to(self.dtype)
        if tile is not None and max(shape[2:]) > tile:
            den = Tiled(den, tile, overlap)
        x = ddim(den, x, cond, self.c.scheduler, steps, eta=eta, generator=gen, progress=progress)
        if not backproject:
            return self._decode(x, output)
        y = images.back_project(self._decode(x, "pt").float(), low.float(), backproject)
        return y.to(self.vae_dtype) if output == "pt" else images.to_pil(y)

    def upscaler_denoiser(self, low: torch.Tensor, noise_level: int, noise: torch.Tensor,
                          guidance: float = 1.0) -> Denoiser:
        """The x4 upscaler's denoiser conditioned on ĉ = q_sample(low, noise_level, noise), fixed for a whole run."""
        level = torch.tensor([noise_level], dtype=torch.long, device=low.device)
        return Denoiser(self.c.unet, guidance, concat=schedule.q_sample(self.c.low_res_scheduler, low, level,
                                                                        noise.to(low)),
                        class_labels=level.repeat(low.shape[0]))

    @torch.no_grad()
    def invert(self, image, prompt="", steps=50, convention="destination", null_text=None, guidance=7.5,
               strength=1.0, progress=True) -> inv.Trajectory:
        """DDIM-invert an image (its VAE mean latent) under `prompt`, without CFG (engine.invert). With
        null_text="reference" or "fast", also optimise per-step unconditional embeddings so that CFG sampling at
        `guidance` reconstructs the image (null-text inversion); `reconstruct` uses them."""
        prompts, _ = self._begin(prompt, None, steps, guidance, 0.0, "pt")
        if null_text is not None and null_text not in inv.NULL_TEXT_METHODS:
            raise ValueError(f"null_text={null_text!r}: use None, 'reference' or 'fast'")
        x = self._image_tensor(image, self.c.vae.downscale, len(prompts))
        if len(prompts) == 1 < x.shape[0]:
            prompts = prompts * x.shape[0]
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} images: give one prompt or one per image")
        with stage("vae encode"):
            z0 = self.c.vae.encode_latents(x.to(self.vae_dtype)).to(self.dtype)
        cond = self.encode_prompt(prompts, None, False)
        traj = inv.invert(Denoiser(self.c.unet), z0, constant(cond), self.c.scheduler, steps, strength, convention,
                          progress)
        if not torch.isfinite(traj.latents[-1]).all():
            raise FloatingPointError("the inversion produced NaN/inf values; try float32 (--dtype float32)")
        if null_text is not None:
            uncond = self.encode_prompt([""] * len(prompts), None, False)
            traj = inv.null_text(Denoiser(self.c.unet, guidance), traj, cond, uncond, self.c.scheduler, null_text,
                                 progress=progress)
        return traj

    @torch.no_grad()
    def reconstruct(self, traj: inv.Trajectory, prompt="", steps=None, output="pil", progress=True):
        """Sample back from the trajectory's x_T under the prompt it was inverted with: on its own grid with its
        null-text embeddings and CFG when it has them, else without CFG; `steps` samples on another grid."""
        prompts, _ = self._begin(prompt, None, steps or traj.num_steps, traj.guidance or 1.0, 0.0, output)
        cond = self.encode_prompt(prompts, None, False)
        if traj.uncond is not None and steps in (None, traj.num_steps):
            den, c = Denoiser(self.c.unet, traj.guidance), inv.null_text_cond(traj, cond)
        else:
            den, c = Denoiser(self.c.unet), constant(cond)
        z = ddim(den, traj.latents[-1], c, self.c.scheduler, steps or traj.num_steps, traj.strength,
                 progress=progress)
        return self._decode(z, output)

    @torch.no_grad()
    def edit(self, image, prompt, source="", steps=100, guidance=3.0, lam=0.5, inject_steps=None, every=1,
             negative=None, convention="source", output="pil", progress=True):
        """Direct Inversion (engine.direct): invert the image under `source` (default ""), then sample each edit
        prompt with CFG from the inverted noise, merging λ of the inverted noise on the injected steps.
        Defaults are the authors' recommended run: 100/100 steps, CFG 3, λ 0.5, injection on every step.
        Returns (edited images, trajectory); one image and several prompts give one edit per prompt."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, 0.0, output)
        direct.check_lambda(lam)
        direct.injected_steps(steps, inject_steps, every)
        traj = self.invert(image, source, steps, convention, progress=progress)
        den = Denoiser(self.c.unet, guidance)
        cond = self.prompt_cond(prompts, negative, den.guided)
        z = direct.edit(den, traj.expand(len(prompts)), cond, self.c.scheduler, lam, inject_steps, every, progress)
        return self._decode(z, output), traj

    def _size(self, height, width):
        f = self.c.vae.downscale
        default = (self.c.unet.config.sample_size or 64) * f
        height, width = height or default, width or default
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % f:
                raise ValueError(f"{name}={v!r}: need a positive multiple of {f} (the VAE's downscale factor)")
        return height, width

    def _image_tensor(self, image, multiple, batch):
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            image = images.load(image)
        pils = isinstance(image, (list, tuple)) and image and all(isinstance(im, Image.Image) for im in image)
        if pils and len({im.size for im in image}) > 1:
            raise ValueError(f"images: need one size for a batch, got {sorted({im.size for im in image})}")
        x = images.to_tensor(image) if pils or isinstance(image, Image.Image) else torch.as_tensor(image)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image: need an RGB image or a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[2:]
        if h % multiple or w % multiple:
            raise ValueError(f"image is {w}×{h}: both sides must be multiples of {multiple}; resize or crop it")
        if not torch.isfinite(x).all():
            raise ValueError("image has NaN/inf values: need finite pixel values in [-1, 1]")
        if x.shape[0] == 1 and batch > 1:
            x = x.repeat(batch, 1, 1, 1)
        return x.to(self.device, self.dtype)
