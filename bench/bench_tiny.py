"""The gates of the embedded model (weights/tiny, weights/tiny-x4), measured on held-out scenes of the world.

    python bench/bench_tiny.py            # all gates → bench/results/tiny_gates.json
    python bench/bench_tiny.py --only clip vae

Held-out scenes come from seeds the recipe never trains on (the recipe uses 1 and 2).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import engine
from engine import images, world
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.checkpoints import load_component
from engine.metrics import Scorer, psnr

OUT = Path(__file__).parent / "results" / "tiny_gates.json"


def candidates(s: world.Scene, attr: str) -> tuple[list[str], int]:
    """Captions of s with object 0's `attr` set to every value; the index of the true one."""
    values = list(world.COLOURS) if attr == "colour" else list(world.SHAPES)
    return [s.replace(0, **{attr: v}).caption() for v in values], values.index(getattr(s.objects[0], attr))


def accuracy(scorer: Scorer, x: torch.Tensor, ss: list) -> dict:
    out = {}
    for attr in ("colour", "shape"):
        cands = [candidates(s, attr) for s in ss]
        pred = torch.cat([scorer.classify(x[i:i + 100], [c for c, _ in cands[i:i + 100]])
                          for i in range(0, len(ss), 100)])
        hit = (pred == torch.tensor([k for _, k in cands])).float()
        n_obj = torch.tensor([len(s.objects) for s in ss])
        out[attr] = hit.mean().item()
        out[f"{attr}_by_objects"] = {n: hit[n_obj == n].mean().item() for n in (1, 2)}
    return out


def gate_clip(n=1000):
    scorer = Scorer.from_pretrained(DEFAULT_MODEL)
    ss = world.scenes(100, n)
    return accuracy(scorer, torch.from_numpy(world.render_batch(ss, 64)), ss)


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


def gate_base(n=200, steps=50, guidance=5.0, batch=50):
    pipe, scorer = engine.load(DEFAULT_MODEL), Scorer.from_pretrained(DEFAULT_MODEL)
    ss = world.scenes(102, n)
    caps = [s.caption() for s in ss]
    x = torch.cat([pipe.generate(caps[i:i + batch], steps=steps, guidance=guidance, seed=i, output="pt",
                                 progress=False) for i in range(0, n, batch)])
    images.save(images.contact_sheet([(im, c) for im, c in zip(images.to_pil(x[:8]), caps)], cell=128),
                OUT.parent / "tiny_base_samples.png")
    return accuracy(scorer, x, ss)


def gate_sr(n=50, steps=50, noise_level=20):
    pipe = engine.load(DEFAULT_UPSCALER)
    ss = world.scenes(103, n)
    low = [Image.fromarray((world.render(s, 64) * 255).round().astype(np.uint8)) for s in ss]
    truth = torch.from_numpy(world.render_batch(ss, 256))
    sr = torch.cat([pipe.upscale(low[i:i + 10], [s.caption() for s in ss[i:i + 10]], steps=steps, guidance=1.0,
                                 noise_level=noise_level, seed=i, output="pt", progress=False)
                    for i in range(0, n, 10)])
    bicubic = images.to_tensor([im.resize((256, 256), Image.BICUBIC) for im in low])
    ceiling = roundtrip(pipe.model.vae, truth, 10)  # SR output is decoded by this VAE
    x = images.to_tensor(low)  # report only: with its 4×4 means put back on the input (upscale(backproject=3))
    fixed = {k: psnr(images.back_project(y, x, 3).clamp(-1, 1), truth).mean().item()
             for k, y in (("sr", sr), ("bicubic", bicubic))}
    return {"psnr_sr": psnr(sr, truth).mean().item(), "psnr_bicubic": psnr(bicubic, truth).mean().item(),
            "psnr_vae_roundtrip": psnr(ceiling, truth).mean().item(),
            "psnr_sr_backprojected": fixed["sr"], "psnr_bicubic_backprojected": fixed["bicubic"]}


GATES = {  # name: (function, [(metric, threshold)])
    "clip": (gate_clip, [("colour", 0.95), ("shape", 0.90)]),
    "vae": (gate_vae, [("psnr_64", 30.0), ("psnr_256", 30.0)]),
    "base": (gate_base, [("colour", 0.90), ("shape", 0.75)]),
    "sr": (gate_sr, [("gain_db", 2.0)]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(GATES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in args.only or list(GATES):
        fn, checks = GATES[name]
        t0 = time.perf_counter()
        r = fn()
        if name == "sr":
            r["gain_db"] = r["psnr_sr"] - r["psnr_bicubic"]
        r["gates"] = {m: {"value": r[m], "threshold": th, "pass": r[m] >= th} for m, th in checks}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        for m, g in r["gates"].items():
            print(f"{name:5s} {m:9s} {g['value']:8.4f}  (gate ≥ {g['threshold']})  {'PASS' if g['pass'] else 'FAIL'}")
    results["device"] = "cpu (2 cores)"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
