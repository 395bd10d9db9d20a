"""Samplers in the σ parameterisation (Karras et al. 2022, as k-diffusion writes them): x = x0 + σ·ε,
and the UNet sees x / √(σ² + 1) at the timestep whose ᾱ gives σ = √((1 − ᾱ) / ᾱ). Each sampler is a
pure function of (denoiser, x, cond, grid, generator) that walks a `Grid`; the grids are those
diffusers' schedulers walk, so that the same seed gives diffusers' image.

| name | sampler | diffusers scheduler |
|---|---|---|
| euler | Euler (Karras et al. 2022, Alg. 2 without churn) | EulerDiscreteScheduler |
| euler_a | Euler ancestral | EulerAncestralDiscreteScheduler |
| heun | Heun (Karras et al. 2022, Alg. 1 without churn) | HeunDiscreteScheduler |
| dpmpp_2m | DPM-Solver++(2M) (Lu et al. 2022) | DPMSolverMultistepScheduler, dpmsolver++ |
| dpmpp_2m_sde | DPM-Solver++(2M) SDE | DPMSolverMultistepScheduler, sde-dpmsolver++ |
| unipc | UniPC, order 2, bh2 (Zhao et al. 2023) | UniPCMultistepScheduler |
| lcm | latent consistency (Luo et al. 2023), for LCM-distilled models | LCMScheduler |
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import schedule
from .denoiser import Cond, Denoiser
from .rng import randn_tensor

SCHEDULES = ("default", "karras", "exponential")


@dataclass(frozen=True)
class Grid:
    """The σ's a sampler steps through (descending, ending at 0), the UNet timestep at each but the
    last, and the scale of the starting noise (x_T = noise · init_sigma)."""
    sigmas: torch.Tensor      # (n + 1,) float32
    timesteps: torch.Tensor   # (n,)
    init_sigma: float


def train_sigmas(cfg: schedule.SchedulerConfig) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep t, in float32 as diffusers computes
    them (a timestep read back from a σ can then round to the same whole step)."""
    abar = schedule.alphas_cumprod(cfg).float().clone()
    if cfg.rescale_betas_zero_snr:  # ᾱ = 0 at the top would make σ infinite: nearly 0, as diffusers
        abar[-1] = 2 ** -24
    return (((1 - abar) / abar) ** 0.5).numpy()


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ, interpolating log σ (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n σ's from sigma_max to sigma_min, evenly spaced in σ^(1/ρ)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n σ's from sigma_max to sigma_min, evenly spaced in log σ."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _respaced(kind: str, sigmas: np.ndarray, n: int, log_sigmas: np.ndarray):
    """A karras / exponential grid over the span of `sigmas` (descending), with its timesteps."""
    fn = karras if kind == "karras" else exponential
    out = fn(float(sigmas[-1]), float(sigmas[0]), n)
    return out, sigma_to_t(out, log_sigmas)


def check_schedule(kind: str) -> str:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}: use one of {', '.join(SCHEDULES)}")
    return kind


def _check_steps(cfg: schedule.SchedulerConfig, steps: int, most: int | None = None):
    most = most or cfg.num_train_timesteps - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise ValueError(f"steps={steps!r}: this sampler takes 1 to {most} steps")


def euler_grid(cfg: schedule.SchedulerConfig, steps: int, kind: str = "default") -> Grid:
    """EulerDiscreteScheduler.set_timesteps: the spacing's (fractional) timesteps, σ interpolated
    linearly in t, or a karras / exponential grid over that span."""
    _check_steps(cfg, steps)
    T, all_sigmas = cfg.num_train_timesteps, train_sigmas(cfg)
    spacing = cfg.timestep_spacing or "linspace"
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
    else:  # trailing
        ts = np.arange(T, 0, -T / steps).round().astype(np.float32) - 1
    sigmas = np.interp(ts, np.arange(T), all_sigmas)
    if kind != "default":
        sigmas, ts = _respaced(kind, sigmas, steps, np.log(all_sigmas))
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    top = sig.max().item()
    init = top if spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
    return Grid(sig, torch.from_numpy(np.asarray(ts, dtype=np.float32)), init)


