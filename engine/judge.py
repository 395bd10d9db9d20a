"""Read an image of the world back from its pixels: the background colour, and each object's colour,
shape, place and size, with no learned model.

    r = judge.read(image)            # (H, W, 3) in [0, 1], any resolution
    judge.check(r, scene, phrase)    # which of the attributes a caption named were drawn

The background is the world colour whose two-tone segment (a background is drawn in its colour and a
darker or lighter tone of it) lies nearest the pixels of a band inside the image's border. Object
pixels are those nearer to an object colour than to that segment; each 4-connected region of one
colour is an object, and its shape is the world shape whose mask, fitted to the region's centroid and
area and rotated over its symmetry period, overlaps the region best (intersection over union).

`read(image, striped=True)` reads striped objects: each 4-connected region of object pixels, whatever
their colours, is one object, whose colour is the region's most frequent one and whose stripes are the
second, where that covers at least STRIPE_SHARE of the region. Two objects that touch then read as one.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import world

READ_RES = 64
MIN_AREA = 0.004      # of the image: smaller regions are noise, not objects (a small ring covers 0.038)
STRIPE_SHARE = 0.2    # of a region, for its second colour to be stripes (world stripes cover half)
# area of each shape at size r, in units of r² (world.shape_sd's geometry)
AREA = {"circle": math.pi, "ring": math.pi * (1 - 0.4**2), "square": 1.8**2,
        "triangle": 3 * math.sqrt(3) / 4 * 1.15**2, "star": 5 * 1.1 * 0.45 * math.sin(math.pi / 5)}
# rotations that give the same shape (0: every rotation)
PERIOD = {"circle": 0.0, "ring": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3, "star": 2 * math.pi / 5}


@dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float       # the size of the fitted shape, as world.SIZES
    iou: float
    stripes: str | None = None


@dataclass(frozen=True)
class Reading:
    bg_colour: str
    objects: tuple   # Found, largest first
    striped: bool = False   # read with read(..., striped=True)


def _rgb(name: str) -> np.ndarray:
    return np.array(world.BG_COLOURS[name], np.float64) / 255


def _segment_distance(px: np.ndarray, colour: str) -> np.ndarray:
    """Distance of each pixel (…, 3) to the segment between a background colour's two tones."""
    base, other = world.bg_tones(colour)
    d = other - base
    t = np.clip(((px - base) @ d) / (d @ d), 0, 1)
    return np.linalg.norm(px - (base + t[..., None] * d), axis=-1)


def _resize(img: np.ndarray) -> np.ndarray:
    h = img.shape[0]
    if h == READ_RES:
        return img
    if h % READ_RES == 0:
        k = h // READ_RES
        return img.reshape(READ_RES, k, READ_RES, k, 3).mean((1, 3))
    from PIL import Image

    u8 = Image.fromarray((img * 255).round().astype(np.uint8))
    return np.asarray(u8.resize((READ_RES, READ_RES), Image.BOX), np.float64) / 255


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, as (N, 2) arrays of (row, column)."""
    seen = np.zeros_like(mask)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, region = [start], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(region))
    return out


def _fit(region: np.ndarray, n: int) -> tuple[str, float, float, float, float]:
    """The world shape that best covers a region: (shape, cx, cy, r, iou)."""
    mask = np.zeros((n, n), bool)
    mask[region[:, 0], region[:, 1]] = True
    cy, cx = (region.mean(0) + 0.5) / n
    u, v = world.grid(n)
    best = ("circle", cx, cy, 0.0, -1.0)
    for shape, k in AREA.items():
        r = math.sqrt(len(region) / n**2 / k)
        for angle in np.linspace(0, PERIOD[shape], 12, endpoint=False) if PERIOD[shape] else [0.0]:
            for scale in (0.92, 1.0, 1.08):
                m = world.shape_sd(shape, cx, cy, r * scale, angle, u, v) < 0
                iou = (m & mask).sum() / (m | mask).sum()
                if iou > best[4]:
                    best = (shape, cx, cy, r * scale, iou)
    return best


def read(image: np.ndarray, striped: bool = False) -> Reading:
    """Read an (H, W, 3) image in [0, 1] (square, any resolution); with striped, objects of two colours."""
    px = _resize(np.clip(np.asarray(image, np.float64), 0, 1))
    n = px.shape[0]
    band = np.zeros((n, n), bool)
    band[2:-2, 2:-2] = True    # the outer 2 pixels are left out: a border artefact must not decide
    band[6:-6, 6:-6] = False
    # the 75th percentile: objects may cover up to a quarter of the band; both tones must lie near the segment
    bg = min(world.BG_COLOURS, key=lambda c: np.percentile(_segment_distance(px[band], c), 75))
    names = [c for c in world.COLOURS if c != bg]
    d_bg = _segment_distance(px, bg)
    d = np.stack([np.linalg.norm(px - _rgb(c), axis=-1) for c in names])
    label = d.argmin(0)
    is_obj = d.min(0) < d_bg
    regions = _components(is_obj) if striped else [
        region for k in range(len(names)) for region in _components(is_obj & (label == k))]
    found = []
    for region in regions:
        if len(region) < MIN_AREA * n * n:
            continue
        counts = np.bincount(label[region[:, 0], region[:, 1]], minlength=len(names))
        first, second = np.argsort(-counts, kind="stable")[:2]
        stripes = names[second] if counts[second] >= STRIPE_SHARE * len(region) else None
        found.append((len(region), Found(names[first], *_fit(region, n), stripes)))
    return Reading(bg, tuple(f for _, f in sorted(found, key=lambda x: -x[0])), striped)


def place(f: Found) -> str:
    """The world position nearest a found object's centre."""
    return min(world.POSITIONS, key=lambda p: math.dist(world.POSITIONS[p], (f.cx, f.cy)))


