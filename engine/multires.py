"""Multiresolution textual inversion (Daras & Dimakis 2022): K pseudo-word embeddings S[0..K−1], one
per time bin ⌊t·K/T⌋, learned from a few images with the frozen model's noise-prediction loss.
Sampling with them is the prompt syntax of engine.prompt. Files: all K rows in one .safetensors; one
row exported as a diffusers `learned_embeds.safetensors`; ordinary embeddings (diffusers, A1111)
imported as pseudo-words."""
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import images, schedule, tiled_vae
from .checkpoints import LoadError, read_tensors
from .prompt import NAME, Concept, Encoder
from .rng import randn_tensor
from .templates import templates_for

FORMAT = "engine.multires-ti"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the reference's README run (batch 1 × 4 accumulation, lr 5e-4 scaled ×4,
    AdamW wd 1e-2)."""
    token: str
    init_token: str
    bins: int = 10
    steps: int = 3000
    batch: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-2
    templates: str = "auto"
    flip: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100

    def check(self):
        if not re.fullmatch(NAME, self.token or ""):
            raise ValueError(f"token={self.token!r}: need a bare name such as star "
                             "(it is written <star|3|>)")
        for name in ("bins", "steps", "batch", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: need a positive whole number")
        for name in ("lr", "weight_decay", "flip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}={v!r}: need a finite number ≥ 0")
        if self.flip > 1:
            raise ValueError(f"flip={self.flip!r}: need a probability in [0, 1]")


# ----------------------------------------------------------------------------------------- files

def load_concepts(path) -> list[Concept]:
    """A multires file of ours, a diffusers learned_embeds.safetensors ({token: (n, D) or (D,)}),
    an A1111 .safetensors embedding ({"emb_params": (n, D)}, named by its file stem) or an SDXL one
    ({"clip_l", "clip_g"}, the two widths side by side, named by its file stem)."""
    path = Path(path)
    tensors, meta = read_tensors(path, "embeddings")
    if meta.get("format") == FORMAT:
        widths = tuple(int(w) for w in meta.get("widths", "").split(",") if w)
        return [Concept(meta["token"], tensors["embeds"].float(), True,
                        meta.get("initializer", ""), widths)]
    if tensors.keys() and tensors.keys() <= {"clip_l", "clip_g"}:  # SDXL (A1111), named by its file
        vs = [tensors[k].float().reshape(-1, tensors[k].shape[-1])
              for k in ("clip_l", "clip_g") if k in tensors]
        if len({v.shape[0] for v in vs}) > 1:
            raise LoadError(f"{path}: clip_l has {vs[0].shape[0]} vectors, clip_g "
                            f"{vs[1].shape[0]}; need as many of each")
        widths = tuple(v.shape[1] for v in vs) if len(vs) == 2 else ()
        return [Concept(path.stem, torch.cat(vs, 1), False, widths=widths)]
    if len(tensors) != 1:
        raise LoadError(f"{path}: keys {sorted(tensors)[:5]} are not an embedding file: "
                        "need one tensor (diffusers' {token: vectors}, A1111's emb_params) "
                        "or a file written by train-ti")
    (key, v), = tensors.items()
    name = path.stem if key == "emb_params" else key.strip("<>")
    if v.ndim not in (1, 2) or not v.is_floating_point() or not name:
        raise LoadError(f"{path}: {key!r} has shape {tuple(v.shape)}; "
                        "need (n, D) or (D,) float vectors")
    return [Concept(name, v.float().reshape(-1, v.shape[-1]), False)]


def save_concept(c: Concept, path, **meta) -> Path:
    """All K rows with their metadata (K, token, initializer) in one .safetensors, written
    atomically."""
    m = {"format": FORMAT, "token": c.name, "bins": str(c.bins), "initializer": c.initializer,
         "dim": str(c.embeds.shape[1]), **{k: str(v) for k, v in meta.items()}}
    if c.widths:
        m["widths"] = ",".join(map(str, c.widths))
    return images.save_tensors({"embeds": c.embeds.detach().float()}, path, m)


def export_row(c: Concept, row: int, path, token: str | None = None) -> Path:
    """Row `row` as a diffusers learned_embeds.safetensors: {"<token>": (1, D)}, for
    load_textual_inversion."""
    if not c.multires or not 0 <= row < c.bins:
        raise ValueError(f"row={row}: {c.name} has rows 0..{c.bins - 1}" if c.multires else
                         f"{c.name} is not a multiresolution concept")
    token = token or f"<{c.name}>"
    v = c.embeds[row:row + 1].detach().float()
    if len(c.widths) == 2:  # SDXL, as A1111 writes it
        parts = v.split(list(c.widths), 1)
        return images.save_tensors(dict(zip(("clip_l", "clip_g"), parts)), path)
    return images.save_tensors({token: v}, path)


def check_dim(c: Concept, text_encoders, where) -> Concept:
    """A concept whose vectors fit the model's text encoders (SDXL: both widths side by side)."""
    widths = [te.config.hidden_size for te in text_encoders]
    if c.embeds.shape[1] != sum(widths) or (c.widths and list(c.widths) != widths):
        enc = (f"text encoder is {widths[0]}-d" if len(widths) == 1 else
               f"text encoders are {'+'.join(map(str, widths))}-d")
        raise LoadError(f"{where}: <{c.name}> has {c.embeds.shape[1]}-d vectors but this model's "
                        f"{enc}: the embeddings were trained for another model")
    if not torch.isfinite(c.embeds).all():
        raise LoadError(f"{where}: <{c.name}> has NaN/inf values")
    return c


