"""The gates of the embedded model (weights/tiny, weights/tiny-x4), measured on held-out scenes of the world.

    python bench/bench_tiny.py            # all gates → bench/results/tiny_gates.json
    python bench/bench_tiny.py --only clip vae

Held-out scenes come from seeds the recipe never trains on (the recipe uses 1 and 2); held-out free
phrasings are phrasings of those scenes whose text is none of the recipe's training captions.
Generated images are judged from their pixels (engine.judge) against the scene the caption describes.
"""
import argparse
import importlib.util
import json
import re
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import engine
from engine import demo, images, judge, world
from engine.checkpoints import load_component
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.metrics import Scorer, psnr
from stamps import stamp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "tiny_gates.json"
FREE_SEED = 105   # scenes and phrasings of the held-out free-phrasing set


@cache
def recipe():
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "weights" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokens(text: str) -> str:
    """A caption as the tokenizer sees it: lower case, words and punctuation apart."""
    return " ".join(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))


@cache
def training_captions() -> frozenset:
    """The recipe's training captions (its hard negatives, made up during training, are not among them)."""
    r = recipe()
    pools = (r.captions(world.scenes(r.TRAIN_SEED, r.TRAIN_N)),
             world.phrasings(world.scenes(r.SR_SEED, r.SR_LATENTS), r.SR_SEED, r.CAPTIONS))
    return frozenset(tokens(c) for p in pools for cs in p for c in cs)


@cache
def free_set(n: int) -> tuple[list[world.Scene], list[int], float]:
    """n held-out scenes, each with the index of its free phrasing (free_words) whose tokens are none of a
    training caption's, and the share of phrasings that had to be skipped for being one."""
    seen = training_captions()
    ss, idx, tried = [], [], 0
    for i, s in enumerate(world.scenes(FREE_SEED, 10 * n)):
        if len(ss) == n:
            break
        tried += 1
        if tokens(free_words(s, i).text) not in seen:
            ss.append(s)
            idx.append(i)
    if len(ss) < n:
        raise RuntimeError(f"only {len(ss)} of {tried} free phrasings are held out; wanted {n}")
    return ss, idx, 1 - n / tried


def free_words(s: world.Scene, i: int) -> world.Phrase:
    return world.phrase(s, world.phrasing_rng(FREE_SEED, i, 1))


def candidates(s: world.Scene, i: int | None, attr: str) -> tuple[list[str], int]:
    """The caption of s, worded as free phrasing i (None: the template), with object 0's `attr` set to every
    value; the index of the true one."""
    values = list(world.COLOURS) if attr == "colour" else list(world.SHAPES)
    texts = [s.replace(0, **{attr: v}) for v in values]
    texts = [t.caption() if i is None else free_words(t, i).text for t in texts]
    return texts, values.index(getattr(s.objects[0], attr))


def accuracy(scorer: Scorer, x: torch.Tensor, ss: list, idx: list | None = None) -> dict:
    """The tiny CLIP's zero-shot reading of object 0's colour and shape."""
    out = {}
    for attr in ("colour", "shape"):
        cands = [candidates(s, idx[k] if idx else None, attr) for k, s in enumerate(ss)]
        pred = torch.cat([scorer.classify(x[i:i + 100], [c for c, _ in cands[i:i + 100]])
                          for i in range(0, len(ss), 100)])
        hit = (pred == torch.tensor([k for _, k in cands])).float()
        n_obj = torch.tensor([len(s.objects) for s in ss])
        out[attr] = hit.mean().item()
        out[f"{attr}_by_objects"] = {n: hit[n_obj == n].mean().item() if (n_obj == n).any() else None
                                     for n in (1, 2)}
    return out


def gate_clip(n=1000):
    scorer = Scorer.from_pretrained(DEFAULT_MODEL)
    ss = world.scenes(100, n)
    out = accuracy(scorer, torch.from_numpy(world.render_batch(ss, 64)), ss)
    fs, idx, skipped = free_set(n)
    free = accuracy(scorer, torch.from_numpy(world.render_batch(fs, 64)), fs, idx)
    return {**out, **{f"{k}_free": v for k, v in free.items()}, "free_held_out": len(fs),
            "free_skipped_as_training_captions": skipped}


