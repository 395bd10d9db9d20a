"""SDXL's conditioning (Podell et al. 2023): the penultimate hidden states of its text encoders side
by side, the last encoder's projected pooled output, and the micro-conditioning ids (image size and
crop corner, or for the refiner the aesthetic score) — as diffusers' StableDiffusionXLPipeline
builds them.

Prompt embeddings stay one tensor everywhere (engine.denoiser): an SDXL embedding is (B, 77 + 1, D)
whose last row carries the pooled text embedding, zero-padded to D (`pack`). Null-text inversion,
Direct Inversion and candidate batches then move it with the hidden states; `TextTime.inputs` takes
it apart before each UNet call."""
from dataclasses import dataclass

import torch

AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5  # diffusers' refiner defaults


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states + (B, P) pooled embedding, P ≤ D → (B, L + 1, D)."""
    b, _, d = hidden.shape
    if pooled.shape[-1] > d:
        raise ValueError(f"pooled text embedding of width {pooled.shape[-1]} does not fit the "
                         f"{d}-wide hidden states")
    row = torch.zeros(b, 1, d, dtype=hidden.dtype, device=hidden.device)
    row[:, 0, :pooled.shape[-1]] = pooled
    return torch.cat([hidden, row], 1)


@dataclass
class TextTime:
    """How an SDXL UNet takes its added conditioning: the pooled width, whether its ids carry the
    aesthetic score (the refiner) or the target size (the base), and the image pixels per latent
    pixel that turn the latent's size into the image's."""
    pooled_dim: int
    aesthetic: bool
    downscale: int
    aesthetic_score: float = AESTHETIC
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC

    @classmethod
    def for_unet(cls, unet_config, pooled_dim: int, downscale: int) -> "TextTime":
        c = unet_config
        n, rest = divmod(c.projection_class_embeddings_input_dim - pooled_dim,
                         c.addition_time_embed_dim)
        if rest or n not in (5, 6):
            raise ValueError(f"the UNet embeds {c.projection_class_embeddings_input_dim} added "
                             f"features: not a {pooled_dim}-wide pooled text embedding plus 5 "
                             "(refiner) or 6 (base) micro-conditioning ids; check that the UNet "
                             "and text_encoder_2 belong to one model")
        return cls(pooled_dim, n == 5, downscale)

    def time_ids(self, height: int, width: int, negative: bool) -> list[float]:
        """diffusers' add_time_ids: original size (the image's), crop corner (0, 0), then the
        target size or the aesthetic score (lower for the unconditional half)."""
        if self.aesthetic:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            return [height, width, 0, 0, score]
        return [height, width, 0, 0, height, width]

    def inputs(self, emb: torch.Tensor, x: torch.Tensor, guided: bool) -> tuple[torch.Tensor, dict]:
        """(context, {text_embeds, time_ids}) of a UNet call on latents x whose batch is laid out
        as emb's ([uncond; cond] when guided)."""
        hidden, pooled = emb[:, :-1], emb[:, -1, :self.pooled_dim]
        h, w = (s * self.downscale for s in x.shape[-2:])
        half = x.shape[0] // 2 if guided else 0
        ids = torch.tensor([self.time_ids(h, w, i < half) for i in range(x.shape[0])],
                           dtype=torch.float32, device=x.device)
        return hidden, {"text_embeds": pooled, "time_ids": ids}