def dpm_grid(cfg: schedule.SchedulerConfig, steps: int, kind: str = "default") -> Grid:
    """DPMSolverMultistepScheduler.set_timesteps: whole timesteps spaced over n + 1 points with
    the last dropped, σ at them, or a karras / exponential grid over the whole training span; the
    sampler starts from unit-variance noise in ᾱ's parameterisation (σ_T' = √(σ_max² + 1))."""
    _check_steps(cfg, steps, cfg.num_train_timesteps // 2)  # closer grids repeat a timestep
    T, all_sigmas = cfg.num_train_timesteps, train_sigmas(cfg)
    spacing = cfg.timestep_spacing or "linspace"
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64)
        ts = ts + cfg.steps_offset
    else:  # trailing
        ts = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    if kind == "default":
        sigmas = np.interp(ts, np.arange(T), all_sigmas)
    else:
        sigmas, ts = _respaced(kind, all_sigmas[::-1], steps, np.log(all_sigmas))
        # diffusers rounds karras timesteps and truncates exponential ones
        ts = (ts.round() if kind == "karras" else ts).astype(np.int64)
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return Grid(sig, torch.from_numpy(ts), (sig[0].item() ** 2 + 1) ** 0.5)


def lcm_grid(cfg: schedule.SchedulerConfig, steps: int,
             kind: str = "default") -> Grid:  # kind: always "default" (engine.ksample.pick)
    """LCMScheduler.set_timesteps: `steps` of the distillation's original_inference_steps whole
    timesteps (every T / original_steps − 1), evenly picked from the top; unit-variance starting
    noise."""
    original_steps = cfg.original_inference_steps
    _check_steps(cfg, steps, original_steps)
    T = cfg.num_train_timesteps
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    sig = torch.from_numpy(np.concatenate([train_sigmas(cfg)[ts], [0.0]]).astype(np.float32))
    return Grid(sig, torch.from_numpy(ts.copy()), (sig[0].item() ** 2 + 1) ** 0.5)


def from_strength(grid: Grid, steps: int, strength: float) -> Grid:
    """The grid's tail that img2img runs: diffusers' get_timesteps drops the first
    steps − ⌊steps · strength⌋ steps."""
    start = steps - min(int(steps * strength), steps)
    if start >= steps:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; "
                         "raise either")
    return Grid(grid.sigmas[start:], grid.timesteps[start:], grid.init_sigma)


def denoised(denoiser: Denoiser, sched: schedule.SchedulerConfig, x: torch.Tensor, sigma: float,
             t, cond: Cond, dtype: torch.dtype) -> torch.Tensor:
    """The denoiser's x0 estimate at σ, in float32: the UNet (with CFG, in `dtype`) on
    x / √(σ² + 1) at timestep t, its ε / v / sample read as x0 (diffusers'
    pred_original_sample)."""
    s = (sigma ** 2 + 1) ** 0.5
    out = denoiser((x / s).to(dtype), t, cond).float()
    if sched.prediction_type == "epsilon":
        return x.float() - sigma * out
    if sched.prediction_type == "v_prediction":
        return out * (-sigma / s) + x.float() / s ** 2
    return out


Sampler = Callable[..., torch.Tensor]


def _steps(grid: Grid, progress: bool, desc: str):
    sig = grid.sigmas.tolist()
    return tqdm(list(enumerate(zip(sig[:-1], sig[1:], grid.timesteps.tolist()))), desc=desc,
                disable=not progress, leave=False)


def euler(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
          desc="denoise") -> torch.Tensor:
    """x ← x + (σ' − σ)·(x − x0)/σ. (Every sampler here calls the UNet in x's dtype and steps in
    float32, returning float32.)"""
    dtype, x = x.dtype, x.float()
    for _, (s, s_next, t) in _steps(grid, progress, desc):
        x0 = denoised(denoiser, sched, x, s, t, cond, dtype)
        x = x + (x - x0) / s * (s_next - s)
    return x


