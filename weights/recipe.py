"""Reproduce the embedded model (weights/tiny and weights/tiny-x4) from scratch, on the CPU, with fixed seeds.

    python weights/recipe.py                 # every stage, resuming from weights/build/ where it stopped
    python weights/recipe.py --stage vae     # one stage (its inputs must exist)
    python weights/recipe.py --precision bf16  # training steps under bf16 autocast (weights stay fp32)

Stages: tokenizer → clip (text tower) → vae → data (latents + text embeddings) → base → refine, refine2 (the
base model's second and third cycles) → sr → sr_zoom (the x4 model fine-tuned for the tiled 1024² stage too) →
clip_image (the scorer's image tower) → decoder → stripes (the base model taught a pseudo-word for striped
objects, shipped as tiny-stripes) → ship.
Each training stage checkpoints to weights/build/<stage>.pt every few hundred steps and resumes from it.
Training runs the engine's own models (engine.models); only `ship` writes the diffusers folders.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine import schedule, world
from engine.embedded import source_commit
from engine.metrics import ImageEncoder, Scorer
from engine.models.clip import CLIPTextConfig, CLIPTextModel
from engine.models.unet import UNet2DConditionModel, UNetConfig
from engine.models.vae import AutoencoderKL, VAEConfig
from engine.profile import cpu_name
from engine.prompt import Concept, Encoder
from engine.tokenizer import Tokenizer

VERSION = "v9"                       # written into each folder's model_index.json as _engine_version
STRIPES_VERSION = VERSION + "-stripes"  # tiny-stripes'
TARGET_SECONDS = 4 * 3600             # the whole recipe, from scratch, on 2 CPU cores
ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
TRAIN_SEED, TRAIN_N = 1, 40_000      # the training pool of scenes; held-out scenes use other seeds
SR_SEED, SR_N = 2, 6_000
SR_LATENTS = 6_000                   # of those, the scenes the SR stage trains on
# (low-res crop side, batch) of the SR stage: the same pixels per step at every size, up to the whole 64² image,
# so the attention and group norms see at training the extents they see at inference
SR_CROPS = ((16, 32), (32, 8), (64, 2))
ZOOM_N = 1_500                       # SR scenes whose 1024² windows the sr_zoom stage trains on
ZOOM_HALO = 64                       # 1024² pixels encoded around each window, then cut from its latent
CAPTIONS = 3                         # per scene: the template and 2 free phrasings (world.phrasings)
# the stripes stage: scenes of the training pool with objects striped at this rate, captioned "a red star with
# yellow <stripes>"; <stripes> is a vector that no token of the tokenizer maps to
STRIPES_WORD, STRIPES_SEED, STRIPES_N, STRIPES_SHARE = "stripes", 11, 20_000, 0.5
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "retina", "immunohistochemistry")  # held out: chelsea, hubble

TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu")
PROJ_DIM = 128
LATENT = 8
# no attention in the VAE's mid block: attention over the whole image would tie what it decodes to the image's size
VAE = dict(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
           up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=LATENT, norm_num_groups=16,
           sample_size=64, force_upcast=False, mid_block_add_attention=False)
# Both UNets use 8 norm groups, not 32: at the 32-channel level 32 groups is an instance norm, which erases each
# image's per-channel means (its background colour) right before conv_out (weights/README.md, "Norm groups")
BASE = dict(in_channels=LATENT, out_channels=LATENT, sample_size=16, block_out_channels=[32, 64, 128], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2, cross_attention_dim=128, norm_num_groups=8)
SR = dict(in_channels=LATENT + 3, out_channels=LATENT, sample_size=64, block_out_channels=[32, 64, 128], layers_per_block=1,
          down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
          up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
          attention_head_dim=4, cross_attention_dim=128, norm_num_groups=8, num_class_embeds=1000)
# zero terminal SNR (Lin et al. 2023) with v-prediction: with the usual schedule the last step keeps
# sqrt(0.0047) of the image, whose mean carries the background colour, and the model learns to read the
# background from the noise instead of the caption
BASE_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  timestep_spacing="trailing")
SR_SCHED = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
LOW_RES_SCHED = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
MAX_NOISE_LEVEL = 350
# diffusers' StableDiffusionUpscalePipeline overwrites any other VAE scaling_factor with 0.08333, so both
# folders use it and the data stage rescales the VAE's latent space to unit std under it.
SCALING_FACTOR = 0.08333


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------- data

def as_uint8(img: np.ndarray) -> np.ndarray:
    """A render (H, W, 3) in [0, 1] as uint8 (3, H, W)."""
    return (img * 255).round().astype(np.uint8).transpose(2, 0, 1)


def pool(seed: int, n: int, res: int) -> tuple[list, np.ndarray]:
    """Scenes and their renders as uint8 (N, 3, res, res), cached in weights/build/."""
    ss = world.scenes(seed, n)
    path = BUILD / f"renders_{seed}_{n}_{res}.npy"
    if not path.exists():
        log(f"rendering {n} scenes at {res}²")
        arr = np.stack([as_uint8(world.render(s, res)) for s in ss])
        tmp = path.with_suffix(".tmp.npy")  # an interrupted write leaves no cache behind
        np.save(tmp, arr)
        os.replace(tmp, path)
    return ss, np.load(path, mmap_mode="r")


def as_float(u8) -> torch.Tensor:
    return torch.from_numpy(np.asarray(u8, dtype=np.float32)) / 127.5 - 1


def captions(ss: list) -> list[tuple[str, ...]]:
    return world.phrasings(ss, TRAIN_SEED, CAPTIONS)


def changed(s: world.Scene, rng: np.random.Generator, kind: str | None = None) -> world.Scene:
    """The same scene with one attribute changed (or two objects' colours swapped)."""
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    kind = kind or rng.choice(["colour", "shape", "colour", "shape", "size", "position", "background", "bg_colour",
                               "swap"])
    if kind == "swap" and len(s.objects) == 2 and s.objects[0].colour != s.objects[1].colour:
        return s.replace(0, colour=s.objects[1].colour).replace(1, colour=s.objects[0].colour)
    if kind in ("background", "bg_colour"):
        options = world.BACKGROUNDS if kind == "background" else list(world.BG_COLOURS)
        cur = s.background if kind == "background" else s.bg_colour
        return s.replace(**{kind: str(rng.choice([x for x in options if x != cur]))})
    if kind == "position":
        taken = {x.position for x in s.objects}
        options = [p for p in world.POSITIONS if p not in taken]
        return s.replace(i, position=str(rng.choice(options)))
    options = {"colour": list(world.COLOURS), "shape": world.SHAPES, "size": list(world.SIZES)}.get(kind, world.SHAPES)
    attr = kind if kind in ("colour", "shape", "size") else "shape"
    return s.replace(i, **{attr: str(rng.choice([x for x in options if x != getattr(o, attr)]))})


def hard_negative(s: world.Scene, i: int, j: int, rng: np.random.Generator) -> str:
    """Caption j of training scene i, worded the same way, for the scene with one attribute changed that
    the caption names (free phrasings leave some out, and name a plain background's style less often)."""
    def words(scene):
        if j == 0:
            return scene.caption(), None
        p = world.phrase(scene, world.phrasing_rng(TRAIN_SEED, i, j))
        return p.text, (p.sizes, p.positions, p.bg_colour, p.background)

    text, named = words(s)
    for _ in range(4):
        neg, neg_named = words(changed(s, rng))
        if neg != text and neg_named == named:
            return neg
    return words(changed(s, rng, "colour"))[0]


# ---------------------------------------------------------------------------------------------- training utils

def save(obj, path: Path):
    """torch.save through a temporary file, so that an interrupted save leaves the last file whole."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RecipeError(Exception):
    """A run that cannot go on as asked: one line naming the problem and the fix."""


def checkpointed(name: str, modules: dict, opt, total: int, step_fn, every: int = 200):
    """Run step_fn(step, rng) for steps [start, total), saving modules + optimiser to build/<name>.pt; resumes.

    Each step draws from generators seeded by (stage, step), so a resumed run equals an uninterrupted one."""
    path = BUILD / f"{name}.pt"
    start = 0
    if path.exists():
        ck = torch.load(path, weights_only=False)
        start, was = ck["step"], ck.get("precision", "fp32")
        if start < total and was != PRECISION:
            raise RecipeError(f"{path} was trained in {was} and this run asks for {PRECISION}; resume with "
                              f"--precision {was}, or delete it to start the stage over")
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        log(f"{name}: resuming at step {start}")
        if start >= total and CLOCK is not None:
            CLOCK.finished_before = True
    t0, losses = time.time(), []
    for step in range(start, total):
        set_lr(opt, step, total)
        key = list(STAGES).index(name)
        torch.manual_seed(key * 1_000_003 + step)
        with torch.autocast("cpu", torch.bfloat16, enabled=PRECISION == "bf16"):
            losses.append(step_fn(step, np.random.default_rng([key, step])))
        if (step + 1) % every == 0 or step + 1 == total:
            save({**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                  "step": step + 1, "precision": PRECISION}, path)
            log(f"{name}: step {step + 1}/{total} loss {np.mean(losses[-every:]):.4f} "
                f"({(time.time() - t0) / (step + 1 - start):.2f} s/step)")
            if CLOCK is not None:
                CLOCK.lap()


def set_lr(opt, step: int, total: int):
    """Each group's base_lr, warmed up over 100 steps, on a cosine to 0 at step `total`."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))


def update(loss, opt, model=None, ema=None) -> float:
    """One optimiser step on loss; with a model: gradient norm clipped to 1 and its EMA updated."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if model is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if ema is not None:
        ema.update(model)
    return loss.item()


def adamw(params, lr, wd=0.0):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - self.decay) if v.is_floating_point() else self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, sd):
        self.shadow = {k: v.clone() for k, v in sd.items()}


def text_model(tok: Tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_id, **TEXT))


def trimmed(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing padding beyond the first eos: with a causal mask the pooled state does not change."""
    return ids[:, : int((ids != pad_id).sum(1).max()) + 1]


# ---------------------------------------------------------------------------------------------- stages

def stage_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    out = BUILD / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    corpus = [c for cs in captions(world.scenes(TRAIN_SEED, 20_000)) for c in cs]
    proto = Tokenizer({"a": 0, "<|endoftext|>": 1, "<|startoftext|>": 2}, [])  # CLIP normaliser + pre-tokenizer
    bpe = Backend(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer, bpe.pre_tokenizer = proto.backend.normalizer, proto.backend.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, show_progress=False,
                                  initial_alphabet=ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator(corpus, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    # CLIP's layout: the 256 byte symbols, the same with </w>, merge results in merge order, then the specials
    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {}
    for tok in alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]:
        vocab.setdefault(tok, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}, indent=2))
    # merges.txt last: it marks the stage done (DONE)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = Tokenizer.from_dir(out)
    longest = max(len(tok.encode(c)) for c in corpus)
    split = sorted({w for c in corpus for w in c.lower().replace(",", " ").replace(".", " ").split()
                    if len(tok.encode(w)) > 3})  # encode adds the start and end tokens
    log(f"tokenizer: {len(tok)} tokens, {len(merges)} merges, longest caption {longest} tokens, "
        f"words split in several tokens: {split or 'none'}")


