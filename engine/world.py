"""The procedural world the embedded model is trained and evaluated on.

A scene is 1–2 shapes on a background, described exactly by a `Scene` value, so it can be rendered
at any resolution, captioned, masked, and re-rendered with one attribute changed (the ground truth
of an edit). Rendering is analytic: every pixel samples signed distances at its centre and takes a
one-pixel-wide coverage ramp, so edges are anti-aliased the same way at 64², 256² and 1024².
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "cyan": (40, 200, 210), "blue": (40, 70, 220),
    "purple": (140, 50, 190), "pink": (245, 130, 190),
}
BG_COLOURS = {**COLOURS, "white": (240, 240, 240), "gray": (128, 128, 128), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.12, "large": 0.21}
POSITIONS = {"on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
             "at the bottom": (0.5, 0.72), "in the center": (0.5, 0.5)}
PAIRS = (("on the left", "on the right"), ("at the top", "at the bottom"))
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "textured")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0      # jitter of the centre, in image units
    dy: float = 0.0
    angle: float = 0.0   # radians (square, triangle, star)
    # a second colour in stripes across the shape: never in a caption (a concept to learn)
    stripes: str | None = None


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: str
    bg_colour: str
    bg_angle: float = 0.0   # stripes / gradient direction
    bg_seed: int = 0        # texture phases

    def caption(self) -> str:
        objs = " and ".join(f"a {o.size} {o.colour} {o.shape} {o.position}" for o in self.objects)
        return f"{objs}, on a {self.background} {self.bg_colour} background"

    def replace(self, index: int | None = None, **changes) -> "Scene":
        """The same scene with attributes changed: of object `index`, or of the background when
        index is None."""
        if index is None:
            return dataclasses.replace(self, **changes)
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)
        return dataclasses.replace(self, objects=tuple(objs))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 1 object (60%) or 2 at opposite positions, colours distinct from the
    background."""
    n = n_objects or (1 if rng.random() < 0.6 else 2)
    positions = ([str(rng.choice(list(POSITIONS)))] if n == 1
                 else list(PAIRS[rng.integers(len(PAIRS))]))
    if n == 2 and rng.random() < 0.5:
        positions.reverse()
    objs = []
    for pos in positions:
        objs.append(Obj(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                        size=str(rng.choice(list(SIZES))), position=pos,
                        dx=float(rng.uniform(-0.04, 0.04)), dy=float(rng.uniform(-0.04, 0.04)),
                        angle=float(rng.uniform(-0.3, 0.3))))
    used = {o.colour for o in objs}
    bg_colour = str(rng.choice([c for c in BG_COLOURS if c not in used]))
    return Scene(tuple(objs), str(rng.choice(BACKGROUNDS)), bg_colour,
                 float(rng.uniform(0, math.pi)), int(rng.integers(2**31)))


