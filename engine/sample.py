"""Samplers: pure functions of (denoiser, x, cond, schedule)."""
import torch
from tqdm.auto import tqdm

from . import schedule
from .denoiser import Cond, Denoiser
from .rng import randn_tensor


def ddim(denoiser: Denoiser, x: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig, steps: int,
         strength: float = 1.0, eta: float = 0.0, generator=None, progress: bool = True) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12; eta > 0 adds the σ_t z term of eq. 16)."""
    for t, t_prev in tqdm(schedule.step_pairs(sched, steps, strength), desc="denoise", disable=not progress,
                          leave=False):
        out = denoiser(x, t, cond)
        noise = randn_tensor(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        x, _ = schedule.ddim_step(sched, out, t, t_prev, x, eta, noise)
    return x
