"""Direct Inversion (Elarabawy, Kamath, Denton 2022): invert the image with DDIM, then sample under
the edit prompt with CFG from the inverted noise while merging the inverted noise into every
prediction:

    ε ← (1 − λ)·ε_cfg + λ·ε_inv[N−1−i]        for the injected sampling steps i

Which inverted ε a sampling step takes (`pairing`):
- "mirror" (default): the ε of the inverse step that the sampling step mirrors
  (`Trajectory.noise_into`), so λ = 1 on every step walks the inversion back exactly;
- "authors": the ε the inversion evaluated at the sampling step's own timestep, as the authors' code
  pairs them (noises[N−1−i]). With their ("source") convention that is the ε of the inverse step
  leaving t, one grid step above the mirror's, and at x̃_T the ε of their last, identity inversion
  step (`top_noise`); λ = 1 then does not give the inversion back. With the "destination"
  convention the two pairings are the same;
- "x_T": x̃_T itself on every step, as the paper describes it ("repeated injection of the original
  encoded noise x̃_T") and as the authors' code does without `stochastic_injection_exp_method`.
λ = 0 is plain CFG sampling from the inverted noise in every case. The merge is done on ε; for v- or
x0-predicting models the merged ε is turned back into the model's output. At a timestep where
ᾱ_t = 0 (zero terminal SNR) every prediction's ε is x_t itself, so there the merge is done on x0
instead, with the x0 whose step lands on the inversion's latent.
"""
from dataclasses import dataclass

import torch

from . import schedule
from .denoiser import Cond, Denoiser
from .invert import Trajectory
from .sample import ddim

PAIRINGS = ("mirror", "authors", "x_T")


def injected_steps(n: int, inject_steps: int | None = None, every: int = 1) -> list[int]:
    """Sampling step indices that merge the inverted noise: the first `inject_steps` (all when None;
    0 = only the initial injection of x_T, the paper's t_stop = T), every `every`-th of them."""
    k = n if inject_steps is None else inject_steps
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"inject_steps={inject_steps!r}: need a whole number in [0, {n}] "
                         "(None = every step)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r}: need a whole number ≥ 1 (1 = every step)")
    return list(range(0, k, every))


def check_lambda(lam):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ValueError(f"lambda={lam!r}: need a number in [0, 1] "
                         "(0 = plain CFG, 1 = reconstruct the inversion)")


def check_pairing(pairing):
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r}: use 'mirror' (λ = 1 gives the inversion back), "
                         "'authors' (the inverted ε at the step's own timestep, as the authors' "
                         "code) or 'x_T' (the inverted noise x̃_T itself on every step, as the "
                         "paper)")


def needs_top_noise(traj: Trajectory, pairing: str) -> bool:
    """Whether `pairing` on traj needs the inversion's ε at x̃_T, which its steps did not
    evaluate."""
    return pairing == "authors" and traj.convention == "source"


def top_noise(denoiser: Denoiser, traj: Trajectory, cond: Cond, sched: schedule.SchedulerConfig
              ) -> torch.Tensor:
    """The ε at x̃_T under the inversion's (unguided) denoiser and prompt: what the authors' last,
    identity inversion step evaluates."""
    t, x = traj.timesteps[-1], traj.latents[-1]
    return schedule.predict_x0_eps(sched, denoiser(x, t, cond), t, x)[1]


@dataclass
class Injected:
    """A Denoiser whose prediction at the injected timesteps is merged with the inversion's
    noise (its landing x0 where ᾱ_t = 0)."""
    denoiser: Denoiser
    traj: Trajectory
    sched: schedule.SchedulerConfig
    lam: float
    timesteps: frozenset
    pairing: str = "mirror"
    top: torch.Tensor | None = None  # the ε at x̃_T, for the authors' pairing (top_noise)

    @property
    def guided(self) -> bool:
        return self.denoiser.guided

    def __call__(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        out = self.denoiser(x, t, cond)
        if int(t) not in self.timesteps:
            return out
        x0, eps = schedule.predict_x0_eps(self.sched, out, t, x)
        if schedule.abar(self.sched, t) == 0:  # zero terminal SNR: ε is x itself, so merge x0 instead
            if self.pairing == "x_T":  # x is x̃_T there: merging it into ε changes nothing
                return out
            merged = (1 - self.lam) * x0 + self.lam * landing_x0(self.sched, self.traj, t, x).to(x0)
            return schedule.x0_to_output(self.sched, merged, t, x)
        merged = (1 - self.lam) * eps + self.lam * self.inverted_noise(t).to(eps)
        return schedule.eps_to_output(self.sched, merged, t, x)

    def inverted_noise(self, t: int) -> torch.Tensor:
        """The inverted ε merged into the step leaving t."""
        if self.pairing == "x_T":
            return self.traj.latents[-1]
        if not needs_top_noise(self.traj, self.pairing):
            return self.traj.noise_into(t)
        k = self.traj.timesteps.index(int(t), 1)  # source convention: noises[k] was evaluated at t
        return self.traj.noises[k] if k < len(self.traj.noises) else self.top


def landing_x0(sched: schedule.SchedulerConfig, traj: Trajectory, t: int, x: torch.Tensor) -> torch.Tensor:
    """At a timestep where ᾱ_t = 0 (ε = x): the x0 whose DDIM step from x lands on the inversion's latent at
    the next sampling timestep."""
    t_prev, lands = traj.before(t)
    a_prev = schedule.abar(sched, t_prev, x.dtype)
    return (lands.to(x) - (1 - a_prev) ** 0.5 * x) / a_prev**0.5


def edit(denoiser: Denoiser, traj: Trajectory, cond: Cond, sched: schedule.SchedulerConfig,
         lam: float = 0.5, inject_steps: int | None = None, every: int = 1,
         progress: bool = True, pairing: str = "mirror", top: torch.Tensor | None = None
         ) -> torch.Tensor:
    """Direct Inversion sampling (paper §3.2, Fig. 4 [2]): DDIM from x̃_T = traj.latents[-1] on the
    inversion's grid, merging λ of the inverted noise on the injected steps. The authors' pairing
    on a source-convention trajectory needs `top` (top_noise). Returns the edited clean latent."""
    check_lambda(lam)
    check_pairing(pairing)
    if needs_top_noise(traj, pairing) and top is None:
        raise ValueError("pairing='authors' on a source-convention inversion needs "
                         "top=top_noise(...), the ε at x̃_T")
    pairs = traj.sampling_pairs
    steps = frozenset(pairs[i][0] for i in injected_steps(len(pairs), inject_steps, every))
    den = Injected(denoiser, traj, sched, float(lam), steps, pairing, top)
    return ddim(den, traj.latents[-1], cond, sched, traj.num_steps, traj.strength,
                progress=progress, desc="edit (Direct Inversion)")