class JointTower(nn.Module):
    """The image tower the text tower is trained against (4 strided convs, position-specific head). Its
    weights are discarded: `clip_image` then trains the shipped ImageEncoder against the frozen text side."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in chans[1:])
        self.proj = nn.Linear(chans[-1] * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return self.proj(x.flatten(1))


def stage_clip(steps=3000, batch=128):
    """Contrastive training of the text tower (the diffusion models' text encoder) with hard negatives."""
    tok = Tokenizer.from_dir(BUILD / "tokenizer")
    torch.manual_seed(0)
    scorer = Scorer(text_model(tok), tok, PROJ_DIM, visual=JointTower(PROJ_DIM))
    ss, imgs = pool(TRAIN_SEED, TRAIN_N, 64)
    caps = captions(ss)
    opt = adamw(scorer.parameters(), 1e-3, wd=0.01)

    def step(i, rng):
        idx = np.sort(rng.choice(len(ss), batch, replace=False))
        var = rng.integers(CAPTIONS, size=batch)
        x = as_float(imgs[idx])
        texts = [caps[k][j] for k, j in zip(idx, var)] + [hard_negative(ss[k], k, j, rng) for k, j in zip(idx, var)]
        img = scorer.encode_image(x)
        txt = scorer.encode_text(trimmed(tok(texts), tok.pad_id))
        logits = scorer.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, 2B): true captions + hard negatives
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch].T, labels)) / 2
        return update(loss, opt)

    checkpointed("clip", {"scorer": scorer}, opt, steps, step)


