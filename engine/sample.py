"""Samplers: pure functions of (denoiser, x, cond, schedule)."""
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import schedule
from .denoiser import Cond, Denoiser
from .rng import randn_tensor

def check_args(steps, guidance, eta=0.0):
    """One-line errors for a sampler's arguments, before any work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: need a positive whole number of denoising steps, "
                         "e.g. 50")
    for name, v, hint in (("guidance", guidance, "7.5 is typical; ≤ 1 disables CFG"),
                          ("eta", eta, "0 = deterministic DDIM")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r}: need a finite number ≥ 0 ({hint})")


def check_fraction(name: str, v, hint: str = "") -> float:
    """A strength-like number in (0, 1], or a one-line error naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{name}={v!r}: need a number in (0, 1]{hint}")
    return v


# x ← hook(x, t, t_next) around a step from t down to t_next
Hook = Callable[[torch.Tensor, int, int], torch.Tensor]


def ddim(denoiser: Denoiser, x: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig,
         steps: int, strength: float = 1.0, eta: float = 0.0, generator=None,
         progress: bool = True, *, before: Hook | None = None, after: Hook | None = None,
         walk: list[tuple[int, int]] | None = None, noise_dtype: torch.dtype | None = None,
         desc: str = "denoise") -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12; eta > 0 adds the σ_t z term of eq. 16).

    walk: the (t, t_next) moves; default the `steps`-step grid truncated by `strength`. A move up
    (t_next > t) re-noises x to t_next (RePaint's jump back). before / after: hooks on x around
    every step down (DiffEdit's masked DDIM, blended diffusion's background). noise_dtype: the
    dtype noise is drawn in (default x's, as diffusers' DDIMScheduler)."""
    walk = schedule.step_pairs(sched, steps, strength) if walk is None else walk

    def draw():
        return randn_tensor(x.shape, generator, x.device, noise_dtype or x.dtype).to(x.dtype)

    for t, t_next in tqdm(walk, desc=desc, disable=not progress, leave=False):
        if t_next > t:
            x = schedule.renoise(sched, x, t, t_next, draw())
            continue
        if before is not None:
            x = before(x, t, t_next)
        out = denoiser(x, t, cond)
        noise = draw() if eta > 0 else None
        x, _ = schedule.ddim_step(sched, out, t, t_next, x, eta, noise)
        if after is not None:
            x = after(x, t, t_next)
    return x
