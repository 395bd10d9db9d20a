"""DDIM inversion (Song et al. 2021, eq. 12 run from x0 towards noise) and null-text inversion
(Mokady et al. 2023).

The inversion walks the sampling grid backwards (`schedule.inversion_timesteps`), so the sampling
step from timesteps[k+1] down to timesteps[k] is the exact mirror of inverse step k: given the same
eps it lands on latents[k] again. Where the model is evaluated on the way up is a choice the
references disagree on:

- "destination": ε(x_k, t_{k+1}), null-text inversion's `ddim_loop` and diffusers'
  DDIMInverseScheduler;
- "source": ε(x_k, t_k), Direct Inversion's loop (the clean latent is evaluated at t = 0).
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import schedule
from .denoiser import Cond, Denoiser, cfg, constant, guided_batch, per_step
from .images import open_tensors, save_tensors
from .sample import ddim

CONVENTIONS = ("destination", "source")
NULL_TEXT_METHODS = ("reference", "fast", "iterinv")


@dataclass
class Trajectory:
    """latents[k] sits at timesteps[k] (ascending; -1 is the clean latent at final alpha); noises[k]
    is the eps of inverse step k (latents[k] → latents[k+1]); uncond[i] the null-text embedding of
    sampling step i. The grid is the one `schedule.step_pairs(sched, num_steps, strength)` samples
    on."""
    timesteps: list[int]
    latents: list[torch.Tensor]
    noises: list[torch.Tensor]
    convention: str
    num_steps: int
    strength: float = 1.0
    uncond: list[torch.Tensor] | None = None
    guidance: float | None = None  # the CFG scale the null-text embeddings were optimised for

    @property
    def steps(self) -> int:
        return len(self.noises)

    @property
    def sampling_pairs(self) -> list[tuple[int, int]]:
        """[(t, t_prev)] of the sampling steps that mirror this inversion, in sampling order."""
        return list(zip(reversed(self.timesteps[1:]), reversed(self.timesteps[:-1])))

    def noise_into(self, t: int) -> torch.Tensor:
        """The eps of the inverse step that arrived at t: what the sampling step leaving t
        mirrors."""
        return self.noises[self.timesteps.index(int(t), 1) - 1]

    def before(self, t: int) -> tuple[int, torch.Tensor]:
        """(timestep, latent) the inverse step that arrived at t started from: where the sampling
        step leaving t lands."""
        k = self.timesteps.index(int(t), 1) - 1
        return self.timesteps[k], self.latents[k]

    def expand(self, batch: int) -> "Trajectory":
        """The same trajectory for `batch` samples (views of a batch-1 trajectory; itself when
        already that size)."""
        b = self.latents[0].shape[0]
        if b == batch:
            return self
        if b != 1:
            raise ValueError(f"a trajectory of {b} images cannot serve {batch} prompts; "
                             f"give one image or {b} prompts")
        grow = lambda ts: None if ts is None else [x.expand(batch, *x.shape[1:])  # noqa: E731
                                                   for x in ts]
        return replace(self, latents=grow(self.latents), noises=grow(self.noises),
                       uncond=grow(self.uncond))

    def save(self, path, metadata: dict | None = None) -> Path:
        """One .safetensors file (written whole or not at all); metadata values are stored as
        JSON."""
        tensors = {"latents": torch.stack(self.latents), "noises": torch.stack(self.noises),
                   "timesteps": torch.tensor(self.timesteps, dtype=torch.int64)}
        if self.uncond is not None:
            tensors["uncond"] = torch.stack(self.uncond)
        meta = {"convention": self.convention, "num_steps": str(self.num_steps),
                "strength": repr(self.strength), "guidance": json.dumps(self.guidance),
                **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
        return save_tensors(tensors, path, meta)

    @classmethod
    def load(cls, path) -> "Trajectory":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such trajectory file "
                                    "(write one with `python -m engine invert`)")
        with open_tensors(path) as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            if (not {"latents", "noises", "timesteps"} <= keys
                    or not {"convention", "num_steps", "strength"} <= set(meta)):
                raise ValueError(f"{path}: not an inversion trajectory "
                                 "(needs latents, noises, timesteps)")
            get = f.get_tensor
            uncond = list(get("uncond").unbind()) if "uncond" in keys else None
            return cls(get("timesteps").tolist(), list(get("latents").unbind()),
                       list(get("noises").unbind()), meta["convention"], int(meta["num_steps"]),
                       float(meta["strength"]), uncond, json.loads(meta.get("guidance", "null")))


def invert(denoiser: Denoiser, z0: torch.Tensor, cond: Cond, sched: schedule.SchedulerConfig,
           steps: int, strength: float = 1.0, convention: str = "destination",
           progress: bool = True) -> Trajectory:
    """Deterministic DDIM inversion of z0 on the mirror of the `steps`-step sampling grid (truncated
    by strength)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: use one of {CONVENTIONS}")
    pairs = schedule.inversion_timesteps(sched, steps, strength)
    if not pairs:
        raise ValueError(f"strength={strength} with steps={steps} leaves no inversion step; "
                         "raise either")
    x, latents, noises = z0, [z0], []
    for t, t_next in tqdm(pairs, desc="invert", disable=not progress, leave=False):
        t_model = t_next if convention == "destination" else max(t, 0)
        _, eps = schedule.predict_x0_eps(sched, denoiser(x, t_model, cond), t_model, x)
        x = schedule.ddim_eps_step(sched, eps, t, t_next, x)
        latents.append(x)
        noises.append(eps)
    return Trajectory([pairs[0][0]] + [t for _, t in pairs], latents, noises, convention, steps,
                      strength)


