"""Run a denoiser tile by tile on a latent larger than the model was trained on, without seams.

Every step, each overlapping tile is denoised (tiles batched together) and the outputs are averaged
where tiles overlap, weighted by a ramp that falls towards each tile's edge (MultiDiffusion, Bar-Tal
et al. 2023, eq. 5). The sampler sees one full-size prediction per step, so any sampler works
unchanged.
"""
from dataclasses import dataclass, replace

import torch

from .denoiser import Cond, Denoiser, repeat_batch

BATCH = 8  # tiles per UNet call


def check(tile, overlap, multiple: int = 1):
    """A tile side in low-res pixels (None: no tiles) and the overlap of neighbouring tiles, or a
    one-line error; call it before long work."""
    if tile is None:
        return
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < multiple or tile % multiple:
        need = f"a multiple of {multiple}" if multiple > 1 else "a positive whole number of"
        raise ValueError(f"tile={tile!r}: need {need} pixels of the low-res image, e.g. 64")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap!r}: need a whole number of pixels in [0, {tile}), "
                         "less than the tile")


def starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, size) with at least `overlap` shared pixels between neighbours."""
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def ramp(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) blending weights: 1 inside, falling linearly to 1/(overlap+1) at the edges."""
    i = torch.arange(tile, dtype=torch.float32)
    w = torch.minimum(torch.minimum(i + 1, tile - i), torch.tensor(overlap + 1.0)) / (overlap + 1)
    return w[:, None] * w[None, :]


@dataclass
class Tiled:
    """A Denoiser applied on tile × tile latent windows overlapping by `overlap`, `batch` tiles per
    UNet call."""
    denoiser: Denoiser
    tile: int
    overlap: int
    batch: int = BATCH

    def __post_init__(self):
        check(self.tile, self.overlap)

    @property
    def guided(self) -> bool:
        return self.denoiser.guided

    def __call__(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        b, _, h, w = x.shape
        th, tw = min(self.tile, h), min(self.tile, w)
        boxes = [(y, x0) for y in starts(h, th, self.overlap) for x0 in starts(w, tw, self.overlap)]
        weight = ramp(self.tile, self.overlap)[:th, :tw].to(x)
        emb = cond(t)
        out = torch.zeros_like(x)
        total = torch.zeros_like(x[:1, :1])
        den = self.denoiser
        for i in range(0, len(boxes), self.batch):
            chunk = boxes[i:i + self.batch]
            k = len(chunk)
            crop = lambda z: torch.cat([z[:, :, y:y + th, x0:x0 + tw]  # noqa: E731
                                        for y, x0 in chunk])
            # tile-major batch: row j*b + i is tile j of image i
            e = repeat_batch(emb, k, self.guided)
            tiled = replace(den, concat=None if den.concat is None else crop(den.concat),
                            class_labels=None if den.class_labels is None else
                            den.class_labels.repeat(k))
            pred = tiled(crop(x), t, lambda _: e)
            for j, (y, x0) in enumerate(chunk):
                out[:, :, y:y + th, x0:x0 + tw] += pred[j * b:(j + 1) * b] * weight
                total[:, :, y:y + th, x0:x0 + tw] += weight
        return out / total