def euler_ancestral(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
                    desc="denoise") -> torch.Tensor:
    """An Euler step down to σ_down, then fresh noise of σ_up, with σ_down² + σ_up² = σ'²."""
    dtype, x = x.dtype, x.float()
    for _, (s, s_next, t) in _steps(grid, progress, desc):
        x0 = denoised(denoiser, sched, x, s, t, cond, dtype)
        up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
        down = (s_next ** 2 - up ** 2) ** 0.5
        x = x + (x - x0) / s * (down - s)
        x = x + randn_tensor(x.shape, generator, x.device, torch.float32) * up
    return x


def heun(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
         desc="denoise") -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without churn): an Euler step, then the step again
    with the mean of the slopes at both ends; the last step, to σ = 0, is Euler's, and so is the
    first of a zero-terminal-SNR schedule, whose σ_max ≈ 4096 stands for ∞ (there the mean of the
    two slopes overshoots by about σ_max / σ_1; diffusers' Heun has no such schedules). x0 is
    clipped when the scheduler config asks (diffusers' HeunDiscreteScheduler does)."""
    dtype, x, ts = x.dtype, x.float(), grid.timesteps.tolist()

    def slope(x, s, t):
        x0 = denoised(denoiser, sched, x, s, t, cond, dtype)
        if sched.clip_sample:
            x0 = x0.clamp(-sched.clip_sample_range, sched.clip_sample_range)
        return (x - x0) / s

    for i, (s, s_next, t) in _steps(grid, progress, desc):
        d = slope(x, s, t)
        if s_next == 0 or i == 0 and sched.rescale_betas_zero_snr:
            x = x + d * (s_next - s)
            continue
        d_next = slope(x + d * (s_next - s), s_next, ts[i + 1])
        x = x + (d + d_next) / 2 * (s_next - s)
    return x


def _dpmpp_2m(denoiser, x, cond, sched, grid: Grid, generator, progress, desc, sde: bool):
    """DPM-Solver++(2M), or its SDE variant, in λ = −log σ: the first and the last step (to σ = 0)
    first order, the others second order with the previous x0 (midpoint form)."""
    dtype, x = x.dtype, x.float()
    prev = None
    n = len(grid.timesteps)
    for i, (s, s_next, t) in _steps(grid, progress, desc):
        x0 = denoised(denoiser, sched, x, s, t, cond, dtype)
        noise = randn_tensor(x.shape, generator, x.device, torch.float32) if sde else None
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            d = x0
            if prev is not None and i < n - 1:
                h_prev = math.log(grid.sigmas[i - 1].item() / s)
                d = x0 + (x0 - prev) * (0.5 * h / h_prev)
            if sde:
                x = (s_next / s * math.exp(-h)) * x + (1 - math.exp(-2 * h)) * d \
                    + s_next * math.sqrt(1 - math.exp(-2 * h)) * noise
            else:
                x = (s_next / s) * x - (math.exp(-h) - 1) * d
        prev = x0
    return x


def lcm(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
        desc="denoise") -> torch.Tensor:
    """Latent consistency models (Luo et al. 2023), multistep: the consistency function's x0 (the
    model's x0 and the input mixed by the boundary scalings c_skip, c_out at t · timestep_scaling)
    noised afresh to the next step's σ; the last step returns it."""
    dtype, x = x.dtype, x.float()
    for _, (s, s_next, t) in _steps(grid, progress, desc):
        x0 = denoised(denoiser, sched, x, s, t, cond, dtype)
        if sched.clip_sample:
            x0 = x0.clamp(-sched.clip_sample_range, sched.clip_sample_range)
        scaled = t * sched.timestep_scaling
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
        x = c_out * x0 + c_skip * x / (s ** 2 + 1) ** 0.5
        if s_next > 0:
            x = x + s_next * randn_tensor(x.shape, generator, x.device, torch.float32)
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int) -> list[float]:
    """UniPC's ρ for the B(h) = e^{-h} − 1 variant (bh2), predicting x0: the solution of
    R ρ = b with R_ij = r_j^i and b_i = i! h φ_{i+1}(h) / B(h) (Zhao et al. 2023, eq. 8);
    1/2 when order is 1."""
    if order == 1:
        return [0.5]
    hh = -h
    b_h, phi = math.expm1(hh), math.expm1(hh) / hh - 1
    fact, b = 1, []
    for i in range(1, order + 1):
        b.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / hh - 1 / fact
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, order + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
          desc="denoise") -> torch.Tensor:
    """UniPC (Zhao et al. 2023), order 2, bh2, predicting x0, as diffusers' UniPCMultistepScheduler
    defaults: at each σ the new x0 first corrects the step that led there (UniC), then a
    multistep predictor (UniP) steps on; the first step and the last (to σ = 0) are order 1."""
    dtype, x = x.dtype, x.float()
    sig, n = grid.sigmas.tolist(), len(grid.timesteps)
    x0s, last, order = [], None, 1
    lam = lambda i: -math.log(sig[i])  # noqa: E731 - λ = log α − log σ_VP = −log σ
    for i, (s, s_next, t) in _steps(grid, progress, desc):
        m = denoised(denoiser, sched, x, s, t, cond, dtype)
        if last is not None:  # UniC: redo the step from σ_{i−1} with the x0 at σ_i
            h = lam(i) - lam(i - 1)
            rks = ([(lam(i - 2) - lam(i - 1)) / h] if order == 2 else []) + [1.0]
            rho = _unipc_coefficients(h, rks, order)
            m0 = x0s[-1]
            corr = sum(r * (x0s[-2] - m0) / rk for r, rk in zip(rho[:-1], rks[:-1]))
            b_h = math.expm1(-h)
            x = (s / sig[i - 1]) * last - b_h * m0 - b_h * (corr + rho[-1] * (m - m0))
        x0s = (x0s + [m])[-2:]
        order = min(2, n - i, len(x0s))
        last = x
        if s_next == 0:
            x = m
            continue
        h = math.log(s / s_next)
        b_h = math.expm1(-h)
        x_next = (s_next / s) * x - b_h * m
        if order == 2:  # UniP with ρ = 1/2
            rk = (lam(i - 1) - lam(i)) / h
            x_next = x_next - b_h * 0.5 * (x0s[-2] - m) / rk
        x = x_next
    return x