@torch.no_grad()
def roundtrip(vae, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """decode(encode(x).mean), batch by batch."""
    return torch.cat([vae.decode(vae.encode(x[i:i + batch])[0]) for i in range(0, len(x), batch)])


@torch.no_grad()
def gate_vae(n64=500, n256=50):
    vae = load_component(DEFAULT_MODEL / "vae", "vae").eval()
    out = {}
    for res, n in ((64, n64), (256, n256)):
        x = torch.from_numpy(world.render_batch(world.scenes(101, n), res))
        out[f"psnr_{res}"] = psnr(roundtrip(vae, x), x).mean().item()
    try:  # natural photos the recipe did not train on (scikit-image's bundled samples), for information
        import skimage.data
    except ImportError:
        return out
    rng = np.random.default_rng(0)
    for res, per in ((64, 20), (256, 4)):
        crops = []
        for name in ("chelsea", "hubble_deep_field"):
            p = getattr(skimage.data, name)()[..., :3]
            for _ in range(per):
                y, x0 = rng.integers(p.shape[0] - res + 1), rng.integers(p.shape[1] - res + 1)
                crops.append(p[y:y + res, x0:x0 + res].transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(crops).astype(np.float32)) / 127.5 - 1
        out[f"psnr_photo_{res}"] = psnr(vae.decode(vae.encode(x)[0]), x).mean().item()
    return out


def pixels(x: torch.Tensor) -> list[np.ndarray]:
    return [im.numpy() for im in ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).double()]


def judged(x: torch.Tensor, ss: list, phrases: list | None = None) -> dict:
    """The share of the attributes the captions named that the images show, read from their pixels, over
    every named object (and by number of objects in the scene)."""
    hits = {k: {1: [], 2: []} for k in ("colour", "shape", "size", "position", "bg_colour")}
    for k, (im, s) in enumerate(zip(pixels(x), ss)):
        c = judge.check(judge.read(im), s, phrases[k] if phrases else None)
        for attr, v in judge.named(c).items():
            hits[attr][len(s.objects)].extend(v)
    out = {}
    for attr, by in hits.items():
        every = by[1] + by[2]
        out[attr] = float(np.mean(every))
        out[f"{attr}_by_objects"] = {n: float(np.mean(v)) if v else None for n, v in by.items()}
        out[f"{attr}_named"] = len(every)
    return out


def generate(pipe, texts: list[str], steps: int, guidance: float, batch: int = 50) -> torch.Tensor:
    return torch.cat([pipe.generate(texts[i:i + batch], steps=steps, guidance=guidance, seed=i, output="pt",
                                    progress=False) for i in range(0, len(texts), batch)])


def border_excess(x: torch.Tensor, ss: list) -> dict:
    """On plain backgrounds: the border metric (judge.border) of the images, of the true renders of the
    same scenes (objects may reach the frame), and the difference."""
    plain = [k for k, s in enumerate(ss) if s.background == "plain"]
    gen = np.mean([judge.border(pixels(x[k:k + 1])[0]) for k in plain])
    true = np.mean([judge.border(world.render(ss[k], x.shape[-1])) for k in plain])
    return {"border": float(gen), "border_truth": float(true), "border_excess": float(gen - true),
            "border_images": len(plain)}


def said(text: str, objects: list[tuple], bg_colour: str | None = None) -> tuple[world.Scene, world.Phrase]:
    """A prompt as a newcomer writes it, with the scene it asks for: objects as (colour, shape, size or
    None, position or None)."""
    objs = tuple(world.Obj(shape, colour, size or "small", position or "in the center")
                 for colour, shape, size, position in objects)
    scene = world.Scene(objs, "plain", bg_colour or "white")
    return scene, world.Phrase(text, tuple(o[2] is not None for o in objects),
                               tuple(o[3] is not None for o in objects), bg_colour is not None, False)


FIRST_PROMPTS = [  # what a newcomer types first
    said("a red circle", [("red", "circle", None, None)]),
    said("a blue square on a yellow background", [("blue", "square", None, None)], "yellow"),
    said("a green circle on a red background", [("green", "circle", None, None)], "red"),
    said("red ring on black", [("red", "ring", None, None)], "black"),
    said("blue star, yellow background", [("blue", "star", None, None)], "yellow"),
    said("a big green triangle in the middle", [("green", "triangle", "large", "in the center")]),
    said("a small purple star at the top on a white background", [("purple", "star", "small", "at the top")],
         "white"),
    said("a yellow circle on the left and a blue square on the right",
         [("yellow", "circle", None, "on the left"), ("blue", "square", None, "on the right")]),
]