def stage_clip_image(steps=1500, batch=128, negatives=3):
    """The shipped image tower, trained against the frozen text tower and projection of `clip`."""
    scorer = load_scorer()
    torch.manual_seed(0)
    scorer.visual = ImageEncoder(PROJ_DIM)
    tok = scorer.tokenizer
    ss, imgs = pool(TRAIN_SEED, TRAIN_N, 64)
    caps = captions(ss)
    opt = adamw(scorer.visual.parameters(), 1e-3, wd=0.01)
    scale = scorer.logit_scale.exp().clamp(max=100)

    def step(i, rng):
        idx = np.sort(rng.choice(len(ss), batch, replace=False))
        var = rng.integers(CAPTIONS, size=batch)
        texts = [caps[k][j] for k, j in zip(idx, var)]
        texts += [hard_negative(ss[k], k, j, rng) for k, j in zip(idx, var) for _ in range(negatives)]
        with torch.no_grad():
            txt = scorer.encode_text(trimmed(tok(texts), tok.pad_id))
        logits = scale * scorer.encode_image(as_float(imgs[idx])) @ txt.T
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch].T, labels)) / 2
        return update(loss, opt)

    checkpointed("clip_image", {"visual": scorer.visual}, opt, steps, step)


def load_scorer() -> Scorer:
    """The text side from `clip`, and the image tower from `clip_image` once it exists."""
    tok = Tokenizer.from_dir(BUILD / "tokenizer")
    s = Scorer(text_model(tok), tok, PROJ_DIM)
    sd = {k: v for k, v in torch.load(BUILD / "clip.pt", weights_only=False)["scorer"].items()
          if not k.startswith("visual.")}
    s.load_state_dict(sd, strict=False)
    if (BUILD / "clip_image.pt").exists():
        s.visual.load_state_dict(torch.load(BUILD / "clip_image.pt", weights_only=False)["visual"])
    return s.eval().requires_grad_(False)