def check_null_text(method: str | None, guidance: float):
    """A null-text method (None: none) and the guidance it optimises for, or a one-line error;
    call it before long work."""
    if method is not None and method not in NULL_TEXT_METHODS:
        raise ValueError(f"null_text={method!r}: use None, 'reference', 'fast' or 'iterinv'")
    if method is not None and not guidance > 1:
        raise ValueError(f"null-text inversion needs guidance > 1 (got {guidance}); "
                         "7.5 is the reference")


def null_text(denoiser: Denoiser, traj: Trajectory, cond: torch.Tensor, uncond: torch.Tensor,
              sched: schedule.SchedulerConfig, method: str = "reference", inner_steps: int = 10,
              lr: float = 1e-2, early_stop: float = 1e-5, progress: bool = True) -> Trajectory:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1): per sampling step i, optimise the
    unconditional embedding so the guided DDIM step from the current latent lands on the inverted
    latent z*_{t-1}.

    reference: P2P's NullInversion: Adam, lr·(1 − i/2N) (= 1e-2·(1 − i/100) at 50 steps),
    ≤ inner_steps iterations, stop once the loss < early_stop + 1e-3·i/N (= 1e-5 + i·2e-5 at 50
    steps).
    iterinv: IterInv's stage I (its IFInvPipeline): the same Adam with lr 1e-3·(1 − i/2N), 51
    iterations every step with no early stop, on the summed (not mean) squared error; lr,
    inner_steps and early_stop are not used. (Its dynamic thresholding is DeepFloyd IF's, a pixel
    model's, and is not done here.)
    fast: ours. The guided step is affine in ε_u, so the loss is a least-squares problem in the UNet
    output: each iteration takes the gradient direction and the step length that minimises the loss
    along it to first order (a finite-difference directional derivative: one extra forward), at most
    2 iterations per step, same stopping rule; it starts from the conditional embedding instead of
    "" (negative-prompt inversion, Miyake et al. 2023, where ε_cfg = ε_c), which already lands near
    the target whenever the inversion is accurate.
    Returns the trajectory with the N embeddings (sampling order) and the guidance; sample with
    `null_text_cond`."""
    if method not in NULL_TEXT_METHODS:
        raise ValueError(f"method={method!r}: use one of {NULL_TEXT_METHODS}")
    if not denoiser.guided:
        raise ValueError(f"null-text inversion needs guidance > 1 (got {denoiser.guidance}); "
                         "7.5 is the reference")
    n = traj.steps
    plain = replace(denoiser, guidance=1.0)
    w = denoiser.guidance
    x, u, out = traj.latents[-1], uncond.detach(), []
    bar = tqdm(traj.sampling_pairs, desc=f"null-text ({method})", disable=not progress, leave=False)
    for i, (t, t_prev) in enumerate(bar):
        target = traj.latents[n - 1 - i]
        with torch.no_grad():
            out_c = plain(x, t, constant(cond))

        def step(emb):  # the guided DDIM step from x with unconditional embedding emb
            out_u = plain(x, t, constant(emb))
            return schedule.ddim_step(sched, cfg(out_u, out_c, w), t, t_prev, x)[0]

        stop = early_stop + 1e-3 * i / n
        if method == "reference":
            u = _adam(lambda emb: step(emb) - target, u, lr * (1 - i / (2 * n)), inner_steps, stop)
        elif method == "iterinv":
            u = _adam(lambda emb: step(emb) - target, u, 1e-3 * (1 - i / (2 * n)), 51, 0.0, "sum")
        else:
            u, x = _line_search(step, target, cond if i == 0 else u, min(inner_steps, 2), stop)
        if method != "fast":
            with torch.no_grad():
                x = step(u)
        out.append(u)
    return replace(traj, uncond=out, guidance=float(w))


def _adam(residual, u, lr, iters, stop, reduce="mean"):
    u = u.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(iters):
        with torch.enable_grad():
            loss = getattr(residual(u).square(), reduce)()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop:
            break
    return u.detach()


def _line_search(step, target, u, iters, stop):
    """Returns the embedding and step(embedding). The check runs without autograd: most steps pass
    it at once."""
    with torch.no_grad():
        y = step(u)
    for _ in range(iters):
        if (y - target).square().mean().item() < stop:
            break
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            r = step(u) - target
            (g,) = torch.autograd.grad(r.square().mean(), u)
        p = -g / g.norm().clamp_min(1e-30)
        h = 1e-3 * max(u.detach().norm().item(), 1.0)
        with torch.no_grad():
            r = r.detach()
            jp = (step(u + h * p) - target - r) / h
            u = u + (-(r * jp).sum() / (jp * jp).sum().clamp_min(1e-30)) * p
            y = step(u)
    return u.detach(), y


def invert_image(model, x: torch.Tensor, prompts: list[str], steps: int,
                 convention: str = "destination", null_text_method: str | None = None,
                 guidance: float = 7.5, strength: float = 1.0, progress: bool = True) -> Trajectory:
    """DDIM-invert images x (B, 3, H, W) in [-1, 1] on an engine.model.Model: the VAE mean latent
    under one prompt per image, without CFG; with null_text_method, also the null-text embeddings
    for CFG at `guidance`."""
    check_null_text(null_text_method, guidance)
    z0 = model.encode(x)
    cond = model.encode_prompt(prompts)
    traj = invert(model.denoiser(), z0, constant(cond), model.scheduler, steps, strength,
                  convention, progress)
    if not torch.isfinite(traj.latents[-1]).all():
        raise FloatingPointError("the inversion produced NaN/inf values; "
                                 "try float32 (--dtype float32)")
    if null_text_method is not None:
        uncond = model.encode_prompt([""] * len(prompts), like=cond)
        traj = null_text(model.denoiser(guidance), traj, cond, uncond, model.scheduler,
                         null_text_method, progress=progress)
    return traj


def reconstruct(model, traj: Trajectory, prompts: list[str], steps: int | None = None,
                progress: bool = True) -> torch.Tensor:
    """The latents sampled back from traj's x_T under its prompts: on its own grid with its
    null-text embeddings and CFG when it has them, else without CFG; `steps` samples on another
    grid."""
    cond = model.encode_prompt(prompts)
    if traj.uncond is not None and steps in (None, traj.num_steps):
        den, c = model.denoiser(traj.guidance), null_text_cond(traj, cond)
    else:
        den, c = model.denoiser(), constant(cond)
    return ddim(den, traj.latents[-1], c, model.scheduler, steps or traj.num_steps, traj.strength,
                progress=progress, desc="reconstruct")


def null_text_cond(traj: Trajectory, cond: torch.Tensor) -> Cond:
    """Conditioning for guided sampling with the per-step null-text embeddings of `traj`."""
    if traj.uncond is None:
        raise ValueError("this trajectory has no null-text embeddings: "
                         "invert with null_text='reference' or 'fast'")
    pairs = zip(traj.sampling_pairs, traj.uncond)
    return per_step({t: guided_batch(u, cond) for (t, _), u in pairs})
