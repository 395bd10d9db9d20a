"""DiffEdit (Couairon et al. 2023) as IterInv's editing code uses it on the base stage
(algorithms.md 6.3): a mask from the disagreement of two prompts' noise predictions, and DDIM that
keeps the inverted latents outside it."""
import math

import torch

from . import schedule
from .denoiser import Cond, Denoiser
from .rng import randn_tensor
from .sample import check_fraction, ddim


def check_mask(strength: float, ratio: float, steps: int = 50, maps: int = 10):
    """The DiffEdit mask's settings (diffedit_mask), or a one-line error; call it before long
    work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"mask_steps={steps!r}: need a whole number ≥ 1")
    check_fraction("mask_strength", strength, "; the noise level the predictions are compared at")
    if int(steps * strength) < 1:
        raise ValueError(f"mask_strength={strength} with {steps} mask steps leaves no timestep to "
                         "compare at; raise it")
    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 1:
        raise ValueError(f"mask_maps={maps!r}: need a whole number ≥ 1")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
        raise ValueError(f"mask_ratio={ratio!r}: need a finite number > 0, e.g. 3")


def diffedit_mask(den: Denoiser, z0: torch.Tensor, cond_src: Cond, cond_tgt: Cond, sched,
                  steps: int = 50, strength: float = 0.5, maps: int = 10, ratio: float = 3.0,
                  generator=None) -> torch.Tensor:
    """DiffEdit mask (Couairon et al. 2023, §3.1): the mean over `maps` noisings of z0 at
    t(strength) and over channels of |ε̂_tgt − ε̂_src|, clamped to [0, ratio·mean], scaled to [0, 1]
    and binarised at 0.5. cond_*(t) give (2·maps·B, L, D) [uncond; cond] embeddings when `den` is
    guided. Returns (B, 1, h, w) in {0, 1}."""
    check_mask(strength, ratio, steps, maps)
    t = int(schedule.timesteps(sched, steps, strength)[0])
    b = z0.shape[0]
    zs = z0.repeat(maps, 1, 1, 1)
    x = schedule.q_sample(sched, zs, t,
                          randn_tensor(zs.shape, generator, z0.device, torch.float32).to(z0.dtype))
    with torch.no_grad():
        e_src = schedule.predict_x0_eps(sched, den(x, t, cond_src), t, x)[1]
        e_tgt = schedule.predict_x0_eps(sched, den(x, t, cond_tgt), t, x)[1]
    m = (e_tgt - e_src).abs().mean(1, keepdim=True).view(maps, b, 1, *z0.shape[2:]).mean(0)
    bound = m.flatten(1).mean(1).view(b, 1, 1, 1) * ratio
    return ((m.clamp_min(0).minimum(bound) / bound.clamp_min(1e-12)) > 0.5).to(z0.dtype)


def masked_ddim(den: Denoiser, traj, cond: Cond, sched, mask: torch.Tensor,
                progress: bool = True) -> torch.Tensor:
    """DiffEdit's masked DDIM: sample from the trajectory's top latent under `cond`; after every
    step keep the inverted latent of the same level outside the mask, x ← m·x + (1 − m)·z*_{t_prev}.
    (DiffEdit's code blends with the latent one level noisier; here both sit at t_prev, and the last
    step keeps z0 outside the mask.)"""
    level = dict(zip(traj.timesteps, traj.latents))
    return ddim(den, traj.latents[-1], cond, sched, traj.num_steps, traj.strength,
                progress=progress, after=lambda x, t, t_prev: mask * x + (1 - mask) * level[t_prev],
                walk=traj.sampling_pairs, desc="masked edit")
