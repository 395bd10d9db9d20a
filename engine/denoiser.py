"""The one thing samplers call: UNet + classifier-free guidance + conditioning as a function of t.

Guided batches have one layout everywhere: [uncond; cond] along the batch, the unconditional half
first (`guided_texts`, `guided_batch`, `repeat_batch`), combined by `cfg`."""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .profile import stage
from .sdxl import TextTime

# t -> text embeddings: (2B, L, D) = [uncond; cond] when guided, (B, L, D) otherwise
Cond = Callable[[int], torch.Tensor]


def guided_texts(prompts: list[str], negative: list[str] | None = None) -> list[str]:
    """The texts of a guided batch: [negative (default ""); prompts]."""
    return (negative or [""] * len(prompts)) + prompts


def guided_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Embeddings of a guided batch from its two halves."""
    return torch.cat([uncond, cond])


def repeat_batch(emb: torch.Tensor, n: int, guided: bool) -> torch.Tensor:
    """The batch repeated n times, each half on its own: row j·B + i is sample i of copy j."""
    return torch.cat([half.repeat(n, *(1,) * (half.ndim - 1))
                      for half in emb.chunk(2 if guided else 1)])


def mapped(cond: "Cond", fn: Callable[[torch.Tensor], torch.Tensor]) -> "Cond":
    """`cond` with fn applied to each distinct embedding it gives: once per embedding, not once per
    step."""
    last = [None, None]  # the embedding cond(t) gave last, and fn of it

    def f(t):
        emb = cond(t)
        if emb is not last[0]:
            last[:] = [emb, fn(emb)]
        return last[1]
    return f


def repeat_cond(cond: "Cond", n: int, guided: bool) -> "Cond":
    """`cond` for n copies of its batch (encoded once, repeated as `repeat_batch`)."""
    return cond if n == 1 else mapped(cond, lambda emb: repeat_batch(emb, n, guided))


def zero_uncond(emb: torch.Tensor) -> torch.Tensor:
    """A guided batch's embeddings with the unconditional half zeroed (SDXL's
    force_zeros_for_empty_prompt)."""
    uncond, cond = emb.chunk(2)
    return guided_batch(torch.zeros_like(uncond), cond)


def cfg(out_u: torch.Tensor, out_c: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + w · (out_c − out_u)."""
    return out_u + w * (out_c - out_u)


def constant(emb: torch.Tensor) -> Cond:
    """A prompt that does not change with t."""
    return lambda t: emb


def per_step(table: dict[int, torch.Tensor]) -> Cond:
    """A different embedding at each grid timestep (null-text inversion's per-step unconditional
    embedding)."""
    def cond(t):
        if int(t) not in table:
            raise KeyError(f"no embedding for timestep {int(t)}: "
                           "sample on the grid the embeddings were made on")
        return table[int(t)]
    return cond


@dataclass
class Denoiser:
    """ε̂ / v̂ (x, t) with CFG in one batched UNet call."""
    unet: torch.nn.Module
    guidance: float = 1.0
    # channels appended to the latent (x4 upscaler: the noisy low-res image)
    concat: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None  # x4 upscaler: the noise level of `concat`
    text_time: TextTime | None = None  # SDXL: the pooled embedding and micro-conditioning

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def __call__(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        n = 2 if self.guided else 1
        xin = x.repeat(n, 1, 1, 1)
        if self.concat is not None:
            xin = torch.cat([xin, self.concat.repeat(n, 1, 1, 1).to(x.dtype)], dim=1)
        labels = None if self.class_labels is None else self.class_labels.repeat(n)
        emb, added = cond(t), {}
        if self.text_time is not None:
            emb, added = self.text_time.inputs(emb, xin, self.guided)
        with stage("unet step"):
            out = self.unet(xin, t, emb, labels, copies=n, **added)
        return cfg(*out.chunk(2), self.guidance) if self.guided else out