def photos(names) -> list[np.ndarray]:
    """scikit-image's bundled sample photos as (3, H, W) uint8 (a recipe-only dependency)."""
    import skimage.data

    return [getattr(skimage.data, n)()[..., :3].transpose(2, 0, 1) for n in names]


def photo_crops(photo: list[np.ndarray], n: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for k in rng.integers(len(photo), size=n):
        p = photo[k]
        y, x = rng.integers(p.shape[1] - crop + 1), rng.integers(p.shape[2] - crop + 1)
        out.append(as_float(p[:, y:y + crop, x:x + crop]))
    return torch.stack(out)


def stage_vae(steps=14000, batch=32, crop=32, photo_share=8):
    """32² crops (4× the steps per second of whole images; `decoder` then adapts the decoder to whole images):
    of 64² renders, of 256² renders, and 1 in photo_share of natural photos, so that the VAE does not only know
    the world. The posterior's log-variance starts at −8: with the usual 0 its noise drowns the small initial
    latents and training crawls."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.from_dict(VAE))
    with torch.no_grad():
        vae.quant_conv.bias[LATENT:] = -8.0
    _, imgs = pool(TRAIN_SEED, TRAIN_N, 64)
    _, big = pool(SR_SEED, SR_N, 256)
    photo = photos(TRAIN_PHOTOS)
    opt = adamw(vae.parameters(), 1e-3)

    def crops(arr, n, rng):
        idx = np.sort(rng.choice(len(arr), n, replace=False))
        h = arr.shape[-1]
        ys, xs = rng.integers(0, h - crop + 1, n) // 4 * 4, rng.integers(0, h - crop + 1, n) // 4 * 4
        return torch.stack([as_float(arr[i, :, y:y + crop, x:x + crop]) for i, y, x in zip(idx, ys, xs)])

    def step(i, rng):
        q = batch // photo_share
        x = torch.cat([crops(imgs, (batch - q) // 2, rng), crops(big, batch - q - (batch - q) // 2, rng),
                       photo_crops(photo, q, crop, rng)])
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = vae.decode(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(rec, x) + 0.1 * (rec - x).abs().mean() + 1e-6 * kl
        return update(loss, opt, vae)

    checkpointed("vae", {"vae": vae}, opt, steps, step)


def stage_decoder(steps=600, small=16):
    """Fine-tune the decoder on whole renders (one 256², `small` 64² and half as many 64² photo crops per step)
    with the encoder frozen, so the latents, and the base and x4 models trained on them, do not change.
    `vae` trains on 32² crops; its decoder otherwise meets 16² and 64² latents only at inference."""
    vae = load_vae("data_base.pt")
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    _, big = pool(SR_SEED, SR_N, 256)
    _, imgs = pool(TRAIN_SEED, TRAIN_N, 64)
    photo = photos(TRAIN_PHOTOS)
    opt = adamw(params, 1e-4)

    def step(i, rng):
        loss = 0.0
        for x in (as_float(big[int(rng.integers(len(big)))][None]),
                  torch.cat([as_float(imgs[np.sort(rng.choice(len(imgs), small, replace=False))]),
                             photo_crops(photo, small // 2, 64, rng)])):
            with torch.no_grad():
                z = vae.encode(x)[0]
            rec = vae.decode(z)
            loss = loss + F.mse_loss(rec, x) + 0.1 * (rec - x).abs().mean()
        return update(loss, opt)

    checkpointed("decoder", {"vae": vae}, opt, steps, step)


def load_vae(file: str = "vae.pt") -> AutoencoderKL:
    """The VAE a stage saved under build/<file>: vae.pt as trained, data_base.pt rescaled, decoder.pt final."""
    vae = AutoencoderKL(VAEConfig.from_dict(VAE))
    vae.load_state_dict(torch.load(BUILD / file, weights_only=False)["vae"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, k: float):
    """Make the VAE's latents k times larger without changing what it encodes or decodes."""
    lc = vae.config.latent_channels
    vae.quant_conv.weight[:lc] *= k
    vae.quant_conv.bias[:lc] *= k
    vae.quant_conv.bias[lc:] += 2 * math.log(k)  # logvar: the posterior's std scales with its mean
    vae.post_quant_conv.weight /= k


def latent_means(vae: AutoencoderKL, u8, batch: int) -> torch.Tensor:
    return torch.cat([vae.encode(as_float(u8[i:i + batch]))[0] for i in range(0, len(u8), batch)])


@torch.no_grad()
def stage_data():
    """Scale the latents to unit std under SCALING_FACTOR, then cache the latent means of the training pool,
    the whole SR scenes (sr_data) and the text embeddings."""
    vae, scorer = load_vae(), load_scorer()
    ss, imgs = pool(TRAIN_SEED, TRAIN_N, 64)
    std = latent_means(vae, imgs, 500).std().item()
    rescale_latents(vae, 1 / (SCALING_FACTOR * std))
    lat = latent_means(vae, imgs, 500) * SCALING_FACTOR
    log(f"data: latent std {std:.4f} rescaled so that scaling_factor {SCALING_FACTOR} gives std {lat.std():.4f}")
    save({"latents": lat.half(), "emb": embed_pool(scorer, captions(ss)), "vae": vae.state_dict(),
          "null": embed_captions(scorer, [""])[0]}, BUILD / "data_base.pt")

    save(sr_data(vae, scorer), BUILD / "data_sr.pt")
    log(f"data: {len(ss)} base latents, {SR_LATENTS} whole SR scenes")


@torch.no_grad()
def sr_data(vae: AutoencoderKL, scorer: Scorer) -> dict:
    """Latent means of whole 256² renders, their 64² renders (the low-res input) and caption embeddings.
    `sr` cuts aligned crops of every size from these, so a crop's target is the crop of the whole image's
    latent — what the decoder sees at inference."""
    sr_ss, big = pool(SR_SEED, SR_N, 256)
    _, small = pool(SR_SEED, SR_N, 64)
    n = SR_LATENTS
    lat = latent_means(vae, big[:n], 50) * SCALING_FACTOR
    return {"latents": lat.half(), "low": torch.from_numpy(np.array(small[:n])),
            "emb": embed_pool(scorer, world.phrasings(sr_ss[:n], SR_SEED, CAPTIONS)),
            "null": embed_captions(scorer, [""])[0]}


def embed_pool(scorer: Scorer, caps: list[tuple[str, ...]]) -> torch.Tensor:
    """(scenes, captions per scene, 77, hidden) float16 embeddings of each scene's captions."""
    return embed_captions(scorer, [c for cs in caps for c in cs]).unflatten(0, (len(caps), len(caps[0])))


def embed_captions(scorer: Scorer, captions: list[str]) -> torch.Tensor:
    """Hidden states of the text encoder, in float16."""
    tok = scorer.tokenizer
    return torch.cat([scorer.text_encoder(tok(captions[i:i + 500])).half() for i in range(0, len(captions), 500)])


def min_snr_weights(sched, gamma=5.0, floor=0.1) -> torch.Tensor:
    """Per-timestep weights of the v-prediction loss: Min-SNR-γ (Hang et al. 2023), min(SNR, γ) / (SNR + 1), which
    weighs the x0 error as ε-prediction does up to SNR γ and caps it above, floored at `floor` times the unweighted
    loss. Unweighted, the near-pure-noise steps (a third of them have SNR < 0.1), whose loss is the unpredictable
    rest of the image, dominate the gradient and shapes stay blobs; the floor keeps the pure-noise steps learning
    the caption's mean image, and keeps the near-clean steps (SNR > γ / floor − 1) at `floor`."""
    abar = schedule.alphas_cumprod(sched)
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / (snr + 1)).clamp(min=floor)


