"""IterInv (Tang, Wang, van de Weijer 2023): invert an image through a cascade, base model + ×4 SR
stages.

Stage 1 (the base model) is DDIM inversion plus null-text inversion (engine.invert). Each SR stage
is inverted by IterInv: for t from low to high noise, solve z_t so that one deterministic DDIM step
from it lands on the already-solved z_{t−Δ}; reconstruction is ordinary DDIM sampling from the
solved z_T. The noise-augmented low-res conditioning ĉ is drawn once per stage and reused for the
reconstruction (the reference's essential detail). Solvers:

- paper: N plain gradient steps on Σ(step(z) − z_{t−Δ})², step size 0.3·√linspace(1, 0.5, T)[k],
  warm-started from the previous solution (ITERINV `SDUP_inv_pipeline.py`: T = 50, N = 21, no
  momentum, no early stop).
- fast (ours): the same equation as a fixed point. z = g(z) with g(z) = the DDIM move of z_{t−Δ} up
  to t along ε̂(z, t) holds exactly when step(z) = z_{t−Δ} (no clipping); iterate it with Anderson
  acceleration, forward passes only, and stop once the one-step error's RMS is below `tol`. It
  starts from the DDIM inversion step along the ε already computed at the previous solution, so a
  step whose start is good enough costs one call.

Editing (end2end_diffedit.py): a DiffEdit mask and masked DDIM on stage 1, then every SR stage
samples from the cached z_T of the source's inversion under the edit prompt, conditioned on the
edited lower stage.
"""
import time
from dataclasses import dataclass, replace

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import diffedit, images, schedule, tiles
from .cascade_files import CascadeInversion, SRInversion
from .denoiser import Cond, constant, repeat_cond
from .invert import NULL_TEXT_METHODS, invert as ddim_invert, invert_image, reconstruct
from .model import check_pair
from .rng import generator, randn_tensor
from .sample import check_args, check_fraction, ddim

MODES = ("paper", "fast")


def step_sizes(n: int, scale: float = 0.3) -> torch.Tensor:
    """The paper's gradient step per inverse step k (k = 0 the lowest timestep):
    scale·√linspace(1, 0.5, n)[k]."""
    return scale * torch.linspace(1.0, 0.5, n, dtype=torch.float64).sqrt()