def first_prompts(pipe, steps: int, guidance: float, per: int = 8) -> dict:
    """For each prompt of FIRST_PROMPTS, the share of `per` images (one batch, seed 0) that show everything
    it names, read from the pixels."""
    out = {}
    for scene, p in FIRST_PROMPTS:
        x = pipe.generate([p.text] * per, steps=steps, guidance=guidance, seed=0, output="pt", progress=False)
        ok = []
        for im in pixels(x):
            c = judge.named(judge.check(judge.read(im), scene, p))
            ok.append(all(v for hits in c.values() for v in hits))
        out[p.text] = {"shows_all": float(np.mean(ok)), "a_training_caption": tokens(p.text) in training_captions()}
    return out


def gate_base(n=200, steps=50, guidance=5.0):
    pipe, scorer = engine.load(DEFAULT_MODEL), Scorer.from_pretrained(DEFAULT_MODEL)
    ss = world.scenes(102, n)
    caps = [s.caption() for s in ss]
    x = generate(pipe, caps, steps, guidance)
    fs, idx, skipped = free_set(n)
    phrases = [free_words(s, i) for s, i in zip(fs, idx)]
    y = generate(pipe, [p.text for p in phrases], steps, guidance)
    items = [(im, c) for im, c in zip(images.to_pil(x[:6]), caps)]
    items += [(im, p.text) for im, p in zip(images.to_pil(y[:6]), phrases)]
    images.save(images.contact_sheet(items, cell=128, columns=6), OUT.parent / "tiny_base_samples.png")
    out = {**judged(x, ss), **border_excess(x, ss), **{f"{k}_free": v for k, v in judged(y, fs, phrases).items()}}
    clip = {**accuracy(scorer, x, ss), **{f"{k}_free": v for k, v in accuracy(scorer, y, fs, idx).items()}}
    return {**out, "clip": clip, "free_held_out": len(fs), "free_skipped_as_training_captions": skipped,
            "first_prompts": first_prompts(pipe, steps, guidance)}


def gradients(a: torch.Tensor) -> torch.Tensor:
    """Central differences of (N, 3, H, W) in [−1, 1], on [0, 1]: (2 directions, N, 3, H − 2, W − 2)."""
    a = (a + 1) / 2
    return torch.stack([a[..., 1:-1, 2:] - a[..., 1:-1, :-2], a[..., 2:, 1:-1] - a[..., :-2, 1:-1]]) / 2


def sharpness(x: torch.Tensor, truth: torch.Tensor, within: torch.Tensor | None = None) -> float:
    """Edge sharpness: on the true image's edges, x's gradient projected on the truth's, Σ ∇x·∇t / Σ |∇t|²
    (1 for the truth; blur and misplaced edges lower it, overshoot raises it above 1, and zero-mean noise leaves
    it unchanged on average). `within`: (N, 1, H, W), count only the edges where it is 1."""
    gx, gt = gradients(x), gradients(truth)
    edges = (gt.square().sum((0, 2)).sqrt() > 0.05)[None, :, None]  # (1, N, 1, H, W) over 2 directions, 3 channels
    if within is not None:
        edges = edges & (within[None, :, :, 1:-1, 1:-1] > 0)
    return ((gx * gt * edges).sum() / (gt.square() * edges).sum()).item()


def bicubic_up(low: list, side: int) -> torch.Tensor:
    return images.to_tensor([im.resize((side, side), Image.BICUBIC) for im in low])


def sr_scores(sr: torch.Tensor, low: list, truth: torch.Tensor) -> dict:
    """The upscale against the true render, beside bicubic plain and back-projected as the ×4 stage is."""
    bicubic = bicubic_up(low, truth.shape[-1])
    bicubic_bp = images.back_project(bicubic, images.to_tensor(low), images.BACKPROJECT).clamp(-1, 1)
    return {"psnr_sr": psnr(sr, truth).mean().item(), "psnr_bicubic": psnr(bicubic, truth).mean().item(),
            "psnr_bicubic_backprojected": psnr(bicubic_bp, truth).mean().item(),
            "gain_db": (psnr(sr, truth) - psnr(bicubic_bp, truth)).mean().item(),
            "sharpness_sr": sharpness(sr, truth), "sharpness_bicubic": sharpness(bicubic, truth),
            "sharpness_bicubic_backprojected": sharpness(bicubic_bp, truth)}


