"""Masks, crops and tiles of the multi-stage edit (Ackermann & Li 2022): resizing, MSBD's binary
masks and crop box, the stages' sides, and tiles composited with sigmoid alpha ramps (MSBD
`upscale_in_parts`)."""
import math
import warnings

import torch
import torch.nn.functional as F

from .tiles import starts


def resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of (B, C, H, W) to `size` (side or (h, w)); a no-op at the same size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"),
                         align_corners=False)


def binary_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The mask at `size` as MSBD makes it: antialiased bilinear resize, then any value > 0 is 1 (a
    slight dilation)."""
    return (resize(mask.float(), size) > 0).to(mask.dtype)


def progressive(mask: torch.Tensor, n: int) -> list[torch.Tensor]:
    """BLD's progressive mask shrinking: dilations by kernels 3 + 2i, largest first, then the mask
    itself."""
    return [F.max_pool2d(mask, 3 + 2 * i, 1, 1 + i) for i in reversed(range(n))] + [mask]


def prepare_mask(mask, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) in {0, 1} from a PIL image / array / tensor: resized (nearest) to the image when
    only its scale differs, thresholded at 0.5 when it has grey values, both with a warning; other
    sizes are refused."""
    import numpy as np
    from PIL import Image

    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255
    m = (mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))).float()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask: need one single-channel mask (H, W), got shape {tuple(m.shape)}")
    m = m[None, None]
    if not torch.isfinite(m).all():
        raise ValueError("mask has NaN/inf values: need values in [0, 1] (white = edit)")
    if m.max() > 1:
        m = m / 255
    (h, w), (mh, mw) = size, m.shape[-2:]
    if (mh, mw) != (h, w):
        check_mask_shape(size, (mh, mw))
        warnings.warn(f"mask is {mw}×{mh}, the image {w}×{h}: resized it (nearest)", stacklevel=3)
        m = F.interpolate(m, size=(h, w), mode="nearest")
    grey = ((m > 0) & (m < 1)).sum().item()
    if grey:
        warnings.warn(f"mask has {grey} grey pixels: thresholded at 0.5", stacklevel=3)
    return (m >= 0.5).float()


def check_mask_shape(size: tuple[int, int], mask_size: tuple[int, int], name: str = "mask"):
    """A mask (h, w) of the image's (h, w) aspect, as it is resized to the image."""
    (h, w), (mh, mw) = size, mask_size
    if mh * w != mw * h:
        raise ValueError(f"{name} is {mw}×{mh} but the image is {w}×{h}: draw the mask at the "
                         "image's size")


def check_square(h: int, w: int, margin: float | None, name: str = "image"):
    """Without a margin the whole image is edited, so it must be square."""
    if margin is None and h != w:
        raise ValueError(f"{name} is {w}×{h}: without --margin (margin=None) the whole image is "
                         "edited and must be square; give a margin (e.g. 1.2) to edit a square "
                         "crop around the mask")


def crop_box(mask: torch.Tensor, margin: float | None, least: int,
             align: int = 16) -> tuple[int, int, int]:
    """(y, x, side) of the square that is edited: MSBD's crop of margin × the mask's bounding box
    (rounded up to `align`, at least `least`, at most the image), centred on the mask's centre of
    mass unless that would cut the mask; with margin None, the whole (square) image."""
    h, w = mask.shape[-2:]
    check_square(h, w, margin)
    if margin is None:
        return 0, 0, h
    ys, xs = torch.nonzero(mask[0, 0], as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    side = max(math.ceil(max(y1 - y0, x1 - x0) * margin / align) * align, least)
    side = min(side, min(h, w) // align * align)
    if side < least:
        raise ValueError(f"image is {w}×{h}: need at least {least}×{least} pixels "
                         "(the base model's size)")

    def place(lo, hi, com, n):
        s = round(com - side / 2)
        # the centre of mass crop would cut the mask: centre on its box instead
        if s > lo or s + side < hi:
            s = round((lo + hi - side) / 2)
        return min(max(s, 0), n - side)

    return (place(y0, y1, ys.float().mean().item(), h),
            place(x0, x1, xs.float().mean().item(), w), side)


def stage_sides(side: int, base: int, ratio: int = 4) -> list[int]:
    """Every stage's side: the base model's, × `ratio` while below `side`, then `side` itself."""
    sides = [base]
    while sides[-1] * ratio < side:
        sides.append(sides[-1] * ratio)
    return sides + [side] if side > sides[-1] else sides


def tile_boxes(h: int, w: int, tile: int, overlap: int,
               align: int = 16) -> list[tuple[int, int, int, int]]:
    """(y, x, th, tw) tiles of at most tile × tile covering h × w in raster order, neighbours
    sharing at least `overlap` pixels, corners on multiples of `align`."""
    if tile % align or h % align or w % align:
        raise ValueError(f"tiles: tile {tile} and image {h}×{w} must be multiples of {align}")
    a = lambda n: [s * align  # noqa: E731
                   for s in starts(n // align, tile // align, -(-overlap // align))]
    return [(y, x, min(tile, h), min(tile, w)) for y in a(h) for x in a(w)]


def alpha(th: int, tw: int, ramp: int, left: bool, top: bool) -> torch.Tensor:
    """(1, 1, th, tw) tile opacity: 1, rising as sigmoid(linspace(−5, 5, ramp)) over the first
    `ramp` pixels of the left / top edge when that edge overlaps an earlier tile (later tiles are
    composited over earlier ones)."""
    rise = torch.sigmoid(torch.linspace(-5, 5, ramp)) if ramp > 0 else torch.ones(0)
    a = []
    for n, on in ((th, top), (tw, left)):
        v = torch.ones(n)
        if on and ramp:
            v[:ramp] = rise[:n]
        a.append(v)
    return (a[0][:, None] * a[1][None, :])[None, None]


def composite(canvas: torch.Tensor, tiles, ramp: int) -> torch.Tensor:
    """Alpha-composite ((y, x, th, tw), image) tiles over the canvas in the order given (raster
    order)."""
    out = canvas.clone()
    for (y, x, th, tw), im in tiles:
        a = alpha(th, tw, ramp, left=x > 0, top=y > 0).to(out)
        region = out[:, :, y:y + th, x:x + tw]
        out[:, :, y:y + th, x:x + tw] = a * im + (1 - a) * region
    return out
