"""`python -m engine demo`: every basic job of the engine on the embedded model, written under
out/."""
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import images, world
from .rng import check_seed
from .embedded import DEFAULT_MODEL, DEFAULT_UPSCALER

PROMPTS = ["a large red star in the center, on a plain white background",  # the caption template
           "a yellow circle on the left and a big blue square on the right, striped grey background"]
SOURCE = world.Scene((world.Obj("triangle", "green", "large", "in the center"),), "checkered",
                     "white")
EDIT = SOURCE.replace(0, colour="purple")
SR_ETA = 1.0  # the ×4 stages' DDIM eta: ancestral is sharper than eta 0 on held-out scenes


def run(out="out", steps=50, sr_steps=10, model=DEFAULT_MODEL, upscaler=DEFAULT_UPSCALER, seed=0,
        progress=True) -> list[Path]:
    """Text→image, img2img, ×4 upscale to 256² and a tiled ×4 upscale to 1024²; returns the files
    written."""
    import engine

    for name, v in (("steps", steps), ("sr_steps", sr_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: need a positive whole number of DDIM steps")
    check_seed(seed)
    out = images.make_folder(out)
    t0 = time.perf_counter()
    base, sr = engine.load(model), engine.load(upscaler)
    common = dict(seed=seed, progress=progress)
    shots = []  # (file name, image, caption)
    for i, p in enumerate(PROMPTS):
        image = base.generate(p, steps=steps, guidance=5.0, **common)[0]
        shots.append((f"generate_{i}.png", image, f"generate: {p}"))
    src = Image.fromarray((world.render(SOURCE, 64) * 255).round().astype(np.uint8))
    shots.append(("img2img_source.png", src, f"source render: {SOURCE.caption()}"))
    edit = base.img2img(src, EDIT.caption(), strength=0.6, steps=steps, guidance=5.0, **common)[0]
    shots.append(("img2img.png", edit, f"img2img (strength 0.6): {EDIT.caption()}"))
    low = shots[0][1]
    up = sr.upscale(low, PROMPTS[0], steps=sr_steps, guidance=1.0, eta=SR_ETA,
                    backproject=images.BACKPROJECT, **common)[0]
    shots.append(("upscale_256.png", up, "x4 upscale of generate 0 to 256x256, back-projected"))
    big = sr.upscale(up, PROMPTS[0], steps=sr_steps, guidance=1.0, eta=SR_ETA, tile=64, overlap=16,
                     backproject=images.BACKPROJECT, **common)[0]
    shots.append(("upscale_1024.png", big,
                  "tiled x4 upscale (64x64 tiles) to 1024x1024, back-projected"))
    written = [images.save(im, out / name) for name, im, _ in shots]
    sheet = images.contact_sheet([(im, cap) for _, im, cap in shots])
    written.append(images.save(sheet, out / "contact_sheet.png"))
    print(f"demo: wrote {len(written)} images to {out}/ in {time.perf_counter() - t0:.1f}s; "
          f"all of them side by side: {written[-1]}")
    return written