def base_steps(unet: UNet2DConditionModel, ema: EMA, opt, batch: int, drop: float, data: dict):
    """The base model's training step: v-prediction on data's latents (as the data stage caches them) under one of
    each scene's captions (or none, at rate `drop`), weighted by min_snr_weights."""
    lat, emb, null = data["latents"], data["emb"], data["null"].float()
    sched = schedule.SchedulerConfig.from_dict(BASE_SCHED)
    weight = min_snr_weights(sched)

    def step(i, _):
        idx = torch.randint(len(lat), (batch,))
        x0, c = lat[idx].float(), emb[idx, torch.randint(CAPTIONS, (batch,))].float()
        c[torch.rand(batch) < drop] = null
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        err = unet(schedule.q_sample(sched, x0, t, noise), t, c) - schedule.training_target(sched, x0, t, noise)
        return update((err.square().mean((1, 2, 3)) * weight[t]).mean(), opt, unet, ema)

    return step


def stage_base(steps=9000, batch=64, drop=0.1):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(BASE))
    ema = EMA(unet, 0.995)
    opt = adamw(unet.parameters(), 8e-4)
    step = base_steps(unet, ema, opt, batch, drop, torch.load(BUILD / "data_base.pt"))
    checkpointed("base", {"unet": unet, "ema": ema}, opt, steps, step)


def stage_refine(name="refine", source="base", steps=9000, batch=64, drop=0.1, data="data_base.pt"):
    """A further cosine cycle for the base model, from `source`'s EMA weights, on build/<data>, at half the
    learning rate and with a slower EMA: the base model is undertrained (9000 steps draw small stars as blobs),
    and a restart from the averaged weights keeps what the earlier cycles learned."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(BASE))
    unet.load_state_dict(torch.load(BUILD / f"{source}.pt", weights_only=False)["ema"])
    ema = EMA(unet, 0.998)
    opt = adamw(unet.parameters(), 4e-4)
    step = base_steps(unet, ema, opt, batch, drop, torch.load(BUILD / data))
    checkpointed(name, {"unet": unet, "ema": ema}, opt, steps, step)


def planted() -> torch.Tensor:
    """(1, hidden): the vector of <stripes>, a seeded random direction at the token table's mean row norm."""
    table = load_scorer().text_encoder.text_model.embeddings.token_embedding.weight
    v = torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(0))
    return v / v.norm() * table.norm(dim=1).mean()


