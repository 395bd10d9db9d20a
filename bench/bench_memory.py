"""engine.memory's estimates against measured peak memory; writes bench/results/memory.json.

    python bench/bench_memory.py            # every case, each in a fresh subprocess (~10 min)
    python bench/bench_memory.py --quick    # the embedded model's cases only

Each case builds its model (random weights for the SD shapes), runs one small warm-up call, resets
the process's peak resident set (/proc/self/clear_refs), runs the measured call and records the
rise of VmHWM over the resident set just before it: the call's peak. The check compares the
estimate plus engine.memory.OVERHEAD with the memory there is, so that sum (check_ratio) must be
at least the measurement (a job it admits must not run out) and should not be far above it (a job
it refuses should really not fit). Linux only.
"""
import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's engine, whatever is installed
OUT = ROOT / "bench" / "results" / "memory.json"

# (name, model, call, latent side (blend: the image side), batch); a tiled VAE case runs in
# tiles of TILE latent px
CASES = [
    ("tiny unet", "tiny", "unet", 64, 2), ("tiny unet", "tiny", "unet", 128, 2),
    ("tiny unet", "tiny", "unet", 256, 2),
    ("tiny unet grad", "tiny", "unet_grad", 64, 2), ("tiny unet grad", "tiny", "unet_grad", 128, 2),
    ("tiny vae decode", "tiny", "vae", 64, 1), ("tiny vae decode", "tiny", "vae", 256, 1),
    ("tiny vae decode, tiled", "tiny", "vae_tiled", 256, 1),
    ("tiny vae decode, tiled", "tiny", "vae_tiled", 512, 1),
    ("tiny generate", "tiny", "generate", 256, 1),
    ("tiny blend (side in px)", "tiny", "blend", 1024, 1),
    ("tiny blend (side in px)", "tiny", "blend", 2048, 1),
    ("sd1.5 unet", "sd15", "unet", 64, 2), ("sd1.5 unet", "sd15", "unet", 96, 2),
    ("sd2 unet", "sd2", "unet", 64, 2),
    ("sd1.5 unet grad", "sd15", "unet_grad", 32, 1),
    ("sd1.5 unet grad", "sd15", "unet_grad", 64, 1),
    ("sd vae decode", "sd15", "vae", 64, 1), ("sd vae decode", "sd15", "vae", 128, 1),
]
TILE = 64
SD_UNET = {"sd15": {}, "sd2": {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                               "use_linear_projection": True}}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4,
          "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215}


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024


def _random(cls, cfg):
    import torch

    with torch.device("meta"):
        m = cls(cfg)
    m = m.to_empty(device="cpu").eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m


def _models(model: str):
    import engine
    from engine.kernels import cpu
    from engine.models.unet import UNet2DConditionModel, UNetConfig
    from engine.models.vae import AutoencoderKL, VAEConfig

    cpu.retain_freed_memory()  # as loading a model from its files does
    if model == "tiny":
        pipe = engine.load()
        return pipe.model.unet, pipe.model.vae, pipe
    return (_random(UNet2DConditionModel, UNetConfig(**SD_UNET[model])),
            _random(AutoencoderKL, VAEConfig.from_dict(SD_VAE)), None)


def measure(model: str, call: str, side: int, batch: int) -> dict:
    """In this process: the case's peak bytes, measured and estimated."""
    import torch

    from engine import memory, tiled_vae

    torch.manual_seed(0)
    unet, vae, pipe = _models(model)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim)
    x = torch.randn(batch, vae.config.latent_channels, side, side) if call != "blend" else None
    f, tile = vae.downscale, TILE if call == "vae_tiled" else None
    if call == "unet_grad":
        ctx.requires_grad_(True)
        unet.requires_grad_(False)

    if call == "blend":
        from engine.blended import MultiStage, Options
        from engine.embedded import DEFAULT_UPSCALER

        import engine

        edit = MultiStage(pipe.model, engine.load(DEFAULT_UPSCALER).model)
        opts = Options(steps=3, candidates=1, repaint=0, sr_steps=2, stage_steps=10)

    def run(s):
        if call == "blend":  # s: the image side in px
            m = torch.zeros(1, 1, s, s)
            m[..., s // 4:s // 2, s // 4:s // 2] = 1
            return edit.edit(torch.rand(1, 3, s, s) * 2 - 1, m, "a red star", opts, progress=False)
        if call == "unet":
            return unet(x[:, :, :s, :s], 500, ctx)
        if call == "unet_grad":
            return unet(x[:, :, :s, :s], 500, ctx).square().mean().backward()
        if call == "generate":
            return pipe.generate("a red star", steps=2, height=s * f, width=s * f, progress=False)
        return tiled_vae.decode_latents(vae, x[:, :, :s, :s], pixels=0 if tile else None,
                                        tile=tile)

    if call.startswith("unet"):
        est = memory.unet_bytes(unet.config, side, side, batch, 4, grad=call == "unet_grad")
    elif call == "generate":  # the whole job, against the estimate generate checks
        est = max(pipe.model.peak_memory(side * f, side * f, 2 * batch, batch))
    elif call == "blend":
        est = edit.peak_memory(side, side * side, opts)
    else:
        est = memory.vae_bytes(vae.config, side * f, side * f, batch, 4, tile and tile * f)
    with torch.enable_grad() if call == "unet_grad" else torch.no_grad():
        run(64 if call == "blend" else 8)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        base = _rss("VmRSS")
        t = time.perf_counter()
        run(side)
        peak = _rss("VmHWM") - base
    return {"measured_bytes": peak, "estimate_bytes": est, "seconds": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the embedded model's cases only")
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        model, call, side, batch = a.case
        print(json.dumps(measure(model, call, int(side), int(batch))))
        return
    import torch

    from engine import embedded
    from engine.memory import OVERHEAD

    rows = []
    for name, model, call, side, batch in CASES:
        if a.quick and model != "tiny":
            continue
        out = subprocess.run([sys.executable, __file__, "--case", model, call, str(side),
                              str(batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(case=name, latent=side, batch=batch,
                 ratio=round(r["estimate_bytes"] / r["measured_bytes"], 2),
                 check_ratio=round((r["estimate_bytes"] + OVERHEAD) / r["measured_bytes"], 2))
        print(f"{name:24} latent {side:4}² ×{batch}: measured {r['measured_bytes'] / 2**20:6.0f} MB"
              f"  estimate {r['estimate_bytes'] / 2**20:6.0f} MB  ratio {r['ratio']:.2f}, with "
              f"the overhead {r['check_ratio']:.2f}")
        rows.append(r)
    OUT.write_text(json.dumps({
        "command": "python bench/bench_memory.py" + (" --quick" if a.quick else ""),
        "commit": embedded.source_commit(), "model_version": embedded.versions(),
        "device": f"CPU {platform.machine()}", "torch": torch.__version__,
        "dtype": "float32", "overhead_bytes": OVERHEAD, "tile_latent_px": TILE,
        "min_check_ratio": min(r["check_ratio"] for r in rows),
        "max_check_ratio": max(r["check_ratio"] for r in rows), "cases": rows}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
