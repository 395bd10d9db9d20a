"""The one thing samplers call: UNet + classifier-free guidance + conditioning as a function of t."""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .profile import stage

# t -> text embeddings: (2B, L, D) = [uncond; cond] when guided, (B, L, D) otherwise
Cond = Callable[[int], torch.Tensor]


def constant(emb: torch.Tensor) -> Cond:
    """A prompt that does not change with t."""
    return lambda t: emb


def per_step(table: dict[int, torch.Tensor]) -> Cond:
    """A different embedding at each grid timestep (null-text inversion's per-step unconditional embedding)."""
    def cond(t):
        if int(t) not in table:
            raise KeyError(f"no embedding for timestep {int(t)}: sample on the grid the embeddings were made on")
        return table[int(t)]
    return cond


@dataclass
class Denoiser:
    """ε̂ / v̂ (x, t) with CFG in one batched UNet call: out = out_u + w · (out_c − out_u) (Ho & Salimans 2022)."""
    unet: torch.nn.Module
    guidance: float = 1.0
    concat: torch.Tensor | None = None        # channels appended to the latent (x4 upscaler: the noisy low-res image)
    class_labels: torch.Tensor | None = None  # x4 upscaler: the noise level of `concat`

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def __call__(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        n = 2 if self.guided else 1
        xin = x.repeat(n, 1, 1, 1)
        if self.concat is not None:
            xin = torch.cat([xin, self.concat.repeat(n, 1, 1, 1).to(x.dtype)], dim=1)
        labels = None if self.class_labels is None else self.class_labels.repeat(n)
        with stage("unet step"):
            out = self.unet(xin, t, cond(t), labels)
        if not self.guided:
            return out
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance * (out_c - out_u)
