"""Blended latent diffusion (Avrahami, Fried & Lischinski 2023) and multi-stage high-resolution
editing (Ackermann & Li 2022, "High-Resolution Image Editing via Multi-Stage Blended Diffusion").

Blended diffusion samples the whole latent under the prompt and, at every step, replaces what lies
outside the mask with the source latent noised to the same level, so only the masked region is
generated. The multi-stage edit runs it at the base model's resolution (with RePaint resampling and
CLIP reranking of a batch of candidates), then upscales in stages: ×4 super-resolution (resized to
×2 with MSBD's stage ratio), then blended diffusion started at an intermediate step against a
low-passed original. Stages larger than `max_side` run in overlapping tiles composited with
sigmoid alpha ramps, so the working set depends on the tile; only the full-resolution image
buffers grow with the output. The result is the original outside the mask, pixel for pixel.
"""
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from . import images, ldm, memory, schedule
from .blend_options import (BLENDS, RERANKS as RERANKS, STAGE_MODELS as STAGE_MODELS,
                            UPSCALERS as UPSCALERS, Options)
from .denoiser import Cond, repeat_cond
from .model import check_pair
from .rng import generator as make_generator, randn_tensor
from .sample import ddim
from .regions import (binary_mask, composite, crop_box, prepare_mask, progressive, resize,
                      stage_sides, tile_boxes)


@dataclass
class Result:
    """The edit at full resolution, each stage's output (crop, stitched with the original at that
    resolution), the binary mask, the crop box (y, x, side), the candidates' CLIP scores and
    per-stage tile counts and times."""
    image: torch.Tensor
    stages: list[torch.Tensor]
    mask: torch.Tensor
    box: tuple[int, int, int]
    scores: list[float] = field(default_factory=list)
    chosen: int = 0
    log: list[dict] = field(default_factory=list)


def check_scorer(scorer, o: Options):
    """More than one stage-1 candidate needs a CLIP scorer to rerank them."""
    if scorer is None and o.candidates > 1:
        raise ValueError(f"candidates={o.candidates} needs a CLIP scorer to rerank them; pass one "
                         "(--clip) or use 1 candidate (--candidates 1)")


# SD 1.x's training schedule and MSBD's DDIM grid on it (100 stage steps: t = 1, 11, …, 991)
SD_SCHEDULE = schedule.SchedulerConfig.from_dict(ldm.preset("sd1")["scheduler"])


def stage_strength(sched: schedule.SchedulerConfig, o: Options, start: float) -> float:
    """The fraction of a stage's schedule `sched` that runs: `start`, or with start_on='sd' the one
    that starts at the noise level where `start` starts on SD's schedule (MSBD's 0.4: t = 391)."""
    if o.start_on == "stage":
        return start
    t = int(schedule.timesteps(SD_SCHEDULE, o.stage_steps, start)[0])
    return schedule.strength_at(sched, o.stage_steps, schedule.abar(SD_SCHEDULE, t))


def repaint_walk(pairs: list[tuple[int, int]], repeats: int,
                 jump: int = 1) -> list[tuple[int, int]]:
    """RePaint's schedule (Lugmayr et al. 2022, Alg. 1 with jump length j) as DDIM moves
    (t, t_next): walk `jump` steps down, then `repeats` times jump back up to where the walk started
    and walk down again; but not from the walk's end: Alg. 1 resamples only while t > 1, and MSBD's
    code does not re-noise its last step either."""
    walk = []
    for i in range(0, len(pairs), jump):
        chunk = pairs[i:i + jump]
        for r in range((repeats if i + jump < len(pairs) else 0) + 1):
            if r:
                walk.append((chunk[-1][1], chunk[0][0]))
            walk += chunk
    return walk