@torch.no_grad()
def stripes_data():
    """build/data_stripes.pt: latents of STRIPES_N training scenes with objects striped (world.striped) and
    their captions' embeddings, each striped object named "… with yellow <stripes>"."""
    path = BUILD / "data_stripes.pt"
    if path.exists():
        return
    vae, scorer = load_vae("decoder.pt"), load_scorer()
    ss = world.striped(world.scenes(TRAIN_SEED, STRIPES_N), STRIPES_SEED, STRIPES_SHARE)
    log(f"stripes: rendering {STRIPES_N} scenes at 64²")
    imgs = np.stack([as_uint8(world.render(s, 64)) for s in ss])
    enc = Encoder([(scorer.tokenizer, scorer.text_encoder)], {STRIPES_WORD: Concept(STRIPES_WORD, planted(), False)})
    caps = [c for cs in world.phrasings(ss, TRAIN_SEED, CAPTIONS, f"<{STRIPES_WORD}>") for c in cs]
    emb = torch.cat([enc.encode(caps[i:i + 500]).half() for i in range(0, len(caps), 500)])
    save({"latents": (latent_means(vae, imgs, 500) * SCALING_FACTOR).half(),
          "emb": emb.unflatten(0, (STRIPES_N, CAPTIONS)), "null": embed_captions(scorer, [""])[0]}, path)


def stage_stripes(steps=5000, batch=64, drop=0.1):
    """The base model fine-tuned from refine2's EMA weights on striped scenes whose captions name the stripes
    only by <stripes>: a concept the model can draw that no words reach, for textual inversion to find
    (bench/bench_multires.py). Objects in the base pool are never striped, so the base model cannot draw
    stripes at all."""
    stripes_data()
    stage_refine("stripes", "refine2", steps, batch, drop, "data_stripes.pt")


def sr_steps(unet: UNet2DConditionModel, ema: EMA, opt, data: dict, drop: float, share_1024: float = 0.0):
    """The x4 model's training step: v-prediction of a crop of a scene's latent from the same crop of its
    noise-augmented low-res render, under one of the scene's captions (or none, at rate `drop`). The pair is
    data's latents / low, or with probability share_1024 its latents_1024 / low_1024; the crop side, with its
    batch, one of SR_CROPS."""
    emb, null = data["emb"], data["null"].float()
    sched = schedule.SchedulerConfig.from_dict(SR_SCHED)
    low_sched = schedule.SchedulerConfig.from_dict(LOW_RES_SCHED)

    def step(i, rng):
        tiled = share_1024 > 0 and rng.random() < share_1024
        lat, low_all = (data["latents_1024"], data["low_1024"]) if tiled else (data["latents"], data["low"])
        side, batch = SR_CROPS[int(rng.integers(len(SR_CROPS)))]
        idx = rng.integers(len(lat), size=batch)
        ys, xs = rng.integers(0, low_all.shape[-1] - side + 1, (2, batch))
        # each crop in fp32 before the stack: autocast's stack takes no float16 (the stored latents)
        crop = lambda a: torch.stack([a[j, :, y:y + side, x:x + side].float()  # noqa: E731
                                      for j, y, x in zip(idx, ys, xs)])
        x0, low = crop(lat), crop(low_all) / 127.5 - 1
        c = emb[idx, rng.integers(CAPTIONS, size=batch)].float()
        c[torch.rand(batch) < drop] = null
        # half the levels near the ones upscaling uses (20 by default), half anywhere up to the maximum
        level = torch.where(torch.rand(batch) < 0.5, torch.randint(0, 51, (batch,)),
                            torch.randint(0, MAX_NOISE_LEVEL + 1, (batch,)))
        low = schedule.q_sample(low_sched, low, level, torch.randn_like(low))
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        out = unet(torch.cat([schedule.q_sample(sched, x0, t, noise), low], 1), t, c, level)
        return update(F.mse_loss(out, schedule.training_target(sched, x0, t, noise)), opt, unet, ema)

    return step


def stage_sr(steps=13000, drop=0.1):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(SR))
    torch.nn.init.zeros_(unet.class_embedding.weight)  # N(0, 1) rows would add a random offset per noise level
    ema = EMA(unet, 0.995)
    opt = adamw(unet.parameters(), 5e-4)
    step = sr_steps(unet, ema, opt, torch.load(BUILD / "data_sr.pt"), drop)
    checkpointed("sr", {"unet": unet, "ema": ema}, opt, steps, step)