def renders(ss: list, res: int) -> list[Image.Image]:
    return [Image.fromarray((world.render(s, res) * 255).round().astype(np.uint8)) for s in ss]


def gate_sr(n=50, steps=50, noise_level=20, eta=demo.SR_ETA, n_tiled=8, tile=64):
    """The ×4 stage as the cascade runs it (the demo's eta, which the multi-stage blend also uses;
    the sample back-projected onto its input) against bicubic back-projected the same way; the plain
    sample, diffusers' StableDiffusionUpscalePipeline output, is reported beside it."""
    pipe = engine.load(DEFAULT_UPSCALER)
    ss = world.scenes(103, n)
    low = renders(ss, 64)
    truth = torch.from_numpy(world.render_batch(ss, 256))

    def upscale(backproject):
        return torch.cat([pipe.upscale(low[i:i + 10], [s.caption() for s in ss[i:i + 10]], steps=steps,
                                       guidance=1.0, noise_level=noise_level, eta=eta, seed=i, output="pt",
                                       progress=False, backproject=backproject)
                          for i in range(0, n, 10)]).float().clamp(-1, 1)

    out = sr_scores(upscale(images.BACKPROJECT), low, truth)
    plain = upscale(0)
    out["psnr_sr_plain"], out["sharpness_sr_plain"] = psnr(plain, truth).mean().item(), sharpness(plain, truth)
    out["psnr_vae_roundtrip"] = psnr(roundtrip(pipe.model.vae, truth, 10), truth).mean().item()  # its ceiling

    # the second stage: 256² renders → 1024², tile by tile, against the true 1024² render
    mid = renders(ss[:n_tiled], 256)
    big = torch.cat([pipe.upscale(im, s.caption(), steps=steps, guidance=1.0, noise_level=noise_level, eta=eta,
                                  seed=k, tile=tile, output="pt", progress=False, backproject=images.BACKPROJECT)
                     for k, (im, s) in enumerate(zip(mid, ss))]).float().clamp(-1, 1)
    tiled = sr_scores(big, mid, torch.from_numpy(world.render_batch(ss[:n_tiled], 1024)))
    return {**out, **{f"{k}_1024": v for k, v in tiled.items()}}


GE, LE = "≥", "≤"
GATES = {  # name: (function, [(metric, comparison, bound)])
    "clip": (gate_clip, [("colour", GE, 0.95), ("shape", GE, 0.90), ("colour_free", GE, 0.95),
                         ("shape_free", GE, 0.90)]),
    "vae": (gate_vae, [("psnr_64", GE, 36.0), ("psnr_256", GE, 36.0)]),
    "base": (gate_base, [("colour", GE, 0.95), ("shape", GE, 0.90), ("bg_colour", GE, 0.90),
                         ("colour_free", GE, 0.95), ("shape_free", GE, 0.90), ("bg_colour_free", GE, 0.90),
                         ("border_excess", LE, 1 / 255)]),
    "sr": (gate_sr, [("gain_db", GE, 1.0), ("sharpness_sr", GE, 0.8), ("gain_db_1024", GE, 1.0),
                     ("sharpness_sr_1024", GE, 0.8)]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(GATES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    stamped = stamp("bench_tiny.py")
    for name in args.only or list(GATES):
        fn, checks = GATES[name]
        t0 = time.perf_counter()
        r = fn()
        r["gates"] = {m: {"value": r[m], "bound": f"{op} {th:.4g}", "pass": r[m] >= th if op == GE else r[m] <= th}
                      for m, op, th in checks}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r.update(stamped)
        results[name] = r
        for m, g in r["gates"].items():
            print(f"{name:5s} {m:18s} {g['value']:8.4f}  (gate {g['bound']})  {'PASS' if g['pass'] else 'FAIL'}")
    results["device"] = "cpu (2 cores)"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