def check(r: Reading, s: world.Scene, named: world.Phrase | None = None) -> dict:
    """For each object of the scene, whether the attributes the caption named were drawn; with no
    phrase, the caption is the template, which names everything. Keys: colour, shape, size, position
    (lists, one entry per object, None where not named) and bg_colour (None where not named); for a
    striped reading also stripes (the object's two colours as body and stripes, in either order, or
    no stripes on a plain object), which no caption names. There an object's colour is drawn if it
    is the body's or the stripes' colour.

    Each found object stands for at most one of the scene's: of every one-to-one assignment of found
    objects to the scene's, the one with the most named attributes drawn counts."""
    n = len(s.objects)
    sizes = named.sizes if named else (True,) * n
    positions = named.positions if named else (True,) * n
    mid = sum(world.SIZES.values()) / 2

    def hits(o, size, pos, f):
        if f is None or o.colour not in ((f.colour, f.stripes) if r.striped else (f.colour,)):
            h = {"colour": False, "shape": False, "size": False if size else None,
                 "position": False if pos else None}
        else:
            h = {"colour": True, "shape": f.shape == o.shape,
                 "size": (f.r > mid) == (world.SIZES[o.size] > mid) if size else None,
                 "position": place(f) == o.position if pos else None}
        if r.striped:
            h["stripes"] = f is not None and ({f.colour, f.stripes} == {o.colour, o.stripes} if o.stripes
                                              else f.stripes is None)
        return h

    pool = list(r.objects) + [None] * n
    best = None
    for chosen in itertools.permutations(range(len(pool)), n):
        h = [hits(o, size, pos, pool[k]) for o, size, pos, k in zip(s.objects, sizes, positions, chosen)]
        score = sum(v is True for x in h for v in x.values())
        if best is None or score > best[0]:
            best = (score, h)
    keys = ("colour", "shape", "size", "position") + (("stripes",) if r.striped else ())
    out = {k: [x[k] for x in best[1]] for k in keys}
    out["bg_colour"] = r.bg_colour == s.bg_colour if (named is None or named.bg_colour) else None
    return out


def named(checked: dict) -> dict:
    """check()'s result without what the caption did not name: each attribute's hits as a list."""
    return {attr: [v for v in (x if isinstance(x, list) else [x]) if v is not None] for attr, x in checked.items()}


def border(image: np.ndarray) -> float:
    """Mean absolute difference between each pixel of the outer 2-pixel frame and the pixel 2 further in,
    over the four sides (on a plain background: 0 for a true render whose objects stay off the frame)."""
    px = np.asarray(image, np.float64)
    sides = [px[:2] - px[2:4], px[-2:] - px[-4:-2], px[:, :2] - px[:, 2:4], px[:, -2:] - px[:, -4:-2]]
    return float(np.mean([np.abs(d).mean() for d in sides]))