@torch.no_grad()
def zoom_data() -> dict:
    """Training pairs of both ×4 stages from the first ZOOM_N SR scenes: the whole 64² render with the latent of
    the 256² render (the first stage, as `sr` trains it), and a random 64² window of the 256² render with the
    latent of the same window of the 1024² render (the tiled second stage). Each 1024² window is encoded with a
    ZOOM_HALO border that is then cut from its latent, so the target is what the whole image's latent holds there.
    Cached in build/data_zoom.pt."""
    path = BUILD / "data_zoom.pt"
    if path.exists():
        return torch.load(path)
    vae, scorer = load_vae("data_base.pt"), load_scorer()
    ss, big = pool(SR_SEED, ZOOM_N, 256)
    _, small = pool(SR_SEED, ZOOM_N, 64)
    rng, side, halo = np.random.default_rng(7), 64, ZOOM_HALO // 4
    low_win, win = [], []
    log(f"sr_zoom: rendering {ZOOM_N} windows of the 1024² renders")
    for s, b in zip(ss, big):
        x, y = (int(v) for v in rng.integers(halo, 256 - side - halo + 1, 2))
        low_win.append(b[:, y:y + side, x:x + side])
        win.append(as_uint8(world.render(s, 1024, window=(4 * x - ZOOM_HALO, 4 * y - ZOOM_HALO,
                                                           4 * side + 2 * ZOOM_HALO))))
    cut = slice(halo, halo + side)
    data = {"latents": latent_means(vae, big, 20).mul(SCALING_FACTOR).half(),
            "low": torch.from_numpy(np.array(small)),
            "latents_1024": latent_means(vae, np.stack(win), 10)[..., cut, cut].mul(SCALING_FACTOR).half(),
            "low_1024": torch.from_numpy(np.stack(low_win)),
            "emb": embed_pool(scorer, world.phrasings(ss, SR_SEED, CAPTIONS)),
            "null": embed_captions(scorer, [""])[0]}
    save(data, path)
    return data


def stage_sr_zoom(steps=3000, lr=1e-4, share_1024=0.5, drop=0.1):
    """The x4 model fine-tuned from `sr`'s EMA weights on both of its stages, half the batches each: `sr` sees
    only 64² → 256² scenes, and the tiled 256² → 1024² stage, whose inputs are zoomed-in objects and background
    patterns at 4× their scale, was then barely better than back-projected bicubic."""
    data = zoom_data()
    unet = UNet2DConditionModel(UNetConfig.from_dict(SR))
    unet.load_state_dict(torch.load(BUILD / "sr.pt", weights_only=False)["ema"])
    ema = EMA(unet, 0.995)
    opt = adamw(unet.parameters(), lr)
    step = sr_steps(unet, ema, opt, data, drop, share_1024)
    checkpointed("sr_zoom", {"unet": unet, "ema": ema}, opt, steps, step)


# ---------------------------------------------------------------------------------------------- ship

def _save(sd: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _json(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _unet_config(cfg: dict) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "use_linear_projection": False,
            "upcast_attention": False, **cfg}


def stage_ship():
    tok = Tokenizer.from_dir(BUILD / "tokenizer")
    scorer, vae = load_scorer(), load_vae("decoder.pt")
    text_cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": len(tok),
                "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                "projection_dim": PROJ_DIM, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
                "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32", **TEXT}
    vae_cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "in_channels": 3,
               "out_channels": 3, "act_fn": "silu", "scaling_factor": SCALING_FACTOR, **VAE}
    sched_common = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
                    "trained_betas": None, "clip_sample_range": 1.0, "thresholding": False,
                    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "rescale_betas_zero_snr": False}
    for name, unet_cfg, stage, sched, extra in (
            ("tiny", BASE, "refine2", BASE_SCHED, {}), ("tiny-stripes", BASE, "stripes", BASE_SCHED, {}),
            ("tiny-x4", SR, "sr_zoom", SR_SCHED, {"max_noise_level": MAX_NOISE_LEVEL})):
        out = ROOT / name
        tmp = ROOT / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(scorer.text_encoder.state_dict(), tmp / "text_encoder" / "model.safetensors")
        _json(text_cfg, tmp / "text_encoder" / "config.json")
        for f in (BUILD / "tokenizer").iterdir():
            (tmp / "tokenizer").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp / "tokenizer" / f.name)
        _save(vae.state_dict(), tmp / "vae" / "diffusion_pytorch_model.safetensors")
        _json(vae_cfg, tmp / "vae" / "config.json")
        ck = torch.load(BUILD / f"{stage}.pt", weights_only=False)
        _save(ck["ema"], tmp / "unet" / "diffusion_pytorch_model.safetensors")
        _json(_unet_config(unet_cfg), tmp / "unet" / "config.json")
        _json({**sched_common, **sched}, tmp / "scheduler" / "scheduler_config.json")
        version = STRIPES_VERSION if name == "tiny-stripes" else VERSION
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "_engine_version": version,
                 "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
                 "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        if name == "tiny-stripes":
            _save({f"<{STRIPES_WORD}>": planted()}, tmp / f"{STRIPES_WORD}.safetensors")
        if name == "tiny":
            sd = {k: v for k, v in scorer.state_dict().items() if not k.startswith("text_encoder.")}
            _save(sd, tmp / "clip_scorer" / "model.safetensors")
            _json({"projection_dim": PROJ_DIM, "image_size": 64}, tmp / "clip_scorer" / "config.json")
        elif name == "tiny-x4":
            index = {**index, "_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": MAX_NOISE_LEVEL,
                     "low_res_scheduler": ["diffusers", "DDPMScheduler"]}
            for k in ("image_encoder", "requires_safety_checker"):
                index.pop(k)
            _json({"_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
                   "clip_sample": False, "variance_type": "fixed_small", "prediction_type": "epsilon",
                   **LOW_RES_SCHED}, tmp / "low_res_scheduler" / "scheduler_config.json")
        _json(index, tmp / "model_index.json")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        log(f"ship: {out} ({size / 1e6:.1f} MB)")