def load_images(folder, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """(N, 3, res, res) in [-1, 1]: every image file of `folder`, bicubic-resized (as the
    reference)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of training images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) "
                         "to learn the concept from")
    out = []
    for p in files:
        im = images.load(p)
        if center_crop:
            s = min(im.size)
            im = im.crop(((im.width - s) // 2, (im.height - s) // 2,
                          (im.width + s) // 2, (im.height + s) // 2))
        out.append(images.to_tensor(im.resize((resolution, resolution), images.Image.BICUBIC)))
    return torch.cat(out)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def train(c, pixels: torch.Tensor, cfg: TrainConfig, out=None, checkpoint=None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> Concept:
    """Learn cfg.bins time-indexed embeddings of cfg.token from `pixels` (N, 3, H, W) in [-1, 1]
    with the runtime model `c` (an engine.model.Model).

    Each example draws t ~ U{0..T−1}, a template and a flip, and trains only the row of t's bin.
    Only those rows are in the optimiser: every other weight, the embedding table included, stays
    bit for bit. Every step's randomness comes from a generator seeded by (seed, step), and the
    state is checkpointed every cfg.checkpoint_every steps, so a run resumed from `checkpoint` ends
    with the same embeddings as one that never stopped. The frozen VAE encodes each image and its
    mirror once; each step samples the latent from those means and variances (the reference encodes
    every step: same distribution, more work)."""
    cfg.check()
    c.check_memory("train-ti", *pixels.shape[2:], cfg.batch, pixels.shape[0], grad=True,
                   fix="pass a smaller resolution (--resolution) or batch (--batch)")
    unet, vae, sched, pairs, text_time = c.unet, c.vae, c.scheduler, c.text_pairs, c.text_time
    init = [tok.ids(cfg.init_token) for tok, _ in pairs]
    if any(len(i) != 1 for i in init):
        raise ValueError(f"init_token={cfg.init_token!r} is {max(map(len, init))} tokens for this "
                         "tokenizer; need a single token (a common word of the model's vocabulary)")
    for m in (*(te for _, te in pairs), unet, vae):
        m.requires_grad_(False)
    dev, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    # one vector per encoder, side by side (SDXL: CLIP ViT-L's, then bigG's)
    start_rows = torch.cat([te.text_model.embeddings.token_embedding.weight[i].detach().float()
                            for i, (_, te) in zip(init, pairs)], 1)
    rows = torch.nn.Parameter(start_rows.repeat(cfg.bins, 1))
    widths = tuple(te.config.hidden_size for _, te in pairs) if len(pairs) > 1 else ()
    concept = Concept(cfg.token, rows, True, cfg.init_token, widths)
    enc = Encoder(pairs, {cfg.token: concept})
    temps = templates_for(cfg.templates, pairs[0][0])
    resolved = {}  # prompt text → its token pieces, tokenized once
    opt = torch.optim.AdamW([rows], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            eps=1e-8)

    with torch.no_grad():
        x = pixels.to(dev, torch.float32)
        moments = [tiled_vae.encode_moments(vae, v.to(next(vae.parameters()).dtype))
                   for v in (x, x.flip(-1))]
        # (flip, N, C, h, w)
        mean, logvar = (torch.stack([m[j].float() for m in moments]) for j in (0, 1))
        std = torch.exp(0.5 * logvar)
    f, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    n, T = pixels.shape[0], sched.num_train_timesteps
    run = {**asdict(cfg), "images": _digest(pixels), "templates": temps}
    start = 0
    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint is not None and checkpoint.is_file():
        tensors, meta = read_tensors(checkpoint, "checkpoint")
        if json.loads(meta.get("run", "{}")) != json.loads(json.dumps(run)):
            raise ValueError(f"{checkpoint} is from another run (other images or settings); "
                             "delete it to start over")
        start = int(meta["step"])
        with torch.no_grad():
            rows.copy_(tensors["embeds"])
        opt.load_state_dict({"state": {0: {"step": tensors["step"], "exp_avg": tensors["exp_avg"],
                                           "exp_avg_sq": tensors["exp_avg_sq"]}},
                             "param_groups": opt.state_dict()["param_groups"]})

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train <{cfg.token}>", disable=not progress,
               leave=False)
    ema = None
    for step in range(start, cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(n, (cfg.batch,), generator=g)
        flip = (torch.rand(cfg.batch, generator=g) < cfg.flip).long()
        tpl = torch.randint(len(temps), (cfg.batch,), generator=g)
        t = torch.randint(T, (cfg.batch,), generator=g)
        bins = t * cfg.bins // T
        z0 = (mean[flip, idx] + std[flip, idx] * randn_tensor((cfg.batch, *mean.shape[2:]), g, dev)
              - shift) * f
        noise = randn_tensor(z0.shape, g, dev)
        t = t.to(dev)
        texts = [temps[a].format(f"<{cfg.token}|{b}|>")
                 for a, b in zip(tpl.tolist(), bins.tolist())]
        for s in texts:
            if s not in resolved:
                resolved[s] = enc.resolve(s)
        emb = enc.encode_resolved([resolved[s] for s in texts])
        xt, added = schedule.q_sample(sched, z0, t, noise).to(dtype), {}
        if text_time is not None:
            emb, added = text_time.inputs(emb, xt, guided=False)
        pred = unet(xt, t, emb.to(dtype), **added)
        loss = F.mse_loss(pred.float(), schedule.training_target(sched, z0, t, noise))
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: the loss is {value}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        if on_step is not None:
            on_step(step, value)
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0
                                       and step + 1 < cfg.steps):
            st = opt.state_dict()["state"][0]
            images.save_tensors({"embeds": rows.detach(), "step": st["step"].reshape(()),
                                 "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]},
                                checkpoint, {"step": str(step + 1), "run": json.dumps(run)},
                                keep=True)
    bar.close()
    learned = Concept(cfg.token, rows.detach().clone(), True, cfg.init_token, widths)
    if out is not None:
        save_concept(learned, out, steps=cfg.steps, run=json.dumps(run))
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    return learned
