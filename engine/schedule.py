"""Noise schedules, DDIM timestep grids, DDIM forward / inverse steps and q_sample, as pure
functions.

Numerics follow diffusers DDIMScheduler (float32 alphas_cumprod, float32 0-d step scalars, same
operation order), so a step here is bit-identical to `DDIMScheduler.step` for float32 / float16
inputs.

Timestep convention: a forward DDIM step goes t -> t_prev = t - T // num_steps (diffusers); any
t_prev < 0 means "final alpha" (1.0 if set_alpha_to_one else alphas_cumprod[0]) and `step_pairs`
writes it as -1. The inversion walks the very same pairs backwards (`inversion_timesteps`): it
starts where the forward walk ends -- t = -1, the clean latent at final alpha, for the usual grids;
t >= 0 when the lowest grid t exceeds T // num_steps (trailing with 6 steps: ..., 166 -> 0;
leading + steps_offset 1 with 501 steps: ..., 1 -> 0) -- and after num_steps steps sits exactly on
the top forward timestep, so N inverse steps then N forward steps is an exact mirror. For epsilon
prediction these are the pairs and values of diffusers 0.42 DDIMInverseScheduler (older versions did
one step fewer); for v_prediction that scheduler converts v with the source alpha, here it is
converted at the timestep the model was evaluated at.
"""
from dataclasses import dataclass, fields
from functools import lru_cache
import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# fields of DDPM / PNDM / Euler / LMS / Heun / DPM-Solver configs that DDIM does not use
IGNORED_KEYS = frozenset({
    "variance_type", "skip_prk_steps", "max_noise_level", "interpolation_type", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type",
    "final_sigmas_type", "algorithm_type", "solver_order", "solver_type", "lower_order_final",
    "euler_at_final", "use_lu_lambdas", "lambda_min_clipped", "flow_shift", "use_flow_sigmas",
    "use_dynamic_shifting", "time_shift_type",
    # UniPC fields: engine.ksample runs diffusers' defaults for them
    "predict_x0", "solver_p", "disable_corrector",
})


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler_config.json, reduced to what DDIM and q_sample need
    (defaults = DDIMScheduler's)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    # None: absent from the file; each scheduler then uses its own default (DDIM "leading", the
    # σ-space samplers of engine.ksample "linspace"), as diffusers does
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    # None: absent from the file; DDIM then clips (its default), Heun and LCM do not (theirs)
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False
    # LCM (engine.ksample.lcm): the distillation's step count, and the boundary scalings' t factor
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self):
        for name, allowed in (("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", (*TIMESTEP_SPACINGS, None))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"scheduler config: {name}={getattr(self, name)!r} is not one of "
                                 f"{allowed}")
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"scheduler config: trained_betas has {len(self.trained_betas)} "
                             f"entries, num_train_timesteps={self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, d):
        """Build from a parsed scheduler_config.json; missing keys take DDIMScheduler's defaults."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d
                   if k not in known and k not in IGNORED_KEYS and not k.startswith("_")]
        if unknown:
            raise ValueError(f"scheduler config: unknown keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _cosine_betas(n, max_beta=0.999):
    """Glide cosine schedule: beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def _rescale_zero_terminal_snr(b):
    """Lin et al. 2023 Algorithm 1: shift/scale sqrt(abar) so abar[T-1] = 0 and abar[0] is kept."""
    s = torch.cumprod(1.0 - b, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    abar = s**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


@lru_cache(maxsize=32)
def _schedule(cfg):
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        b = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b, torch.cumprod(1.0 - b, dim=0)


def betas(cfg):
    """beta_t, float32, exactly as diffusers builds them (linspace in float32 for
    (scaled_)linear)."""
    return _schedule(cfg)[0].clone()


def alphas_cumprod(cfg):
    """abar_t = prod_{s<=t} (1 - beta_s), float32."""
    return _schedule(cfg)[1].clone()


def final_alpha(cfg):
    """abar used when t < 0: 1.0 if set_alpha_to_one else abar_0."""
    return torch.tensor(1.0) if cfg.set_alpha_to_one else _schedule(cfg)[1][0].clone()


def abar(cfg, t, dtype=torch.float32):
    """abar at timestep t (final_alpha when t < 0), a 0-d tensor."""
    t = int(t)
    a = _schedule(cfg)[1][t] if t >= 0 else final_alpha(cfg)
    # float32 0-d scalars like diffusers; float64 inputs get float64 scalars so
    # sqrt(a)^2 + sqrt(1-a)^2 == 1
    return a.double() if dtype == torch.float64 else a


def timesteps(cfg, num_steps, strength=1.0):
    """Descending DDIM grid of DDIMScheduler.set_timesteps, truncated to its tail for img2img
    `strength`."""
    T = cfg.num_train_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"steps={num_steps!r}: need a whole number in [1, {T}], the model's "
                         "training timesteps")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in [0, 1]")
    spacing = cfg.timestep_spacing or "leading"
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = ((np.arange(0, num_steps) * (T // num_steps)).round()[::-1].copy().astype(np.int64)
              + cfg.steps_offset)
    else:
        # diffusers' float arange sometimes yields num_steps + 1 entries ending in t = -1
        # (e.g. 61 of 1000): keep the first num_steps, which are otherwise identical
        ts = np.round(np.arange(T, 0, -T / num_steps)[:num_steps]).astype(np.int64) - 1
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"timestep grid {ts.min()}..{ts.max()} leaves [0, {T}); "
                         "lower steps_offset or num_steps")
    # StableDiffusionImg2ImgPipeline.get_timesteps
    t_start = max(num_steps - min(int(num_steps * strength), num_steps), 0)
    return torch.from_numpy(ts[t_start:].copy())


def strength_at(cfg, num_steps, a) -> float:
    """The strength whose grid (`timesteps(cfg, num_steps, strength)`) starts at the noise level
    nearest ᾱ = a: a start set on another schedule, carried over by its noise level."""
    ab = alphas_cumprod(cfg)[timesteps(cfg, num_steps)]  # from the noisiest step down
    kept = num_steps - int((ab - float(a)).abs().argmin())
    # int(num_steps · strength) == kept, whatever the rounding
    return min(1.0, (kept + 0.5) / num_steps)


def prev_timestep(cfg, t, num_steps):
    """t_prev = t - T // num_steps (diffusers DDIM; may be < 0, meaning final alpha)."""
    return int(t) - cfg.num_train_timesteps // num_steps


def step_pairs(cfg, num_steps, strength=1.0):
    """Forward DDIM pairs [(t, t_prev)] as diffusers walks them, with t_prev < 0 written as -1."""
    return [(int(t), max(prev_timestep(cfg, t, num_steps), -1))
            for t in timesteps(cfg, num_steps, strength)]


def inversion_timesteps(cfg, num_steps, strength=1.0):
    """Inverse DDIM pairs [(t_from, t_to)]: step_pairs reversed and swapped, from the last t_prev up
    to the top t."""
    return [(tp, t) for t, tp in reversed(step_pairs(cfg, num_steps, strength))]


def _batched_abar(cfg, x, t):
    ac = _schedule(cfg)[1].to(device=x.device, dtype=x.dtype)
    a = ac[torch.as_tensor(t, device=x.device)]
    return a.flatten().reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(cfg, x0, t, noise):
    """Forward process (DDPM eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int or
    per-batch tensor."""
    a = _batched_abar(cfg, x0, t)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def get_velocity(cfg, x0, t, noise):
    """v target (Salimans & Ho 2022): v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    a = _batched_abar(cfg, x0, t)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def training_target(cfg, x0, t, noise):
    """What the model is trained to output for x_t = q_sample(x0, t, noise): ε, v or x0 by
    prediction type."""
    if cfg.prediction_type == "epsilon":
        return noise
    if cfg.prediction_type == "v_prediction":
        return get_velocity(cfg, x0, t, noise)
    return x0


def predict_x0_eps(cfg, model_output, t, x):
    """(x0_hat, eps_hat) from the model output at (x, t) for epsilon / v_prediction / sample
    (DDIM eq. 12)."""
    a = abar(cfg, t, x.dtype)
    b = 1 - a
    if cfg.prediction_type == "epsilon":
        return (x - b**0.5 * model_output) / a**0.5, model_output
    if cfg.prediction_type == "sample":
        return model_output, (x - a**0.5 * model_output) / b**0.5
    return a**0.5 * x - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * x


def _threshold(cfg, x0):
    """Dynamic thresholding (Imagen): s = clamp(quantile(|x0|, ratio), 1, max);
    x0 = clamp(x0, -s, s) / s."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1)
    s = torch.clamp(s, min=1, max=cfg.sample_max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def ddim_step(cfg, model_output, t, t_prev, x, eta=0.0, noise=None):
    """DDIM eq. 12/16: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z;
    returns (x_prev, x0)."""
    a, a_prev = abar(cfg, t, x.dtype), abar(cfg, t_prev, x.dtype)
    x0, eps = predict_x0_eps(cfg, model_output, t, x)
    if cfg.thresholding:
        x0 = _threshold(cfg, x0)
    elif cfg.clip_sample is not False:  # DDIMScheduler's default is to clip
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # eps is not re-derived from the clipped x0 (diffusers use_clipped_model_output=False)
    share = eta**2 * (1 - a / a_prev) / (1 - a)  # sigma² / (1 − ᾱ_prev), exactly 1 at ᾱ_t = 0 and eta = 1
    sigma = ((1 - a_prev) * share) ** 0.5
    x_prev = a_prev**0.5 * x0 + ((1 - a_prev) * (1 - share)) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs `noise` (the caller draws it)")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddim_inverse_step(cfg, model_output, t, t_next, x):
    """Deterministic DDIM inversion (eta=0, no clipping):
    x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps.

    model_output is the model evaluated at (x, t_next); it is turned into eps at t_next, and x0 is
    re-derived from x at its own level t, so this is the exact algebraic inverse of
    ddim_step(t_next -> t) whenever both see the same eps.
    """
    _, eps = predict_x0_eps(cfg, model_output, t_next, x)
    return ddim_eps_step(cfg, eps, t, t_next, x)


def ddim_eps_step(cfg, eps, t, t_to, x):
    """Move x from level t to level t_to along a given eps, either way (DDIM eq. 12 with sigma = 0,
    no clipping)."""
    a, a_to = abar(cfg, t, x.dtype), abar(cfg, t_to, x.dtype)
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def renoise(cfg, x, t, t_to, noise):
    """Forward-diffuse x from level t up to t_to > t (DDPM eq. 4 between two levels; RePaint's jump
    back up): x_to = sqrt(a_to / a) x + sqrt(1 - a_to / a) noise; t = -1 is the final alpha."""
    r = abar(cfg, t_to, x.dtype) / abar(cfg, t, x.dtype)
    return r**0.5 * x + (1 - r) ** 0.5 * noise


def x0_to_output(cfg, x0, t, x):
    """The model output that predict_x0_eps(cfg, ., t, x) reads as `x0` (inverse of its x0 half)."""
    if cfg.prediction_type == "sample":
        return x0
    a = abar(cfg, t, x.dtype)
    b = 1 - a
    if a == 0 and cfg.prediction_type == "epsilon":
        raise ValueError(f"x0_to_output: at t={int(t)} abar is 0 (zero terminal SNR) and an epsilon "
                         "output cannot carry an x0 there; use a v_prediction model")
    eps = (x - a**0.5 * x0) / b**0.5
    return eps if cfg.prediction_type == "epsilon" else a**0.5 * eps - b**0.5 * x0


def eps_to_output(cfg, eps, t, x):
    """The model output that predict_x0_eps(cfg, ., t, x) reads as `eps` (inverse of its eps
    half)."""
    a = abar(cfg, t, x.dtype)
    b = 1 - a
    if cfg.prediction_type == "epsilon":
        return eps
    if a == 0:
        raise ValueError(f"eps_to_output: at t={int(t)} abar is 0 (zero terminal SNR) and every "
                         f"{cfg.prediction_type} output reads as eps = x; keep the model's output there")
    if cfg.prediction_type == "sample":
        return (x - b**0.5 * eps) / a**0.5
    return (eps - b**0.5 * x) / a**0.5
