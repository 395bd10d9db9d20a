"""Text→image, img2img, inpainting, x4 upscaling, inversion and Direct Inversion edits: the
user-facing API, a thin façade over the runtime model (engine.model.Model) that the CLI and the
papers' modules share."""

import torch
import torch.nn.functional as F

from . import direct, images, invert as inv, ksample, p2p, regions, tiles
from . import schedule as schedules  # `schedule` is the σ-grid argument here
from .checkpoints import Components
from .denoiser import constant, guided_batch, per_step
from .model import Model
from .rng import generator as make_generator, generators, randn_tensor
from .sample import check_args, check_fraction, ddim


def _check(steps, guidance, eta, output):
    check_args(steps, guidance, eta)
    if output not in ("pil", "pt"):
        raise ValueError(f"output={output!r}: use 'pil' for PIL images or 'pt' for tensors "
                         "in [-1, 1]")


def _texts(texts, name: str) -> list[str]:
    """A string or a non-empty list / tuple of strings as a list, or a one-line error."""
    out = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, (list, tuple)) \
        else []
    if not out or not all(isinstance(t, str) for t in out):
        raise ValueError(f"{name}: need a string or a non-empty list of strings, got "
                         f"{type(texts).__name__}")
    return out


class Pipeline:
    """A loaded model. Methods return PIL images (output="pil") or tensors in [-1, 1] (output="pt");
    `model` is the runtime model they run on (engine.model.Model)."""

    __slots__ = ("model",)

    def __init__(self, components: Components, semi: str = "zero"):
        self.model = Model(components, semi)

    @property
    def is_upscaler(self) -> bool:
        return self.model.is_upscaler

    def load_embeddings(self, *paths) -> list[str]:
        """Register the pseudo-words of embedding files (engine.multires.load_concepts); returns
        their names."""
        return self.model.load_embeddings(*paths)

    def load_lora(self, path, scale: float = 1.0) -> str:
        """Merge a LoRA file into the weights at `scale` (engine.lora: kohya / A1111, LoCon,
        diffusers / PEFT); returns its name, the file's stem."""
        return self.model.load_lora(path, scale)

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Undo the LoRA called `name` (every LoRA when None), restoring the weights bit for bit;
        returns the names undone."""
        return self.model.unload_lora(name)

    def _begin(self, prompt, negative, steps, guidance, eta, output, upscaler=False,
               inpainting=False, also=()):
        """Check the arguments shared by every method before any work and merge the LoRAs its
        prompts (and the texts `also`) name; returns (prompts, negatives)."""
        if upscaler != self.is_upscaler:
            raise ValueError("this is an x4 upscaler model: use upscale()" if self.is_upscaler else
                             "upscale() needs an x4 upscaler model "
                             "(a folder with low_res_scheduler/)")
        if self.model.is_inpainting and not inpainting:
            raise ValueError("this is an inpainting model (its UNet also takes a mask): use "
                             "inpaint() or blend, or an ordinary model for this method")
        prompts = _texts(prompt, "prompt")
        if negative is not None:
            negative = [negative] * len(prompts) if isinstance(negative, str) else \
                _texts(negative, "negative")
            if len(negative) != len(prompts):
                raise ValueError(f"negative: {len(negative)} negative prompts for "
                                 f"{len(prompts)} prompts")
        _check(steps, guidance, eta, output)
        self.model.use_prompt_loras(prompts + (negative or []) + list(also))
        return prompts, negative

    def _out(self, latents, output):
        x = self.model.decode(latents)
        return x if output == "pt" else images.to_pil(x)

    def _denoise(self, run, den, cond, noise, steps, strength, eta, gen, progress, desc,
                 start=None, after=None):
        """Latents sampled from `noise` (float32), or from latent `start` noised to where
        `strength` begins: with DDIM when `run` is None, else with the σ sampler `run`
        (engine.ksample.pick). `after`: DDIM's per-step hook."""
        m = self.model
        if run is None:
            x = noise.to(m.dtype)
            if start is not None:
                t = schedules.timesteps(m.scheduler, steps, strength)[:1]
                x = schedules.q_sample(m.scheduler, start, t.repeat(start.shape[0]), x)
            return ddim(den, x, cond, m.scheduler, steps, strength, eta, gen, progress,
                        after=after, desc=desc)
        grid = ksample.from_strength(run[1](m.scheduler, steps), steps, strength)
        x = noise * grid.init_sigma if start is None else start.float() + noise * grid.sigmas[0]
        return run[0](den, x.to(m.dtype), cond, m.scheduler, grid, gen, progress, desc).to(m.dtype)

    @torch.no_grad()
    def generate(self, prompt, negative=None, steps=50, guidance=7.5, seed=0, height=None,
                 width=None, eta=0.0, output="pil", progress=True, sampler="ddim",
                 schedule="default"):
        """Text → image. Same seed → same image as diffusers' StableDiffusionPipeline with the
        sampler's scheduler (DDIMScheduler for "ddim"; engine.ksample for the others, on the σ
        grid `schedule`: default, karras or exponential). A list of seeds, one per prompt, draws
        each image's noise from its own seed, as generate(prompt[i], seed=seed[i]) draws it."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output)
        run = ksample.pick(sampler, schedule, eta)
        m = self.model
        height, width = m.size(height, width)
        den = m.denoiser(guidance)
        m.check_memory("generate", height, width, len(prompts) * (1 + den.guided), len(prompts),
                       fix="pass a smaller height / width (--height, --width)")
        gen = generators(seed, len(prompts))
        cond = m.prompt_cond(prompts, negative, den.guided)
        shape = (len(prompts), m.unet.config.in_channels, height // m.downscale,
                 width // m.downscale)
        noise = randn_tensor(shape, gen, m.device, torch.float32)
        x = self._denoise(run, den, cond, noise, steps, 1.0, eta, gen, progress, "generate")
        return self._out(x, output)

    @torch.no_grad()
    def img2img(self, image, prompt, negative=None, strength=0.8, steps=50, guidance=7.5, seed=0,
                eta=0.0, output="pil", progress=True, sampler="ddim", schedule="default"):
        """SDEdit: noise the encoded image to t(strength), then denoise under the prompt (diffusers
        img2img with the sampler's scheduler, as generate; a list of seeds as generate's)."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output)
        check_fraction("strength", strength, "; 1 ignores the image")
        run = ksample.pick(sampler, schedule, eta)
        m = self.model
        gen = generators(seed, len(prompts))
        # one seed per prompt: each image drawn from its own seed, as it is alone
        x0 = m.pixels(image, batch=len(prompts) if isinstance(gen, list) else 1)
        if x0.shape[0] not in (1, len(prompts)):
            raise ValueError(f"{x0.shape[0]} images for {len(prompts)} prompts: give one image or "
                             "one per prompt")
        if len(schedules.timesteps(m.scheduler, steps, strength)) == 0:
            raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; "
                             "raise either")
        den = m.denoiser(guidance)
        m.check_memory("img2img", *x0.shape[2:], len(prompts) * (1 + den.guided), len(prompts))
        cond = m.prompt_cond(prompts, negative, den.guided)
        # one image is encoded once for every prompt, as diffusers does
        z0 = m.encode(x0, sample=True, generator=gen).repeat(len(prompts) // x0.shape[0], 1, 1, 1)
        noise = randn_tensor(z0.shape, gen, m.device, torch.float32)
        x = self._denoise(run, den, cond, noise, steps, strength, eta, gen, progress, "img2img",
                          start=z0)
        return self._out(x, output)

    @torch.no_grad()
    def inpaint(self, image, mask, prompt, negative=None, strength=1.0, steps=50, guidance=7.5,
                seed=0, eta=0.0, output="pil", progress=True, sampler="ddim", schedule="default"):
        """Repaint the white part of `mask` under the prompt, at the image's size (diffusers'
        StableDiffusionInpaintPipeline given that size). An inpainting model (9 input channels)
        sees the mask and the masked image's latent at every step; with an ordinary model the kept
        part is put back after every step, noised to the step's level (diffusers' legacy
        inpainting). strength < 1 starts from the noised image instead of pure noise. The mask is
        a single-channel image (white = repaint), thresholded at 0.5."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output,
                                        inpainting=True)
        check_fraction("strength", strength, "; 1 starts from pure noise")
        run = ksample.pick(sampler, schedule, eta)
        m = self.model
        latent = m.vae.config.latent_channels
        ninth = m.is_inpainting
        if not ninth and m.unet.config.in_channels != latent:
            raise ValueError(f"inpaint needs an inpainting UNet ({2 * latent + 1} input channels) "
                             f"or an ordinary one ({latent}); this one takes "
                             f"{m.unet.config.in_channels}")
        if not ninth and run is not None:
            raise ValueError(f"sampler={sampler!r}: inpainting with an ordinary model puts the "
                             "kept part back after every DDIM step; use sampler ddim, or an "
                             "inpainting model")
        x0 = m.pixels(image)
        if x0.shape[0] != 1:
            raise ValueError(f"inpaint: need one image, got {x0.shape[0]}")
        if mask is None:
            raise ValueError("mask: need a mask image (white = repaint) of the image's size")
        if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
            mask = images.load(mask)
        repaint = regions.prepare_mask(mask, tuple(x0.shape[2:])).to(x0)
        pairs = schedules.step_pairs(m.scheduler, steps, strength)
        if not pairs:
            raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; "
                             "raise either")
        den = m.denoiser(guidance)
        b = len(prompts)
        m.check_memory("inpaint", *x0.shape[2:], b * (1 + den.guided), b)
        cond = m.prompt_cond(prompts, negative, den.guided)
        gen = make_generator(seed)
        # diffusers' generator order: the image's latent (if needed), the noise, the masked image's
        z0 = m.encode(x0, sample=True, generator=gen) if strength < 1 or not ninth else None
        shape = (b, latent, x0.shape[2] // m.downscale, x0.shape[3] // m.downscale)
        noise = randn_tensor(shape, gen, m.device, torch.float32)
        den = m.inpainting_denoiser(den, x0, repaint, b, gen)
        after = None
        if not ninth:  # the legacy way: put the known latent back after every step
            small = F.interpolate(repaint, size=shape[2:]).to(m.dtype)
            # diffusers encodes the masked image here too: drawn to keep the generator in step
            m.encode(x0 * (repaint < 0.5), sample=True, generator=gen)
            last, kept_noise = pairs[-1][0], noise.to(m.dtype)

            def after(x, t, t_next):
                known = z0 if t == last else schedules.q_sample(m.scheduler, z0, t_next, kept_noise)
                return (1 - small) * known + small * x
        start = None if strength == 1 else z0.repeat(b, 1, 1, 1)
        x = self._denoise(run, den, cond, noise, steps, strength, eta, gen, progress, "inpaint",
                          start, after)
        return self._out(x, output)

    @torch.no_grad()
    def upscale(self, image, prompt, negative=None, steps=75, guidance=9.0, noise_level=20, seed=0,
                eta=0.0, output="pil", progress=True, tile=None, overlap=16, backproject=0,
                sampler="ddim", schedule="default"):
        """x4 super-resolution: latent DDIM conditioned on the noise-augmented low-res image (SD x4
        upscaler).

        tile: run the UNet on tile × tile windows of the low-res image overlapping by `overlap`
        pixels and blend them every step (engine.tiles), for inputs larger than the model was
        trained on.
        backproject: iterations of back-projection onto the input after decoding
        (images.back_project): each 4 × 4 block of the output then averages to its input pixel,
        which undoes colour drift; 3 is plenty. 0 (default) gives diffusers'
        StableDiffusionUpscalePipeline output."""
        prompts, negative = self._begin(prompt, negative, steps, guidance, eta, output,
                                        upscaler=True)
        tiles.check(tile, overlap, 8)
        images.check_backproject(backproject)
        run = ksample.pick(sampler, schedule, eta)
        m = self.model
        m.check_noise_level(noise_level)
        low = m.pixels(image, 1, len(prompts))
        gen = make_generator(seed)
        noise = randn_tensor(low.shape, gen, m.device, torch.float32).to(m.dtype)
        den = m.upscaler_denoiser(low, noise_level, noise, guidance)
        b = low.shape[0]
        m.check_memory("upscale", *low.shape[2:], b * (1 + den.guided), b, unet_side=tile,
                       scale=4, unet_fix="" if tile else
                       ", or run the UNet in tiles (tile=64, --tile 64)")
        cond = m.prompt_cond(prompts, negative, den.guided)
        shape = (low.shape[0], m.vae.config.latent_channels, *low.shape[2:])
        x = randn_tensor(shape, gen, m.device, torch.float32)
        if tile is not None and max(shape[2:]) > tile:
            den = tiles.Tiled(den, tile, overlap)
        x = self._denoise(run, den, cond, x, steps, 1.0, eta, gen, progress,
                          f"upscale to {4 * low.shape[-1]}²")
        if not backproject:
            return self._out(x, output)
        y = images.back_project(m.decode(x).float(), low.float(), backproject)
        return y.to(m.vae_dtype) if output == "pt" else images.to_pil(y)

    @torch.no_grad()
    def invert(self, image, prompt="", steps=50, convention="destination", null_text=None,
               guidance=7.5, strength=1.0, progress=True) -> inv.Trajectory:
        """DDIM-invert an image (its VAE mean latent) under `prompt`, without CFG (engine.invert).
        With null_text="reference" or "fast", also optimise per-step unconditional embeddings so
        that CFG sampling at `guidance` reconstructs the image (null-text inversion); `reconstruct`
        uses them."""
        prompts, _ = self._begin(prompt, None, steps, guidance, 0.0, "pt")
        inv.check_null_text(null_text, guidance)
        x = self.model.pixels(image, batch=len(prompts))
        return self._invert(x, prompts, steps, convention, null_text, guidance, strength, progress)

    def _invert(self, x, prompts, steps, convention, null_text=None, guidance=7.5, strength=1.0,
                progress=True) -> inv.Trajectory:
        self.model.check_memory("invert", *x.shape[2:], x.shape[0], x.shape[0],
                                grad=null_text is not None)
        if len(prompts) == 1 < x.shape[0]:
            prompts = prompts * x.shape[0]
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x.shape[0]} images: "
                             "give one prompt or one per image")
        return inv.invert_image(self.model, x, prompts, steps, convention, null_text, guidance,
                                strength, progress)

    @torch.no_grad()
    def reconstruct(self, traj: inv.Trajectory, prompt="", steps=None, output="pil",
                    progress=True):
        """Sample back from the trajectory's x_T under the prompt it was inverted with: on its own
        grid with its null-text embeddings and CFG when it has them, else without CFG; `steps`
        samples on another grid."""
        prompts, _ = self._begin(prompt, None, steps or traj.num_steps, traj.guidance or 1.0, 0.0,
                                 output)
        return self._out(inv.reconstruct(self.model, traj, prompts, steps, progress), output)

    @torch.no_grad()
    def edit(self, image, prompt, source="", steps=100, guidance=3.0, lam=0.5, inject_steps=None,
             every=1, negative=None, convention="source", output="pil", progress=True,
             pairing="mirror"):
        """Direct Inversion (engine.direct): invert the image under `source` (default ""), then
        sample each edit prompt with CFG from the inverted noise, merging λ of the inverted noise on
        the injected steps. Defaults are the authors' recommended run: 100/100 steps, CFG 3, λ 0.5,
        injection on every step. `pairing` picks the inverted ε each step merges (engine.direct):
        "mirror" (λ = 1 gives the input back), "authors" (as their code) or "x_T" (x̃_T itself, as
        the paper). Returns (edited images, trajectory); one image and several prompts give one
        edit per prompt."""
        sources = _texts(source, "source")
        prompts, negative = self._begin(prompt, negative, steps, guidance, 0.0, output,
                                        also=sources)
        direct.check_lambda(lam)
        direct.check_pairing(pairing)
        direct.injected_steps(steps, inject_steps, every)
        m = self.model
        x = m.pixels(image)
        den = m.denoiser(guidance)
        m.check_memory("edit", *x.shape[2:], len(prompts) * (1 + den.guided), len(prompts))
        traj = self._invert(x, sources, steps, convention, progress=progress)
        top = None
        if direct.needs_top_noise(traj, pairing):
            top = direct.top_noise(m.denoiser(), traj, constant(m.encode_prompt(sources)),
                                   m.scheduler)
            top = top.expand(len(prompts), *top.shape[1:]) if top.shape[0] == 1 else top
        cond = m.prompt_cond(prompts, negative, den.guided)
        z = direct.edit(den, traj.expand(len(prompts)), cond, m.scheduler, lam, inject_steps, every,
                        progress, pairing, top)
        return self._out(z, output), traj

    @torch.no_grad()
    def prompt_to_prompt(self, image, prompt, source, steps=50, guidance=7.5, cross=0.8,
                         self_attention=0.5, null_text="fast", output="pil", progress=True):
        """Null-text inversion + Prompt-to-Prompt (engine.p2p), as P2P's null_text_w_ptp notebook:
        invert the image under `source` with null-text embeddings for CFG at `guidance`, then
        sample the source and each edit prompt side by side from the inverted noise, each edit
        taking the source's cross-attention maps on the first `cross` of the steps and its
        self-attention maps on the first `self_attention`. null_text=None inverts with plain DDIM
        and guides with "". Returns (edited images, trajectory); one image and several prompts give
        one edit per prompt."""
        sources = _texts(source, "source")
        prompts, _ = self._begin(prompt, None, steps, guidance, 0.0, output, also=sources)
        inv.check_null_text(null_text, guidance)
        p2p.replaced_steps(steps, cross, self_attention)
        m = self.model
        x, pairs = m.pixels(image), len(prompts)
        if x.shape[0] not in (1, pairs) or len(sources) not in (1, pairs):
            raise ValueError(f"{x.shape[0]} images and {len(sources)} source prompts for {pairs} "
                             "edit prompts: give one of each or one per edit prompt")
        src_tokens = [m.prompt_tokens(t) for t in sources] * (pairs // len(sources))
        swap_tokens = [m.prompt_tokens(t) for t in prompts]
        den = m.denoiser(guidance)
        m.check_memory("prompt_to_prompt", *x.shape[2:], 2 * pairs * (1 + den.guided), pairs)
        n = max(x.shape[0], len(sources))  # the inversion's batch: 1 or `pairs`
        traj = self._invert(x.repeat(n // x.shape[0], 1, 1, 1), sources, steps, "destination",
                            null_text, guidance, progress=progress).expand(pairs)
        sources = sources * (pairs // len(sources))
        grid = [t for t, _ in traj.sampling_pairs]
        swap = p2p.swap(src_tokens, swap_tokens, grid, cross, self_attention)
        if traj.uncond is not None:
            texts = m.encode_prompt(sources + prompts)
            cond = per_step({t: guided_batch(torch.cat([u, u]), texts)
                             for t, u in zip(grid, traj.uncond)})
        else:
            cond = m.prompt_cond(sources + prompts, None, den.guided)
        x_t = torch.cat([traj.latents[-1]] * 2)
        z = ddim(p2p.Swapped(den, swap), x_t, cond, m.scheduler, traj.num_steps, traj.strength,
                 progress=progress, desc="edit (Prompt-to-Prompt)")
        return self._out(z[pairs:], output), traj
