"""The procedural world the embedded model is trained and evaluated on.

A scene is 1–2 shapes on a background, described exactly by a `Scene` value, so it can be rendered
at any resolution, captioned (by a template, or in free phrasings as people write), masked, and
re-rendered with one attribute changed (the ground truth of an edit). Rendering is analytic: every pixel samples signed distances at its centre and takes a
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

    def caption(self, stripes: str | None = None) -> str:
        """The template caption; with a `stripes` word, a striped object is "… star with yellow
        <word> …"."""
        objs = " and ".join(f"a {o.size} {o.colour} {o.shape}{_striped(o, stripes)} {o.position}"
                            for o in self.objects)
        return f"{objs}, on a {self.background} {self.bg_colour} background"

    def replace(self, index: int | None = None, **changes) -> "Scene":
        """The same scene with attributes changed: of object `index`, or of the background when
        index is None."""
        if index is None:
            return dataclasses.replace(self, **changes)
        objs = list(self.objects)
        objs[index] = dataclasses.replace(objs[index], **changes)
        return dataclasses.replace(self, objects=tuple(objs))


# Free phrasing: the words people use for each attribute (the first is the template's word)
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
SHAPE_WORDS = {"circle": ("circle", "disc", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
               "star": ("star",), "ring": ("ring", "donut", "doughnut")}
COLOUR_WORDS = {"gray": ("gray", "grey"), "purple": ("purple", "violet")}
POSITION_WORDS = {
    "on the left": ("on the left", "at the left", "to the left", "on the left side", "on the left-hand side"),
    "on the right": ("on the right", "at the right", "to the right", "on the right side", "on the right-hand side"),
    "at the top": ("at the top", "on top", "at the top of the image", "near the top", "up top"),
    "at the bottom": ("at the bottom", "at the bottom of the image", "near the bottom", "along the bottom"),
    "in the center": ("in the center", "in the centre", "in the middle", "at the center", "centered")}
BACKGROUND_WORDS = {"plain": ("plain", "solid", "flat", "uniform"), "gradient": ("gradient", "shaded", "fading"),
                    "striped": ("striped", "stripy", "lined"), "checkered": ("checkered", "checkerboard", "chequered"),
                    "textured": ("textured", "wavy", "mottled")}
BACKGROUND_NOUNS = ("background", "background", "backdrop")


@dataclass(frozen=True)
class Phrase:
    """A caption and which of the scene's attributes it names (colour and shape are always named)."""
    text: str
    sizes: tuple          # per object: is its size named
    positions: tuple      # per object: is its position named
    bg_colour: bool
    background: bool      # the background's style


def _a(word: str) -> str:
    return ("an " if word[0] in "aeio" else "a ") + word


def _word(table: dict, key: str, rng: np.random.Generator) -> str:
    words = table.get(key, (key,))
    return words[int(rng.integers(1 << 30)) % len(words)]


def _striped(o: Obj, word: str | None) -> str:
    return f" with {o.stripes} {word}" if word and o.stripes else ""


def phrase(s: Scene, rng: np.random.Generator, stripes: str | None = None) -> Phrase:
    """The scene described as people write it: size, position and background may be left out, words and
    their order vary. The draws from rng do not depend on the scene's values, so the same generator state
    words a scene with one attribute changed the same way (a hard negative); only the background's style
    is left out more often when it is plain, and a plain style's word never follows the colour."""
    u = rng.random(16).tolist()  # every choice below reads one of these, or one word draw
    n = len(s.objects)
    sizes = tuple(x > 0.45 for x in rng.random(n).tolist())
    positions = (u[0] > 0.35,) * n if n == 2 else (u[0] > 0.4,)
    has_bg = u[4] > 0.12
    bg_first = has_bg and u[8] < 0.35
    objs = []
    for o, size, pos in zip(s.objects, sizes, positions):
        words = [_word(SIZE_WORDS, o.size, rng)] if size else []
        words += [_word(COLOUR_WORDS, o.colour, rng), _word(SHAPE_WORDS, o.shape, rng)]
        where = _word(POSITION_WORDS, o.position, rng)
        text = " ".join(words) + _striped(o, stripes)
        text = _a(text) if u[1] < 0.75 else ("one " if u[1] < 0.8 else "") + text
        if pos:
            text = f"{where}, {text}" if u[2] < 0.15 and not bg_first else f"{text} {where}"
        objs.append(text)
    objs = (" and " if u[3] < 0.7 or u[2] < 0.15 else ", ").join(objs)

    bg_colour = has_bg and u[5] > 0.1
    style = has_bg and (u[6] > (0.85 if s.background == "plain" else 0.45) or not bg_colour)
    colour, noun = _word(COLOUR_WORDS, s.bg_colour, rng), BACKGROUND_NOUNS[int(rng.integers(3))]
    adjectives = [_word(BACKGROUND_WORDS, s.background, rng)] * style + [colour] * bg_colour
    if u[7] < 0.3 and s.background != "plain":
        adjectives.reverse()
    bg = " ".join(adjectives + [noun])
    if not has_bg:
        text = objs
    elif u[8] < 0.2:
        text = f"{_a(bg) if u[9] < 0.5 else bg} with {objs}"
    elif u[8] < 0.35:
        text = f"{bg}, {objs}"
    elif bg_colour and not style and u[9] < 0.3:
        text = f"{objs}{',' * (u[10] < 0.3)} on {colour}"
    else:
        prep = ("on", "on", "against", "over")[int(u[11] * 4)]
        text = f"{objs}, {bg}" if u[10] < 0.2 else f"{objs}{',' * (u[10] < 0.35)} {prep} {_a(bg)}"
    if u[12] < 0.3:
        text = text[0].upper() + text[1:]
    if u[13] < 0.2:
        text += "."
    return Phrase(text, sizes, positions, bg_colour, style)


def phrasings(ss: list[Scene], seed: int, k: int, stripes: str | None = None) -> list[tuple[str, ...]]:
    """k captions per scene: the template, then k - 1 free phrasings, phrasing j of scene i drawn from
    phrasing_rng(seed, i, j); `stripes` as in Scene.caption."""
    return [(s.caption(stripes), *(phrase(s, phrasing_rng(seed, i, j), stripes).text for j in range(1, k)))
            for i, s in enumerate(ss)]


def phrasing_rng(seed: int, i: int, j: int) -> np.random.Generator:
    return np.random.default_rng([seed, i, j])


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


def striped(ss: list[Scene], seed: int, share: float) -> list[Scene]:
    """The same scenes with each object striped at rate `share`, in a colour that is neither its own nor
    the background's, drawn for scene i from default_rng([seed, i]). Captions do not change: no caption
    names stripes."""
    out = []
    for i, s in enumerate(ss):
        rng = np.random.default_rng([seed, i])
        for k, o in enumerate(s.objects):
            if rng.random() < share:
                other = [c for c in COLOURS if c not in (o.colour, s.bg_colour)]
                s = s.replace(k, stripes=str(rng.choice(other)))
        out.append(s)
    return out


def grid(res: int, window: tuple[int, int, int] | None = None):
    """Pixel centres in image units, u (x, right) and v (y, down); of the (x, y, side) window only, if given."""
    c = (np.arange(res, dtype=np.float64) + 0.5) / res
    x, y, side = window or (0, 0, res)
    if min(x, y) < 0 or side < 1 or max(x, y) + side > res:
        raise ValueError(f"window (x, y, side) = {window} does not lie inside a {res}² render; "
                         f"need x, y ≥ 0, side ≥ 1 and x + side, y + side ≤ {res}")
    return np.meshgrid(c[x:x + side], c[y:y + side], indexing="xy")


def cover(sd: np.ndarray, res: int) -> np.ndarray:
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
    return shape_sd(o.shape, cx + o.dx, cy + o.dy, SIZES[o.size], o.angle, u, v)


def shape_sd(shape: str, cx: float, cy: float, r: float, angle: float, u, v) -> np.ndarray:
    """Signed distance (image units, negative inside) to a shape of size r centred at (cx, cy)."""
    if shape == "circle":
        return np.hypot(u - cx, v - cy) - r
    if shape == "ring":
        return np.abs(np.hypot(u - cx, v - cy) - 0.7 * r) - 0.3 * r
    if shape == "square":
        k, radii = 4, [0.9 * r * math.sqrt(2)] * 4
        start = math.pi / 4
    elif shape == "triangle":
        k, radii, start = 3, [1.15 * r] * 3, -math.pi / 2
    else:  # star
        k, radii, start = 10, [1.1 * r, 0.45 * r] * 5, -math.pi / 2
    a = start + angle + 2 * math.pi * np.arange(k) / k
    pts = np.stack([cx + np.array(radii) * np.cos(a), cy + np.array(radii) * np.sin(a)], 1)
    return _polygon_sd(u, v, pts)


def bg_tones(colour: str) -> tuple[np.ndarray, np.ndarray]:
    """A background colour's two tones in [0, 1]: the colour, and a darker (or, for dark colours, lighter)
    one, which stripes, checks, gradients and textures mix with it."""
    base = np.array(BG_COLOURS[colour], np.float64) / 255
    return base, base * 0.6 if base.mean() > 0.5 else base * 0.6 + 0.4


def _background(s: Scene, u, v, res: int) -> np.ndarray:
    base, other = bg_tones(s.bg_colour)
    ca, sa = math.cos(s.bg_angle), math.sin(s.bg_angle)
    w = (u - 0.5) * ca + (v - 0.5) * sa
    if s.background == "plain":
        t = np.zeros_like(u)
    elif s.background == "gradient":
        t = np.clip(w / 1.42 + 0.5, 0, 1)
    elif s.background == "striped":
        t = cover((np.abs((w * 6) % 1 - 0.5) - 0.25) / 6, res)
    elif s.background == "checkered":
        a = cover((np.abs((u * 4) % 1 - 0.5) - 0.25) / 4, res)
        b = cover((np.abs((v * 4) % 1 - 0.5) - 0.25) / 4, res)
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
    u, v = grid(res)
    cov = [cover(_shape_sd(o, u, v), res) for o in s.objects]
    out = []
    for i, c in enumerate(cov):
        for later in cov[i + 1:]:
            c = c * (1 - later)
        out.append(c)
    return np.stack(out).astype(np.float32)


def render(s: Scene, res: int, window: tuple[int, int, int] | None = None) -> np.ndarray:
    """(res, res, 3) float32 RGB in [0, 1]; with window = (x, y, side), only that square of it, for the cost
    of its pixels."""
    u, v = grid(res, window)
    img = _background(s, u, v, res)
    for o in s.objects:
        a = cover(_shape_sd(o, u, v), res)[..., None]
        img = img * (1 - a) + _fill(o, u, v, res) * a
    return img.astype(np.float32)


def _fill(o: Obj, u, v, res: int) -> np.ndarray:
    colour = np.array(COLOURS[o.colour], np.float64) / 255
    if o.stripes is None:
        return colour
    cx, cy = POSITIONS[o.position]
    period = SIZES[o.size] * 0.6
    w = ((u - cx - o.dx) * math.cos(o.angle) + (v - cy - o.dy) * math.sin(o.angle)) / period
    t = cover((np.abs(w % 1 - 0.5) - 0.25) * period, res)[..., None]
    return colour * (1 - t) + np.array(COLOURS[o.stripes], np.float64) / 255 * t


def render_batch(ss: list[Scene], res: int) -> np.ndarray:
    """(N, 3, res, res) float32 in [-1, 1]: the tensor layout the models take."""
    return np.stack([render(s, res).transpose(2, 0, 1) for s in ss]) * 2 - 1
