"""The runtime model under the four papers: loaded components plus image ↔ latent with the dtype
rules, prompt → conditioning, and the denoisers samplers call. `Pipeline`, the papers' modules and
the CLI use it through these public methods only."""
import math
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from . import (images, kernels, lora, memory, multires, prompt as pr, schedule, sdxl, tiled_vae,
               tiles)
from .denoiser import Cond, Denoiser, constant, guided_texts, mapped, zero_uncond
from .checkpoints import Components, LoadError
from .profile import stage


class Model:
    """One loaded model. Attribute names mirror a diffusers folder: unet, vae, text_encoder,
    tokenizer, scheduler (and low_res_scheduler, max_noise_level for an x4 upscaler;
    text_encoder_2, tokenizer_2 for SDXL, whose refiner has no text_encoder)."""

    def __init__(self, components: Components, semi: str = "zero"):
        c = components
        self.unet, self.vae, self.scheduler = c.unet, c.vae, c.scheduler
        self.text_encoder, self.tokenizer = c.text_encoder, c.tokenizer
        self.text_encoder_2, self.tokenizer_2 = c.text_encoder_2, c.tokenizer_2
        self.force_zeros = c.force_zeros_for_empty_prompt
        widths = sum(te.config.hidden_size for te in (c.text_encoder, c.text_encoder_2)
                     if te is not None)
        if widths != c.unet.config.cross_attention_dim and \
                isinstance(c.unet.config.cross_attention_dim, int):
            raise LoadError(f"the text encoders give {widths}-wide states but the UNet attends to "
                            f"{c.unet.config.cross_attention_dim}: a text encoder or tokenizer is "
                            "missing from the model (model_index.json), or belongs to another model")
        self.text_time = None
        if c.unet.config.addition_embed_type == "text_time":
            if c.text_encoder_2 is None:
                raise ValueError("this UNet is SDXL's (addition_embed_type \"text_time\") but the "
                                 "model has no text_encoder_2 to give its pooled text embedding")
            self.text_time = sdxl.TextTime.for_unet(
                c.unet.config, c.text_encoder_2.config.projection_dim, c.vae.downscale)
        self.low_res_scheduler, self.max_noise_level = c.low_res_scheduler, c.max_noise_level
        self.device = next(c.unet.parameters()).device
        self.dtype = next(c.unet.parameters()).dtype
        self.vae_dtype = next(c.vae.parameters()).dtype  # fp32 when the VAE asks for force_upcast
        self.concepts: dict[str, pr.Concept] = {}  # pseudo-words of prompts (load_embeddings)
        self.semi = pr.check_semi(semi)  # <C(i)> below bin i: a zero vector, or "remove" the word
        # VAE tiling budget (pixels) and tile side (latent pixels), engine.tiled_vae; None: the env
        self.tile_pixels: int | None = None
        self.tile_size: int | None = None
        self.max_memory: int | None = None  # bytes this process may use in all (memory.available)
        self.loras = lora.Merger(self)
        self.lora_dir = None  # where <lora:NAME:SCALE> in a prompt finds NAME.safetensors
        self.lora_strict = True  # a LoRA key this model cannot take is an error, else skipped

    @property
    def is_upscaler(self) -> bool:
        return self.low_res_scheduler is not None

    @property
    def text_pairs(self) -> list[tuple]:
        """(tokenizer, text encoder) of each text encoder the model has, in order."""
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        return [(tok, te) for tok, te in pairs if te is not None]

    @property
    def is_inpainting(self) -> bool:
        """A UNet that also takes the repaint mask and the masked image's latent (9 channels for
        SD)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel."""
        return self.vae.downscale

    @property
    def side(self) -> int:
        """The image side the model was trained at."""
        return (self.unet.config.sample_size or 64) * self.downscale

    @property
    def noise_levels(self) -> int:
        """The largest noise level an x4 upscaler's conditioning takes."""
        return self.max_noise_level if self.max_noise_level is not None else 350

    def load_embeddings(self, *paths) -> list[str]:
        """Register the pseudo-words of embedding files (engine.multires.load_concepts); returns
        their names."""
        names = []
        for path in paths:
            for c in multires.load_concepts(path):
                self.concepts[c.name] = multires.check_dim(
                    c, [te for _, te in self.text_pairs], path)
                names.append(c.name)
        return names

    def load_lora(self, path, scale: float = 1.0) -> str:
        """Merge a LoRA file (engine.lora) into the weights at `scale`; returns its name, the
        file's stem. Keys this model cannot take raise lora.LoraError naming them, or are skipped
        with a warning when lora_strict is False."""
        return self._merge_lora(path, scale, Path(path).stem, False)

    def _merge_lora(self, path, scale, name: str, from_prompt: bool) -> str:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or \
                not math.isfinite(scale):
            raise ValueError(f"LoRA scale {scale!r}: need a finite number, e.g. 0.8")
        layers, skipped = lora.parse(path, self, self.lora_strict)
        if skipped:
            warnings.warn(f"{path}: skipped {len(skipped)} key(s) this model cannot take: "
                          + "; ".join(skipped), stacklevel=3)
        self.loras.add(lora.Lora(name, layers, float(scale), from_prompt))
        return name

    def unload_lora(self, name: str | None = None) -> list[str]:
        """Undo the LoRA called `name` (every LoRA when None): the weights it changed are restored
        bit for bit. Returns the names undone."""
        names = [x.name for x in self.loras.loaded]
        if name is not None and name not in names:
            raise ValueError(f"no LoRA called {name!r} is loaded; loaded: {names or 'none'}")
        return self.loras.remove(lambda x: name is None or x.name == name)

    def use_prompt_loras(self, texts) -> None:
        """Merge the LoRAs that `texts` name with <lora:NAME:SCALE> (NAME.safetensors in
        lora_dir), and undo those an earlier job's prompts named and these do not: a job's
        prompts decide its prompt LoRAs, as in AUTOMATIC1111."""
        want = pr.lora_tags([t for t in texts if t is not None])
        if want == self._prompt_loras():
            return
        self.loras.remove(lambda x: x.from_prompt)
        for name, scale in want.items():
            self._merge_lora(lora.find(self.lora_dir, name), scale, name, True)

    def _prompt_loras(self) -> dict[str, float]:
        return {x.name: x.scale for x in self.loras.loaded if x.from_prompt}

    def _strip_loras(self, texts: list[str]) -> list[str]:
        """The texts without their <lora:…> tags, which must be merged (use_prompt_loras)."""
        have = self._prompt_loras()
        for name, scale in pr.lora_tags(texts).items():
            if have.get(name) != scale:
                raise pr.PromptError(f"<lora:{name}:{scale:g}> in a prompt, but this method "
                                     "merges no prompt LoRAs; load the file with --lora "
                                     "FILE:SCALE (Model.load_lora) instead")
        return [pr.strip_loras(t) for t in texts]

    # ---- images ↔ latents ---------------------------------------------------------------------

    def size(self, height=None, width=None) -> tuple[int, int]:
        """(height, width) checked against the VAE factor; None: the model's own side."""
        f = self.downscale
        height = self.side if height is None else height
        width = self.side if width is None else width
        images.check_size(height, width)
        for name, v in (("height", height), ("width", width)):
            if v % f:
                raise ValueError(f"{name}={v!r}: need a positive multiple of {f} "
                                 "(the VAE's downscale factor)")
        return height, width

    def peak_memory(self, height: int, width: int, unet_batch: int, decodes: int = 1,
                    grad: bool = False, unet_side: int | None = None) -> tuple[int, int]:
        """Estimated peak bytes of a job's UNet calls and of its VAE calls (engine.memory): UNet
        calls on `unet_batch` latents of the image's size, with a gradient when `grad` (in tiles of
        at most unet_side² latent px, engine.tiles, when given); the VAE on `decodes` images of
        height × width. The job's peak is memory.OVERHEAD + reordered_bytes() + the larger."""
        f = self.downscale
        budget_px, tile = tiled_vae.settings(self.vae, self.tile_pixels, self.tile_size)
        item, vae_item = (torch.finfo(t).bits // 8 for t in (self.dtype, self.vae_dtype))
        lh, lw = height // f, width // f
        if unet_side and max(lh, lw) > unet_side:  # up to tiles.BATCH tiles in one call
            unet_batch *= min(tiles.BATCH, -(-lh // unet_side) * -(-lw // unet_side))
            lh, lw = min(lh, unet_side), min(lw, unet_side)
        tiled = tile * f if height * width > budget_px else None
        return (memory.unet_bytes(self.unet.config, lh, lw, unet_batch, item, grad),
                memory.vae_bytes(self.vae.config, height, width, decodes, vae_item, tiled))

    def reordered_bytes(self) -> int:
        """Bytes the copies of the weights reordered at their first bf16 use on the CPU will add
        (engine.kernels.cpu); 0 once they are made, or in fp32."""
        return kernels.cpu.pending_bytes(self.unet, self.vae, self.text_encoder,
                                         self.text_encoder_2)

    def check_memory(self, job: str, height: int, width: int, unet_batch: int, decodes: int = 1,
                     grad: bool = False, unet_side: int | None = None, scale: int = 1,
                     fix: str = "pass a smaller image", unet_fix: str = ""):
        """Before the job's work: refuse (memory.OutOfMemory) a job whose `peak_memory` at
        (scale·height) × (scale·width) exceeds the memory there is, naming the largest input
        height × width that fits and `fix` (then `unet_fix` when the UNet is the larger part)."""
        def parts(h, w):
            return self.peak_memory(scale * h, scale * w, unet_batch, decodes, grad, unet_side)

        unet, vae = parts(height, width)
        copies = self.reordered_bytes()
        memory.check(job, lambda h, w: memory.OVERHEAD + copies + max(parts(h, w)), height, width,
                     memory.available(self.device, self.max_memory),
                     max(1, self.downscale // scale), fix + (unet_fix if unet > vae else ""))

    def pixels(self, image, multiple: int | None = None, batch: int = 1) -> torch.Tensor:
        """A path, PIL image(s) or (B, 3, H, W) tensor in [-1, 1] → a checked tensor on the model's
        device and dtype, sides multiples of `multiple` (default the VAE factor), one image repeated
        to `batch`."""
        multiple = self.downscale if multiple is None else multiple
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            image = images.load(image)
        pils = isinstance(image, (list, tuple)) and image and \
            all(isinstance(i, Image.Image) for i in image)
        if pils and len({im.size for im in image}) > 1:
            sizes = sorted({im.size for im in image})
            raise ValueError(f"images: need one size for a batch, got {sizes}")
        pil = pils or isinstance(image, Image.Image)
        x = images.to_tensor(image) if pil else torch.as_tensor(image)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError("image: need an RGB image or a (B, 3, H, W) tensor, got shape "
                             f"{tuple(x.shape)}")
        h, w = x.shape[2:]
        if h % multiple or w % multiple:
            raise ValueError(f"image is {w}×{h}: both sides must be multiples of {multiple}; "
                             "resize or crop it")
        if not torch.isfinite(x).all():
            raise ValueError("image has NaN/inf values: need finite pixel values in [-1, 1]")
        if x.shape[0] == 1 and batch > 1:
            x = x.repeat(batch, 1, 1, 1)
        return x.to(self.device, self.dtype)

    def encode(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Image in [-1, 1] → latents in the model's dtype (the VAE runs in its own dtype, tiled
        above the budget with the same result)."""
        with stage("vae encode"):
            x = x.to(self.device, self.vae_dtype)
            z = tiled_vae.encode_latents(self.vae, x, sample, generator, pixels=self.tile_pixels,
                                         tile=self.tile_size)
        return z.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → image in about [-1, 1] in the VAE's dtype; NaN/inf is an error naming the
        fix."""
        with stage("vae decode"):
            latents = latents.to(self.vae_dtype)
            x = tiled_vae.decode_latents(self.vae, latents, pixels=self.tile_pixels,
                                         tile=self.tile_size)
        if not torch.isfinite(x).all():
            raise FloatingPointError("the decoded image has NaN/inf values; "
                                     "try float32 (--dtype float32)")
        return x

    # ---- prompts → conditioning ---------------------------------------------------------------

    def _encoder(self) -> pr.Encoder:
        return pr.Encoder(self.text_pairs, self.concepts, self.semi,
                          self.scheduler.num_train_timesteps)

    def _chunks(self, like: torch.Tensor | None) -> int:
        return 1 if like is None else like.shape[1] // self.text_pairs[0][0].max_length

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None,
                      guided: bool = False, like: torch.Tensor | None = None) -> torch.Tensor:
        """(2B, 77·k, D) [negative; prompt] embeddings when guided, else (B, 77·k, D), for the k
        75-token chunks of the longest prompt, and at least as many as the embedding `like` has
        (SDXL: one more row, engine.sdxl). Prompts are read as AUTOMATIC1111 reads them: emphasis,
        BREAK, chunks (prompt.Encoder); pseudo-words must not change with t here (prompt_cond
        takes those)."""
        enc, resolved = self._resolve(prompts, negative, guided)
        ref = enc.dynamic(resolved)
        if ref is not None:
            raise pr.PromptError(f"{ref} changes with t, but this method (an inversion) needs "
                                 f"one fixed prompt; write <{ref.name}|i|>")
        return self._encoded(enc, resolved, negative, guided, self._chunks(like))

    def prompt_tokens(self, text: str) -> list:
        """What the first text encoder reads, place by place, for a one-chunk prompt, padded
        (prompt.Encoder.token_ids)."""
        return self._encoder().token_ids(self._strip_loras([text])[0])

    def prompt_chunks(self, text: str) -> int:
        """How many 75-token chunks a prompt encodes to (prompts of a batch are padded to the
        most)."""
        return self._encoder().count(pr.strip_loras(text))

    def _resolve(self, prompts, negative, guided) -> tuple[pr.Encoder, list]:
        """The encoder and the texts' pieces (prompt.Encoder.resolve), <lora:…> tags checked and
        removed."""
        texts = self._strip_loras(guided_texts(prompts, negative) if guided else prompts)
        enc = self._encoder()
        with stage("tokenize"):
            return enc, [enc.resolve(t) for t in texts]

    def _encoded(self, enc, resolved, negative, guided, chunks: int = 1) -> torch.Tensor:
        with stage("text encode"):
            emb = enc.encode_resolved(resolved, 0, chunks)
        return zero_uncond(emb) if self._zeros(negative, guided) else emb

    def _zeros(self, negative, guided) -> bool:
        """SDXL's force_zeros_for_empty_prompt: no negative prompt → a zero unconditional half."""
        return guided and negative is None and self.force_zeros

    def prompt_cond(self, prompts: list[str], negative: list[str] | None = None,
                    guided: bool = False) -> Cond:
        """Conditioning as a function of t: constant for plain prompts; with multiresolution
        pseudo-words the text encoder runs once per time bin the sampler enters."""
        enc, resolved = self._resolve(prompts, negative, guided)
        if enc.dynamic(resolved) is not None:
            cond = enc.cond(resolved)
            return mapped(cond, zero_uncond) if self._zeros(negative, guided) else cond
        return constant(self._encoded(enc, resolved, negative, guided))

    # ---- denoisers -----------------------------------------------------------------------------

    def denoiser(self, guidance: float = 1.0) -> Denoiser:
        return Denoiser(self.unet, guidance, text_time=self.text_time)

    def inpainting_denoiser(self, den: Denoiser, image: torch.Tensor, repaint: torch.Tensor,
                            batch: int = 1, generator=None) -> Denoiser:
        """`den` given an inpainting UNet's extra channels for a (1, 3, H, W) image and its
        (1, 1, H, W) repaint mask: the mask at latent size (nearest) and the latent of the image
        with the repaint part set to 0 (sampled with `generator` when given, else the mean), as
        diffusers' inpainting pipeline; `den` itself for an ordinary UNet."""
        if not self.is_inpainting:
            return den
        masked = self.encode(image * (repaint < 0.5), sample=generator is not None,
                             generator=generator)
        small = F.interpolate(repaint.to(masked.device, torch.float32), size=masked.shape[2:])
        extra = torch.cat([small.to(masked), masked], 1)
        return replace(den, concat=extra.repeat(batch, 1, 1, 1))

    def upscaler_denoiser(self, low: torch.Tensor, noise_level: int, noise: torch.Tensor,
                          guidance: float = 1.0) -> Denoiser:
        """The x4 upscaler's denoiser on ĉ = q_sample(low, noise_level, noise), fixed for a run."""
        level = torch.tensor([noise_level], dtype=torch.long, device=low.device)
        concat = schedule.q_sample(self.low_res_scheduler, low, level, noise.to(low))
        return Denoiser(self.unet, guidance, concat=concat, class_labels=level.repeat(low.shape[0]))

    def check_noise_level(self, noise_level) -> int:
        top = self.noise_levels
        whole = isinstance(noise_level, int) and not isinstance(noise_level, bool)
        if not whole or not 0 <= noise_level <= top:
            raise ValueError(f"noise_level={noise_level!r}: need a whole number in [0, {top}]")
        return noise_level


def check_pair(base, sr, who: str, sr_optional: bool = False):
    """`who`(base, sr) takes a text→image Model and an x4 upscaler Model, in that order."""
    for x in (base, sr):
        if x is not None and not isinstance(x, Model):
            raise TypeError(f"{who}(base, sr): need engine.model.Model objects (a Pipeline's "
                            f".model), got {type(x).__name__}")
    upscaler = sr.is_upscaler if sr is not None else sr_optional
    if base.is_upscaler or not upscaler:
        raise ValueError(f"{who}(base, sr): need a text→image model and an x4 upscaler model, "
                         "in that order")