def blended(den, x: torch.Tensor, z_src: torch.Tensor, mask, cond: Cond,
            sched: schedule.SchedulerConfig, steps: int, strength: float = 1.0, eta: float = 1.0,
            blend: str = "after", repeats: int = 0, jump: int = 1, generator=None,
            progress: bool = True, desc: str = "blend") -> torch.Tensor:
    """Blended latent diffusion (Avrahami et al. 2023, Alg. 1) from x at the grid's top timestep: a
    DDIM step under `cond`, then x ← m·x + (1 − m)·q(z_src, level). `mask` (B, 1, h, w) in {0, 1},
    or a list of masks used over equal parts of the schedule (`progressive`). Background noise comes
    from its own generator, so an all-ones mask gives exactly `sample.ddim`."""
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r}: use one of {BLENDS}")
    masks = mask if isinstance(mask, list) else [mask]
    pairs = schedule.step_pairs(sched, steps, strength)
    index = {t: k for k, (t, _) in enumerate(pairs)}
    bg_gen = None if generator is None else \
        torch.Generator(generator.device).manual_seed(generator.initial_seed() + 1)

    def background(t):
        if t < 0:
            return z_src
        noise = randn_tensor(x.shape, bg_gen, x.device, torch.float32).to(x.dtype)
        return schedule.q_sample(sched, z_src, t, noise)

    def keep(level):  # the hook: the source, noised to `level`, outside the mask
        def hook(x, t, t_next):
            m = masks[index[t] * len(masks) // len(pairs)]
            return m * x + (1 - m) * background(level(t, t_next))
        return hook

    hooks = {"after": {"after": keep(lambda t, _: t)},
             "exact": {"after": keep(lambda _, t_next: t_next)},
             "before": {"before": keep(lambda t, _: t)}}[blend]
    return ddim(den, x, cond, sched, steps, strength, eta, generator, progress,
                walk=repaint_walk(pairs, repeats, jump), noise_dtype=torch.float32, desc=desc,
                **hooks)


# ---- the multi-stage edit ------------------------------------------------------------------------

class MultiStage:
    """The base model (stage 1) and the ×4 SR model (upscaling and, by default, the stages'
    diffusion), as engine.model.Model."""

    def __init__(self, base, sr, scorer=None):
        check_pair(base, sr, "MultiStage", sr_optional=True)
        self.base, self.sr, self.scorer = base, sr, scorer
        self.base_side = base.side

    @torch.no_grad()
    def edit(self, image: torch.Tensor, mask, prompt: str, opts: Options = Options(),
             progress: bool = True, first: torch.Tensor | None = None) -> Result:
        """Edit the masked region of `image` ((1, 3, H, W) in [-1, 1]) to match `prompt`. `first`: a
        stage-1 result (`Result.stages[0]`) to upscale instead of sampling stage 1 again, e.g. to
        compare upscaling options."""
        if self.sr is None and (opts.upscaler == "sr" or opts.stage_model == "sr"):
            raise ValueError("the SR upscaler / stage model needs an x4 model; "
                             "pass one or use bicubic + base")
        check_scorer(self.scorer, opts)
        top = self.sr.noise_levels if self.sr is not None else 350
        if opts.sr_noise_level > top:
            raise ValueError(f"sr_noise_level={opts.sr_noise_level}: "
                             f"the x4 model takes at most {top}")
        image, m = self._inputs(image, mask)
        if not m.any():
            warnings.warn("the mask is empty: nothing to edit, returning the image unchanged",
                          stacklevel=2)
            return Result(image.clone(), [image.clone()], m, (0, 0, image.shape[-1]))
        y, x, side = crop_box(m, opts.margin, self.base_side)
        if side < self.base_side or side % 16:
            raise ValueError(f"image is {image.shape[-1]}×{image.shape[-2]}: the edited square "
                             "must be a multiple of 16 pixels and at least the base model's "
                             f"{self.base_side}²; resize the image")
        area = image.shape[-2] * image.shape[-1]
        memory.check("blend", lambda s, _: memory.OVERHEAD + self.peak_memory(
            s, area * s * s // side ** 2, opts), side, side,
            memory.available(self.base.device, self.base.max_memory), 16,
            "pass a smaller --size, or edit a crop around the mask (--margin)")
        crop, mc = image[..., y:y + side, x:x + side], m[..., y:y + side, x:x + side]
        sides = stage_sides(side, self.base_side, opts.stage_ratio)
        res = Result(image, [], m, (y, x, side))
        conds = self._conds(prompt, opts)
        t0 = time.perf_counter()
        if first is not None and tuple(first.shape) != (1, 3, sides[0], sides[0]):
            raise ValueError(f"first: a stage-1 result must be (1, 3, {sides[0]}, {sides[0]}), "
                             f"got {tuple(first.shape)}")
        out = first.to(image) if first is not None else \
            self._stage1(crop, mc, prompt, conds, opts, res, progress,
                         f"stage 1/{len(sides)} ({sides[0]}²)")
        res.log.append({"stage": 1, "side": sides[0],
                        "seconds": round(time.perf_counter() - t0, 2)})
        res.stages.append(out)
        for k, s in enumerate(sides[1:], 2):
            t0 = time.perf_counter()
            out, n, skipped = self._upscale(out, crop, mc, s, conds, opts, progress,
                                            f"stage {k}/{len(sides)} ({s}²)")
            res.log.append({"stage": k, "side": s, "tiles": n, "skipped_tiles": skipped,
                            "seconds": round(time.perf_counter() - t0, 2)})
            res.stages.append(out)
        res.image = image.clone()
        res.image[..., y:y + side, x:x + side] = mc * out + (1 - mc) * crop  # the tight stitch
        return res

    @torch.no_grad()
    def direct(self, image: torch.Tensor, mask, prompt: str, opts: Options = Options(),
               side: int | None = None, progress: bool = True) -> torch.Tensor:
        """The direct baseline: stage 1's blended diffusion on the whole image resized to `side`
        (default the base model's), with no upscaling stages; returns (1, 3, side, side)."""
        image, m = self._inputs(image, mask)
        res = Result(image, [], m, (0, 0, image.shape[-1]))
        return self._stage1(image, m, prompt, self._conds(prompt, opts), opts, res, progress,
                            "direct", side)

    def peak_memory(self, side: int, area: int, o: Options) -> int:
        """Estimated peak bytes of an edit of a side² square in an image of `area` pixels
        (engine.memory): the largest of stage 1's candidates at the base side, a stage's tile of
        at most max_side and the ×4 model's output for it (twice the tile with stage_ratio 2),
        plus the float32 images kept (about 10 copies when the square is the whole image,
        measured; 3 of them are of the whole image), plus the models' weight copies still to be
        reordered (Model.reordered_bytes)."""
        b, t = self.base, min(side, o.max_side)
        parts = b.peak_memory(b.side, b.side, (1 + (o.guidance > 1)) * o.candidates, o.candidates)
        copies = b.reordered_bytes()
        if o.upscaler == "sr":
            u = 4 * t // o.stage_ratio  # the ×4 model's output for a tile
            parts += self.sr.peak_memory(u, u, 1 + (o.sr_guidance > 1))
        if o.stage_model == "sr":
            parts += self.sr.peak_memory(t, t, 1 + (o.stage_cfg > 1))
        if "sr" in (o.stage_model, o.upscaler):
            copies += self.sr.reordered_bytes()
        if o.stage_model == "base":
            parts += b.peak_memory(t, t, 1 + (o.stage_cfg > 1))
        return copies + max(parts) + 12 * (7 * side * side + 3 * area)

    def _inputs(self, image: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked image, float32 on the base model's device, and its binary mask."""
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError("image: need one RGB image (1, 3, H, W), "
                             f"got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image has NaN/inf values: need finite pixel values in [-1, 1]")
        image = image.to(self.base.device, torch.float32)
        return image, prepare_mask(mask, image.shape[-2:]).to(image)

    def _conds(self, prompt: str, o: Options) -> dict:
        """The prompt encoded once for every stage: by the base model (CFG at o.guidance), the ×4
        model's upscale (at o.sr_guidance) and the stages' diffusion (at o.stage_cfg)."""
        conds = {"base": self.base.prompt_cond([prompt], None, o.guidance > 1)}
        if self.sr is not None and (o.upscaler == "sr" or o.stage_model == "sr"):
            conds["sr"] = self.sr.prompt_cond([prompt], None, o.sr_guidance > 1)
        name = "sr" if o.stage_model == "sr" else "base"
        model, scale = (self.sr, o.sr_guidance) if name == "sr" else (self.base, o.guidance)
        # the same model with or without CFG alike: the same conditioning
        conds["stage"] = (conds[name] if (scale > 1) == (o.stage_cfg > 1)
                          else model.prompt_cond([prompt], None, o.stage_cfg > 1))
        return conds

    def _stage1(self, crop, mc, prompt, conds, o: Options, res: Result, progress, desc, side=None):
        """Blended diffusion of the crop at the base model's side (or `side`: the direct
        baseline)."""
        b, n = self.base, o.candidates
        s = side or self.base_side
        src = resize(crop, s)
        m_px = binary_mask(mc, s)
        m_z = binary_mask(mc, s // b.downscale)
        z_src = b.encode(src).repeat(n, 1, 1, 1)
        den = b.inpainting_denoiser(b.denoiser(o.guidance), src, m_px, n)
        cond = repeat_cond(conds["base"], n, den.guided)
        gen = make_generator(o.seed)
        x = randn_tensor(z_src.shape, gen, b.device, torch.float32).to(b.dtype)
        masks = progressive(m_z.to(x), o.dilate) if o.dilate else m_z.to(x)
        z = blended(den, x, z_src, masks, cond, b.scheduler, o.steps, 1.0, o.eta, o.blend,
                    o.repaint, o.jump, gen, progress, desc)
        cands = m_px * b.decode(z).float() + (1 - m_px) * src
        if n > 1:
            scored = cands if o.rerank == "whole" else cands * m_px
            scores = self.scorer.score(scored, [prompt] * n)
            res.scores, res.chosen = [round(v, 3) for v in scores.tolist()], int(scores.argmax())
        return cands[res.chosen:res.chosen + 1]

    def _upscale(self, prev, crop, mc, side, conds, o: Options, progress, desc):
        """One stage: SR (or bicubic) of the previous stage, composited with the original outside
        the mask (low-passed: o.lowpass), then blended diffusion from `start`; in tiles above
        `max_side`. Returns (stitched, tiles, skipped)."""
        orig = resize(crop, side)
        detail = {"matching": prev.shape[-1], "half": side // 2, "no": side}[o.lowpass]
        ref = resize(resize(crop, detail), side)
        m = binary_mask(mc, side)
        # what the ×4 model upscales: the previous stage at 1/stage_ratio of this one
        k = o.stage_ratio
        low = resize(prev, side // k)
        canvas = resize(prev, side, "bicubic")
        tiled = side > o.max_side
        boxes = tile_boxes(side, side, o.max_side, o.overlap) if tiled else [(0, 0, side, side)]
        done, skipped = [], 0
        for y, x, th, tw in tqdm(boxes, desc=desc + (f", {len(boxes)} tiles" if tiled else ""),
                                 disable=not progress):
            mt = m[..., y:y + th, x:x + tw]
            # outside the mask everything is the original again after the final stitch
            if not mt.any():
                skipped += 1
                continue
            box = (slice(None), slice(None), slice(y, y + th), slice(x, x + tw))
            lbox = (slice(None), slice(None), slice(y // k, (y + th) // k),
                    slice(x // k, (x + tw) // k))
            im = self._stage_tile(low[lbox], canvas[box], ref[box], mt, conds, o,
                                  o.tiled_start if tiled else o.start, progress and not tiled)
            done.append(((y, x, th, tw), im))
        out = composite(canvas, done, o.overlap // 2)
        return m * out + (1 - m) * orig, len(boxes), skipped

    def _stage_tile(self, low, bicubic, ref, m, conds, o: Options, start, progress):
        # re-seeded per tile, as MSBD: a tile's result does not depend on the others
        gen = make_generator(o.seed)
        sr, th, tw = self.sr, *m.shape[-2:]
        lr = resize(low, (th // 4, tw // 4))  # what the ×4 model's diffusion of the tile sees

        def sr_denoiser(x):
            noise = randn_tensor(x.shape, gen, sr.device, torch.float32)
            return sr.upscaler_denoiser(x.to(sr.device, sr.dtype), o.sr_noise_level, noise,
                                        o.sr_guidance)

        if o.stage_model == "sr" or o.upscaler == "sr":
            sr_den = sr_denoiser(lr)
        if o.upscaler == "sr":
            up_den = sr_den if low.shape == lr.shape else sr_denoiser(low)
            shape = (1, sr.vae.config.latent_channels,
                     *(4 * n // sr.downscale for n in low.shape[-2:]))
            z = randn_tensor(shape, gen, sr.device, torch.float32).to(sr.dtype)
            up = resize(sr.decode(ddim(up_den, z, conds["sr"], sr.scheduler, o.sr_steps,
                                       progress=False)).float(), (th, tw))
        else:
            up = bicubic
        comp = m * up + (1 - m) * ref
        if start == 0:  # no diffusion: the upscale, with the original outside the mask
            return images.back_project(comp.float(), low.float(), o.backproject)
        if o.stage_model == "sr":
            p, den = sr, replace(sr_den, guidance=o.stage_cfg)  # the same ĉ
        else:
            p, den = self.base, self.base.denoiser(o.stage_cfg)
        cond = conds["stage"]
        if p is self.base:
            den = p.inpainting_denoiser(den, comp, m)
        f = p.downscale
        z_src = p.encode(comp)
        m_z = binary_mask(m, (m.shape[-2] // f, m.shape[-1] // f)).to(z_src)
        start = stage_strength(p.scheduler, o, start)
        t_start = int(schedule.timesteps(p.scheduler, o.stage_steps, start)[0])
        x = schedule.q_sample(p.scheduler, z_src, t_start,
                              randn_tensor(z_src.shape, gen, p.device, torch.float32).to(p.dtype))
        z = blended(den, x, z_src, m_z, cond, p.scheduler, o.stage_steps, start, o.eta, o.blend,
                    0, 1, gen, progress, "stage diffusion")
        return images.back_project(p.decode(z).float(), low.float(), o.backproject)
