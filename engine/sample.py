"""Samplers: pure functions of (denoiser, x, cond, schedule)."""
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import schedule
from .denoiser import Cond, Denoiser
from .rng import randn_tensor

# x ← hook(x, t, t_next) around a step from t down to t_next
Hook = Callable[[torch.Tensor, int, int], torch.Tensor]


def ddim(denoiser: Denoiser, x: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig,
         steps: int, strength: float = 1.0, eta: float = 0.0, generator=None,
         progress: bool = True, *, before: Hook | None = None, after: Hook | None = None,
         walk: list[tuple[int, int]] | None = None, desc: str = "denoise") -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12; eta > 0 adds the σ_t z term of eq. 16).

    walk: the (t, t_next) moves; default the `steps`-step grid truncated by `strength`. A move up
    (t_next > t) re-noises x to t_next (RePaint's jump back). before / after: hooks on x around
    every step down (DiffEdit's masked DDIM, blended diffusion's background)."""
    walk = schedule.step_pairs(sched, steps, strength) if walk is None else walk
    for t, t_next in tqdm(walk, desc=desc, disable=not progress, leave=False):
        if t_next > t:
            x = schedule.renoise(sched, x, t, t_next,
                                 randn_tensor(x.shape, generator, x.device, x.dtype))
            continue
        if before is not None:
            x = before(x, t, t_next)
        out = denoiser(x, t, cond)
        noise = randn_tensor(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        x, _ = schedule.ddim_step(sched, out, t, t_next, x, eta, noise)
        if after is not None:
            x = after(x, t, t_next)
    return x