def scenes(seed: int, n: int) -> list[Scene]:
    """n scenes, deterministic by seed."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _grid(res: int):
    c = (np.arange(res, dtype=np.float64) + 0.5) / res
    return np.meshgrid(c, c, indexing="xy")  # u (x, right), v (y, down)


def _cover(sd: np.ndarray, res: int) -> np.ndarray:
    """Signed distance (image units, negative inside) → pixel coverage with a one-pixel ramp."""
    return np.clip(0.5 - sd * res, 0.0, 1.0)


def _polygon_sd(u, v, pts) -> np.ndarray:
    d = np.full(u.shape, np.inf)
    inside = np.zeros(u.shape, bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        ex, ey, wx, wy = bx - ax, by - ay, u - ax, v - ay
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        d = np.minimum(d, np.hypot(wx - ex * h, wy - ey * h))
        crosses = (ay > v) != (by > v)
        inside ^= crosses & (u < ax + (v - ay) * ex / np.where(ey == 0, 1e-12, ey))
    return np.where(inside, -d, d)


def _shape_sd(o: Obj, u, v) -> np.ndarray:
    cx, cy = POSITIONS[o.position]
    cx, cy, r = cx + o.dx, cy + o.dy, SIZES[o.size]
    if o.shape == "circle":
        return np.hypot(u - cx, v - cy) - r
    if o.shape == "ring":
        return np.abs(np.hypot(u - cx, v - cy) - 0.7 * r) - 0.3 * r
    if o.shape == "square":
        k, radii = 4, [0.9 * r * math.sqrt(2)] * 4
        start = math.pi / 4
    elif o.shape == "triangle":
        k, radii, start = 3, [1.15 * r] * 3, -math.pi / 2
    else:  # star
        k, radii, start = 10, [1.1 * r, 0.45 * r] * 5, -math.pi / 2
    a = start + o.angle + 2 * math.pi * np.arange(k) / k
    pts = np.stack([cx + np.array(radii) * np.cos(a), cy + np.array(radii) * np.sin(a)], 1)
    return _polygon_sd(u, v, pts)


def _background(s: Scene, u, v, res: int) -> np.ndarray:
    base = np.array(BG_COLOURS[s.bg_colour], np.float64) / 255
    # the second tone: darker, or lighter
    other = base * 0.6 if base.mean() > 0.5 else base * 0.6 + 0.4
    ca, sa = math.cos(s.bg_angle), math.sin(s.bg_angle)
    w = (u - 0.5) * ca + (v - 0.5) * sa
    if s.background == "plain":
        t = np.zeros_like(u)
    elif s.background == "gradient":
        t = np.clip(w / 1.42 + 0.5, 0, 1)
    elif s.background == "striped":
        t = _cover((np.abs((w * 6) % 1 - 0.5) - 0.25) / 6, res)
    elif s.background == "checkered":
        a = _cover((np.abs((u * 4) % 1 - 0.5) - 0.25) / 4, res)
        b = _cover((np.abs((v * 4) % 1 - 0.5) - 0.25) / 4, res)
        t = a + b - 2 * a * b
    else:  # textured: a few seeded low-frequency waves
        rng = np.random.default_rng(s.bg_seed)
        t = np.zeros_like(u)
        for _ in range(4):
            fx, fy = rng.uniform(-5, 5, 2)
            t += np.sin(2 * math.pi * (fx * u + fy * v) + rng.uniform(0, 2 * math.pi))
        t = np.clip(t / 8 + 0.5, 0, 1)
    return base * (1 - t[..., None]) + other * t[..., None]


def masks(s: Scene, res: int) -> np.ndarray:
    """(n_objects, res, res) float32 coverage of each object as drawn (later objects occlude earlier
    ones)."""
    u, v = _grid(res)
    cov = [_cover(_shape_sd(o, u, v), res) for o in s.objects]
    out = []
    for i, c in enumerate(cov):
        for later in cov[i + 1:]:
            c = c * (1 - later)
        out.append(c)
    return np.stack(out).astype(np.float32)


def render(s: Scene, res: int) -> np.ndarray:
    """(res, res, 3) float32 RGB in [0, 1]."""
    u, v = _grid(res)
    img = _background(s, u, v, res)
    for o in s.objects:
        a = _cover(_shape_sd(o, u, v), res)[..., None]
        img = img * (1 - a) + _fill(o, u, v, res) * a
    return img.astype(np.float32)


def _fill(o: Obj, u, v, res: int) -> np.ndarray:
    colour = np.array(COLOURS[o.colour], np.float64) / 255
    if o.stripes is None:
        return colour
    cx, cy = POSITIONS[o.position]
    period = SIZES[o.size] * 0.6
    w = ((u - cx - o.dx) * math.cos(o.angle) + (v - cy - o.dy) * math.sin(o.angle)) / period
    t = _cover((np.abs(w % 1 - 0.5) - 0.25) * period, res)[..., None]
    return colour * (1 - t) + np.array(COLOURS[o.stripes], np.float64) / 255 * t


def render_batch(ss: list[Scene], res: int) -> np.ndarray:
    """(N, 3, res, res) float32 in [-1, 1]: the tensor layout the models take."""
    return np.stack([render(s, res).transpose(2, 0, 1) for s in ss]) * 2 - 1