def dpmpp_2m(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
             desc="denoise") -> torch.Tensor:
    return _dpmpp_2m(denoiser, x, cond, sched, grid, generator, progress, desc, sde=False)


def dpmpp_2m_sde(denoiser, x, cond, sched, grid: Grid, generator=None, progress=True,
                 desc="denoise") -> torch.Tensor:
    return _dpmpp_2m(denoiser, x, cond, sched, grid, generator, progress, desc, sde=True)


# name → (sampler, the grid of the diffusers scheduler it matches)
SAMPLERS: dict[str, tuple[Sampler, Callable[..., Grid]]] = {
    "euler": (euler, euler_grid), "euler_a": (euler_ancestral, euler_grid), "heun": (heun, euler_grid),
    "dpmpp_2m": (dpmpp_2m, dpm_grid), "dpmpp_2m_sde": (dpmpp_2m_sde, dpm_grid),
    "unipc": (unipc, dpm_grid), "lcm": (lcm, lcm_grid),
}


def pick(sampler: str, schedule: str = "default", eta: float = 0.0):
    """None for DDIM, else (sampler, grid(cfg, steps) on the `schedule` spacing) of `SAMPLERS`;
    one-line errors for what does not go together."""
    check_schedule(schedule)
    if sampler == "ddim":
        if schedule != "default":
            raise ValueError(f"schedule={schedule!r}: DDIM walks its own timestep grid; pick "
                             "another sampler for a karras or exponential schedule")
        return None
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: use one of ddim, {', '.join(SAMPLERS)}")
    if eta:
        raise ValueError(f"eta={eta!r} is DDIM's; sampler {sampler!r} takes none (leave eta 0)")
    if sampler == "lcm" and schedule != "default":
        raise ValueError(f"schedule={schedule!r}: the LCM sampler walks its distillation "
                         "timesteps; use schedule default")
    fn, grid = SAMPLERS[sampler]
    return fn, lambda cfg, steps: grid(cfg, steps, schedule)
