"""The recipe's training steps (weights/recipe.py) in fp32 and under bf16 autocast (`--precision bf16`).

--part speed: the step time of its three largest models on random data of the recipe's shapes. The base and
x4 UNets take the recipe's own steps (base: batch 64 of 16² latents; x4: its mix of crop sides); the VAE's
step has the recipe's loss and optimiser step (32 crops of 32²). Precisions alternate; the median of
--repeats rounds of --steps steps each.
--part quality: the base UNet trained from the same initialisation in each precision, --train-steps steps of
the `base` stage's step (its loss, batch, learning rate and EMA) on 6 000 training-pool scenes encoded by the
shipped VAE and text encoder, and its v-loss on 512 held-out scenes (seed 555) every 250 steps.
Writes bench/results/recipe_steps.json.
"""
import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import engine
from engine import schedule, world
from engine.embedded import DEFAULT_MODEL
from engine.kernels.cpu import cpuinfo
from engine.models.unet import UNet2DConditionModel, UNetConfig
from engine.models.vae import AutoencoderKL, VAEConfig
from engine.profile import cpu_name
from stamps import save_part, stamp

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("recipe", ROOT / "weights" / "recipe.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def base_step():
    unet = UNet2DConditionModel(UNetConfig.from_dict(recipe.BASE))
    opt, ema = recipe.adamw(unet.parameters(), 8e-4), recipe.EMA(unet, 0.995)
    n = 256
    step = base_steps(unet, ema, opt, torch.randn(n, recipe.LATENT, 16, 16),
                      torch.randn(n, recipe.CAPTIONS, 77, 128), torch.randn(77, 128))
    return lambda: step(0, None)


def base_steps(unet, ema, opt, latents, emb, null, batch: int = 64):
    """The recipe's base-stage step on these latents and caption embeddings, stored in float16 as the recipe's
    data stage stores them."""
    return recipe.base_steps(unet, ema, opt, batch, 0.1, {"latents": latents.half(), "emb": emb.half(), "null": null})


def vae_step():
    vae = AutoencoderKL(VAEConfig.from_dict(recipe.VAE))
    opt = recipe.adamw(vae.parameters(), 1e-3)
    x = torch.rand(32, 3, 32, 32) * 2 - 1

    def step():
        mean, logvar = vae.encode(x)
        rec = vae.decode(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        return recipe.update(F.mse_loss(rec, x) + 0.1 * (rec - x).abs().mean(), opt, vae)

    return step


def sr_step():
    unet = UNet2DConditionModel(UNetConfig.from_dict(recipe.SR))
    opt, ema = recipe.adamw(unet.parameters(), 5e-4), recipe.EMA(unet, 0.995)
    n = 64
    data = {"latents": torch.randn(n, recipe.LATENT, 64, 64).half(),
            "low": torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8),
            "emb": torch.randn(n, recipe.CAPTIONS, 77, 128).half(), "null": torch.randn(77, 128)}
    step, rng = recipe.sr_steps(unet, ema, opt, data, 0.1), np.random.default_rng(0)  # the same crops in each run
    return lambda: step(0, rng)


MODELS = {"base UNet": base_step, "VAE": vae_step, "x4 UNet": sr_step}


def speed(repeats: int, n: int) -> dict:
    rows = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        steps = {p: make() for p in ("fp32", "bf16")}
        times = {p: [] for p in steps}

        def run(p, k):
            with torch.autocast("cpu", torch.bfloat16, enabled=p == "bf16"):
                for _ in range(k):
                    steps[p]()

        for p in steps:
            run(p, 2)  # warm-up
        for _ in range(repeats):
            for p in steps:
                t0 = time.perf_counter()
                run(p, n)
                times[p].append((time.perf_counter() - t0) / n)
        med = {p: statistics.median(v) for p, v in times.items()}
        rows[name] = {"seconds_per_step": times, "median_s": med, "ratio_bf16_over_fp32": med["bf16"] / med["fp32"]}
        print(f"{name}: fp32 {med['fp32']:.3f} s/step, bf16 {med['bf16']:.3f} s/step, "
              f"ratio {rows[name]['ratio_bf16_over_fp32']:.2f}")
    return {"repeats": repeats, "steps": n, "models": rows}


@torch.no_grad()
def encoded(pipe, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, C, 16, 16) and caption embeddings (n, captions, 77, D) of world.scenes(seed, n)."""
    ss = world.scenes(seed, n)
    x = torch.from_numpy(np.stack([world.render(s, 64) for s in ss])).permute(0, 3, 1, 2).float() * 2 - 1
    lat = torch.cat([pipe.model.encode(x[i:i + 500]) for i in range(0, n, 500)])
    caps = [c for cs in world.phrasings(ss, seed, recipe.CAPTIONS) for c in cs]
    emb = torch.cat([pipe.model.encode_prompt(caps[i:i + 500]) for i in range(0, len(caps), 500)])
    return lat, emb.unflatten(0, (n, recipe.CAPTIONS))


def quality(steps: int, batch: int = 64, every: int = 250) -> dict:
    pipe = engine.load(DEFAULT_MODEL)
    (lat, emb), (vlat, vemb) = encoded(pipe, recipe.TRAIN_SEED, 6000), encoded(pipe, 555, 512)
    with torch.no_grad():
        null = pipe.model.encode_prompt([""])[0]
    sched = schedule.SchedulerConfig.from_dict(recipe.BASE_SCHED)
    weight = recipe.min_snr_weights(sched)
    g = torch.Generator().manual_seed(7)
    vt, vn = torch.randint(0, 1000, (len(vlat),), generator=g), torch.randn(vlat.shape, generator=g)
    vc = vemb[torch.arange(len(vlat)), torch.randint(recipe.CAPTIONS, (len(vlat),), generator=g)]

    @torch.no_grad()
    def held_out(sd: dict) -> float:
        unet = UNet2DConditionModel(UNetConfig.from_dict(recipe.BASE))
        unet.load_state_dict(sd)
        err = unet(schedule.q_sample(sched, vlat, vt, vn), vt, vc) - schedule.training_target(sched, vlat, vt, vn)
        return float((err.square().mean((1, 2, 3)) * weight[vt]).mean())

    out = {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(UNetConfig.from_dict(recipe.BASE))
        ema, opt = recipe.EMA(unet, 0.995), recipe.adamw(unet.parameters(), 8e-4)
        step = base_steps(unet, ema, opt, lat, emb, null, batch)
        curve, t0 = [], time.perf_counter()
        for i in range(steps):
            recipe.set_lr(opt, i, steps)
            torch.manual_seed(i)
            with torch.autocast("cpu", torch.bfloat16, enabled=p == "bf16"):
                step(i, None)
            if (i + 1) % every == 0 or i + 1 == steps:
                curve.append({"step": i + 1, "held_out": held_out(unet.state_dict()),
                              "held_out_ema": held_out(ema.state_dict())})
                print(p, curve[-1], flush=True)
        out[p] = {"curve": curve, "seconds_per_step": (time.perf_counter() - t0) / steps}
    return {"train_steps": steps, "batch": batch, "train_scenes": len(lat), "held_out_scenes": len(vlat),
            "runs": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speed", "quality"], nargs="+", default=["speed", "quality"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    stamped = stamp("bench_recipe_steps.py")
    flags = cpuinfo("flags").split()
    top = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
           "native_bf16": [f for f in ("avx512_bf16", "amx_bf16") if f in flags]}
    path = ROOT / "bench" / "results" / "recipe_steps.json"
    for part in args.part:
        value = speed(args.repeats, args.steps) if part == "speed" else quality(args.train_steps)
        save_part(path, part, {**value, **top}, stamped)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