def one_step(den, sched, z, t, t_prev, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """(DDIM step t → t_prev from z, the model output at (z, t))."""
    out = den(z, t, cond)
    return schedule.ddim_step(sched, out, t, t_prev, z)[0], out


def _rms(r: torch.Tensor) -> torch.Tensor:
    return r.detach().double().square().flatten(1).mean(1).sqrt()


@dataclass
class Solution:
    """latents[k] sits at timesteps[k] (ascending; -1 is the clean latent); errors[k] is the
    per-sample RMS of the last evaluated one-step error of inverse step k; evals the model calls
    made (paper: forward+backward)."""
    timesteps: list[int]
    latents: list[torch.Tensor]
    errors: list[torch.Tensor]
    evals: int


def solve_paper(den, z0: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig, steps: int = 50,
                inner_steps: int = 21, scale: float = 0.3, progress: bool = True) -> Solution:
    """IterInv's SR-stage inversion (paper Alg. 1; code SDUP_inv_pipeline): per t ascending,
    `inner_steps` gradient steps z ← z − s_k ∇_z Σ(step(z) − z_{t−Δ})², z warm-started from
    z_{t−Δ}."""
    pairs = schedule.inversion_timesteps(sched, steps)
    sizes = step_sizes(len(pairs), scale)
    z, latents, errors = z0, [z0], []
    for k, (t_prev, t) in enumerate(tqdm(pairs, desc="iterinv (paper)", disable=not progress,
                                         leave=False)):
        target = latents[-1]
        for _ in range(inner_steps):
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                r = one_step(den, sched, z, t, t_prev, cond)[0] - target
                (g,) = torch.autograd.grad(r.square().sum(), z)
            z = z.detach() - sizes[k].item() * g
        latents.append(z)
        errors.append(_rms(r))
    return Solution([pairs[0][0]] + [t for _, t in pairs], latents, errors,
                    len(pairs) * inner_steps)


def solve_fast(den, z0: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig, steps: int = 50,
               tol: float = 1e-4, max_iter: int = 8, memory: int = 3,
               progress: bool = True) -> Solution:
    """Ours: per t ascending, the fixed point z = g(z) of the one-step equation by Anderson
    acceleration (Walker & Ni 2011, type II, `memory` past iterates), per sample, until the one-step
    error RMS < tol."""
    pairs = schedule.inversion_timesteps(sched, steps)
    latents, errors, evals, eps = [z0], [], 0, None
    bar = tqdm(pairs, desc="iterinv (fast)", disable=not progress, leave=False)
    with torch.no_grad():
        for t_prev, t in bar:
            target = latents[-1]
            # start: the DDIM inversion step along the ε of the previous solution (known: no extra
            # call); at the first step there is none, so evaluate z_{t−Δ} itself and take its g
            z = target if eps is None else schedule.ddim_eps_step(sched, eps, t_prev, t, target)
            start, hist = eps is None, []
            err = torch.full((z.shape[0],), float("inf"), dtype=torch.float64)
            for it in range(max_iter + 1):
                stepped, out = one_step(den, sched, z, t, t_prev, cond)
                evals += 1
                if not (start and it == 0):
                    err = _rms(stepped - target)
                    if bool((err < tol).all()) or it == max_iter:
                        break
                eps = schedule.predict_x0_eps(sched, out, t, z)[1]
                gz = schedule.ddim_eps_step(sched, eps, t_prev, t, target)
                hist = (hist + [(z, gz)])[-(memory + 1):]
                new = _anderson(hist)
                done = (err < tol).view(-1, *(1,) * (z.ndim - 1)).to(z.device)
                z = torch.where(done, z, new)
            # the last call was at the accepted z
            eps = schedule.predict_x0_eps(sched, out, t, z)[1]
            latents.append(z)
            errors.append(err)
            bar.set_postfix(err=f"{err.max().item():.1e}", iters=it)
    return Solution([pairs[0][0]] + [t for _, t in pairs], latents, errors, evals)


def _anderson(hist: list[tuple[torch.Tensor, torch.Tensor]], reg: float = 1e-10) -> torch.Tensor:
    """Type-II Anderson mixing of iterates (z_i, g(z_i)): g_k − ΔG·γ with γ = argmin ‖f_k − ΔF·γ‖,
    f = g − z, solved per sample by regularised normal equations in float64."""
    z, g = hist[-1]
    if len(hist) == 1:
        return g
    b = z.shape[0]
    f = [(gi - zi).reshape(b, -1).double() for zi, gi in hist]
    dF = torch.stack([f[i + 1] - f[i] for i in range(len(f) - 1)], -1)              # (B, n, m)
    dG = torch.stack([(hist[i + 1][1] - hist[i][1]).reshape(b, -1).double()
                      for i in range(len(f) - 1)], -1)
    A = dF.transpose(1, 2) @ dF
    scale = A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    A = A + reg * scale * torch.eye(A.shape[-1], dtype=A.dtype)
    gamma = torch.linalg.solve(A, dF.transpose(1, 2) @ f[-1].unsqueeze(-1))
    return (g.reshape(b, -1).double() - (dG @ gamma).squeeze(-1)).reshape(z.shape).to(z.dtype)


def solve(mode: str, den, z0, cond, sched, steps=50, progress=True, **kw) -> Solution:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    return (solve_paper if mode == "paper" else solve_fast)(den, z0, cond, sched, steps,
                                                            progress=progress, **kw)


# ---- the cascade: base model at 64² → ×4 → ×4 ----------------------------------------------------

# null-text inversion (engine.invert.NULL_TEXT_METHODS); u = c (NPI); plain DDIM + CFG
STAGE1 = (*NULL_TEXT_METHODS, "npi", "ddim")
METHODS = MODES + ("ddim", "ddim-reference")  # SR-stage inversions; the last two are the baselines


def pyramid(image, size: int, base: int = 64) -> list[torch.Tensor]:
    """The input at every stage's side (base, 4·base, …, size) as (B, 3, s, s) in [-1, 1], each
    resized from the input itself with PIL's bicubic filter, as the reference does."""
    pils = image if isinstance(image, (list, tuple)) else [image]
    if not pils or not all(isinstance(p, Image.Image) for p in pils):
        raise ValueError("image: need a PIL image or a list of them")
    sides = [base]
    while sides[-1] < size:
        sides.append(sides[-1] * 4)
    if sides[-1] != size or len(sides) < 2:
        raise ValueError(f"size={size}: need {base}·4^k with k ≥ 1 "
                         "(256 or 1024 for the embedded cascade)")
    for p in pils:
        if p.width != p.height:
            raise ValueError(f"image is {p.width}×{p.height}: the cascade inverts square images; "
                             "crop it square first")
    return [images.to_tensor([p if p.width == s else p.resize((s, s), Image.BICUBIC) for p in pils])
            for s in sides]


class Cascade:
    """The base model and the ×4 SR model (engine.model.Model; the SR model runs once per ×4, tile
    by tile above `tile` low-res pixels)."""

    def __init__(self, base, sr, tile: int = 64, overlap: int = 16):
        check_pair(base, sr, "Cascade")
        tiles.check(tile, overlap)
        self.base, self.sr, self.tile, self.overlap = base, sr, tile, overlap

    def sr_denoiser(self, low: torch.Tensor, noise: torch.Tensor, level: int):
        """An SR stage's denoiser, ĉ = q_sample(low, level, noise) fixed: the same for inversion and
        sampling."""
        den = self.sr.upscaler_denoiser(low, level, noise)
        return tiles.Tiled(den, self.tile, self.overlap) if max(low.shape[2:]) > self.tile else den

    def _stage1(self, x64, prompts, stage1, steps, guidance, progress):
        b = self.base
        null_text = stage1 if stage1 in NULL_TEXT_METHODS else None
        traj = invert_image(b, x64, prompts, steps, "destination", null_text, guidance,
                            progress=progress)
        if stage1 != "ddim":  # npi: u = c, so CFG collapses to the conditional prediction
            return traj, b.decode(reconstruct(b, traj, prompts, progress=progress))
        den = b.denoiser(guidance)
        cond = constant(b.encode_prompt(prompts, None, den.guided))
        return traj, b.decode(ddim(den, traj.latents[-1], cond, b.scheduler, steps,
                                   progress=progress))

    @torch.no_grad()
    def invert(self, image, prompt, size: int = 256, method: str = "fast", stage1: str = "fast",
               steps: int = 50, guidance: float = 3.0, noise_level: int = 100, seed: int = 0,
               progress: bool = True, **solver) -> CascadeInversion:
        """Invert `image` (PIL, square) through the cascade up to `size`, then reconstruct every
        stage.
        stage1: null-text inversion at CFG `guidance` (IterInv's default 3): 'fast' (ours),
        'reference' (P2P's settings) or 'iterinv' (IterInv's: engine.invert.null_text); 'npi'; or
        'ddim' (plain DDIM inversion sampled back with CFG). method: IterInv 'paper' or
        'fast' for the SR stages, or the baselines 'ddim' (v-aware DDIM inversion, same ĉ) and
        'ddim-reference' (the reference code's: the v output read as ε, ĉ redrawn for the
        reconstruction)."""
        if method not in METHODS:
            raise ValueError(f"method={method!r}: use one of {METHODS}")
        if stage1 not in STAGE1:
            raise ValueError(f"stage1={stage1!r}: use one of {STAGE1}")
        self.sr.check_noise_level(noise_level)
        check_args(steps, guidance)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        pyr = [x.to(self.base.device) for x in pyramid(image, size)]
        if len(prompts) != pyr[0].shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {pyr[0].shape[0]} images: "
                             "give one prompt per image")
        traj, low = self._stage1(pyr[0].to(self.base.dtype), prompts, stage1, steps, guidance,
                                 progress)
        outs, stages = [low.float()], []
        sr = self.sr
        cond = constant(sr.encode_prompt(prompts))
        for target in pyr[1:]:
            gen = generator(seed)  # re-seeded per stage, as the reference
            noise = randn_tensor(low.shape, gen, low.device, torch.float32)
            den = self.sr_denoiser(low.to(sr.dtype), noise, noise_level)
            z0 = sr.encode(target)
            t0 = time.perf_counter()
            if method in MODES:
                sol = solve(method, den, z0, cond, sr.scheduler, steps, progress=progress, **solver)
                st = SRInversion(sol.latents[-1], noise, sol.errors, sol.evals)
            else:
                sched = (sr.scheduler if method == "ddim"
                         else replace(sr.scheduler, prediction_type="epsilon"))
                tr = ddim_invert(den, z0, cond, sched, steps, progress=progress)
                st = SRInversion(tr.latents[-1], noise, None, steps)
                # the generator was not re-seeded before the reconstruction
                if method == "ddim-reference":
                    redrawn = randn_tensor(low.shape, gen, low.device, torch.float32)
                    den = self.sr_denoiser(low.to(sr.dtype), redrawn, noise_level)
            st.seconds = time.perf_counter() - t0
            low = sr.decode(ddim(den, st.z_T, cond, sr.scheduler, steps, progress=progress))
            outs.append(low.float())
            stages.append(st)
        return CascadeInversion(prompts, method, stage1, steps, noise_level, seed, traj, stages,
                                outs)

    @torch.no_grad()
    def edit(self, image, source, target, stages: list[SRInversion], noise_level: int = 100,
             steps: int = 50, guidance: float = 3.0, strength: float = 0.8, mask_steps: int = 50,
             mask_strength: float = 0.5, mask_maps: int = 10, mask_ratio: float = 3.0,
             seed: int = 0, backproject: int = 0, progress: bool = True):
        """IterInv + DiffEdit (end2end_diffedit.py): DiffEdit mask and masked DDIM edit on stage 1
        (DDIM inversion under `source` with CFG, truncated to `strength`; sampling under `target`),
        then each SR stage samples from the source's cached z_T under `target`, conditioned on the
        edited stage below. Returns (edited images per stage, the stage-1 latent mask (B, 1, h, w)).
        The mask defaults are diffusers' (strength 0.5, ratio 3, 10 maps); ITERINV's IF port uses
        0.1 and 1, which on the embedded model masks 83% of the image where the edited objects cover
        10% (IoU 0.12 against 0.60; bench/results/iterinv.json, "mask").
        backproject (ours; 0 = the reference): iterations of back-projection of each SR stage's
        output onto the edited stage below (images.back_project), which stops the ×4 stages' colour
        drift from compounding."""
        b, sr = self.base, self.sr
        check_args(steps, guidance)
        self.sr.check_noise_level(noise_level)
        check_fraction("strength", strength)
        diffedit.check_mask(mask_strength, mask_ratio, mask_steps, mask_maps)
        images.check_backproject(backproject)
        sources = [source] if isinstance(source, str) else list(source)
        targets = [target] if isinstance(target, str) else list(target)
        pyr = pyramid(image, 64 * 4 ** len(stages))
        x64 = pyr[0].to(b.device, b.dtype)
        if not len(sources) == len(targets) == x64.shape[0]:
            raise ValueError(f"{len(sources)} source and {len(targets)} edit prompts "
                             f"for {x64.shape[0]} images")
        den = b.denoiser(guidance)
        z0 = b.encode(x64)
        src, tgt = (constant(b.encode_prompt(ps, None, den.guided)) for ps in (sources, targets))
        # each prompt encoded once
        maps = [repeat_cond(c, mask_maps, den.guided) for c in (src, tgt)]
        mask = diffedit.diffedit_mask(den, z0, *maps, b.scheduler, mask_steps, mask_strength,
                                      mask_maps, mask_ratio, generator(seed))
        traj = ddim_invert(den, z0, src, b.scheduler, steps, strength, "destination", progress)
        low = b.decode(diffedit.masked_ddim(den, traj, tgt, b.scheduler, mask, progress))
        outs = [low.float()]
        cond = constant(sr.encode_prompt(targets))
        for st in stages:
            if (st.z_T.shape[0] != x64.shape[0]
                    or st.z_T.shape[-1] != 4 * low.shape[-1] // sr.downscale):
                raise ValueError(f"the cached SR latents {tuple(st.z_T.shape)} do not fit "
                                 "this image; invert it with the same size first")
            den_sr = self.sr_denoiser(low.to(sr.dtype), st.noise, noise_level)
            y = sr.decode(ddim(den_sr, st.z_T.to(sr.device, sr.dtype), cond, sr.scheduler, steps,
                               progress=progress)).float()
            low = images.back_project(y, low.float(), backproject)
            outs.append(low)
        return outs, mask