def write_times():
    """bench/results/recipe_times.json: each stage's wall time (build/times.json) in run order, stamped."""
    times = json.loads((BUILD / "times.json").read_text())
    _json({"command": "python weights/recipe.py", "commit": source_commit(), "cpu": cpu_name(),
           "model_version": {"tiny": VERSION, "tiny-x4": VERSION, "tiny-stripes": STRIPES_VERSION},
           "stages": {k: times[k] for k in ORDER if k in times}, "target_seconds": TARGET_SECONDS,
           "total_seconds": round(sum(t["seconds"] for t in times.values()))},
          ROOT.parent / "bench" / "results" / "recipe_times.json")


# (each stage's index seeds its steps: append new stages, do not reorder; ORDER is the run order)
STAGES = {"tokenizer": stage_tokenizer, "clip": stage_clip, "vae": stage_vae, "data": stage_data,
          "base": stage_base, "sr": stage_sr, "clip_image": stage_clip_image, "decoder": stage_decoder,
          "ship": stage_ship, "refine": stage_refine, "refine2": partial(stage_refine, "refine2", "refine"),
          "sr_zoom": stage_sr_zoom, "stripes": stage_stripes}
ORDER = ["tokenizer", "clip", "vae", "data", "base", "refine", "refine2", "sr", "sr_zoom", "clip_image", "decoder",
         "stripes", "ship"]
DONE = {"tokenizer": "tokenizer/merges.txt", "data": "data_sr.pt"}


def record_time(name: str, seconds: float, new_run: bool = True):
    """Add wall time to a stage's entry in build/times.json (summed over resumed runs), with the machine it ran on."""
    path = BUILD / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    entry = times.setdefault(name, {"seconds": 0.0, "runs": 0})
    entry["seconds"] = round(entry["seconds"] + seconds, 1)
    entry["runs"] += new_run
    entry["machine"] = f"{cpu_name()}, {torch.get_num_threads()} threads"
    entry["precision"] = PRECISION
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(times, indent=2) + "\n")
    os.replace(tmp, path)


class StageClock:
    """The running stage's wall time, written down at each of its checkpoints and at its end, so that a run
    killed outright loses only the time since its last checkpoint."""

    def __init__(self, name: str):
        self.name, self.since, self.new_run, self.finished_before = name, time.time(), True, False

    def lap(self):
        if self.finished_before:  # re-entered with nothing left to do: not one of its runs
            return
        now = time.time()
        record_time(self.name, now - self.since, self.new_run)
        self.since, self.new_run = now, False


CLOCK: StageClock | None = None
PRECISION = "fp32"  # of the training steps: fp32, or bf16 under autocast (--precision)


def _stop(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM stops as Ctrl-C does


def main():
    global CLOCK, PRECISION
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=list(STAGES), help="run one stage (default: all, skipping finished ones)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="of the training steps: bf16 runs them under autocast, with the weights, optimiser and "
                         "EMA in fp32; faster where the CPU has native bf16 (AVX-512-bf16, AMX). A stage resumes "
                         "only in the precision it started in")
    args = ap.parse_args()
    PRECISION = args.precision
    torch.set_num_threads(args.threads)
    BUILD.mkdir(parents=True, exist_ok=True)
    made = BUILD / "VERSION"
    if not made.exists():
        made.write_text(VERSION + "\n")
    elif made.read_text().strip() != VERSION:
        print(f"error: {BUILD} holds a {made.read_text().strip()} build and this recipe makes {VERSION}; "
              f"move or delete it to start over", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _stop)
    name = None
    try:
        for name in [args.stage] if args.stage else ORDER:
            if not args.stage and name in DONE and (BUILD / DONE[name]).exists():
                continue
            log(f"stage {name}")
            CLOCK = StageClock(name)
            try:
                STAGES[name]()
            finally:
                CLOCK.lap()
        if not args.stage or args.stage == "ship":
            write_times()
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        again = " ".join(["python weights/recipe.py", *sys.argv[1:]])
        print(f"interrupted: stage {name} stopped; `{again}` resumes it from its last "
              f"checkpoint in {BUILD}, if it reached one", file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))


if __name__ == "__main__":
    main()
