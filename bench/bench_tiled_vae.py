"""Tiled vs untiled VAE (engine.tiled_vae), fp32 on the CPU, 2 threads; writes
bench/results/tiled_vae.json.

    python bench/bench_tiled_vae.py                  # sd, tiny, rss (2048² and 4096²), sd_rss
    python bench/bench_tiled_vae.py --only rss --sizes 4096

sd:        SD-VAE-architecture decoder (128/256/512/512, 2 layers, 32 groups, f=8), random weights,
           512² output.
tiny:      the embedded tiny VAE (weights/tiny/vae, f=4) at 1024²: decode and encode.
rss:       peak RSS of one tiny-VAE decode, tiled and untiled, each in a fresh subprocess (its own
           ru_maxrss).
sd_rss:    the same for the SD-architecture VAE, tiled only (python bench/bench_tiled_vae.py --only sd_rss
           --sizes 2048).
Untiled runs are the plain VAE module; tiled runs go through the strategy (tiled_vae.decode /
encode, or decode_latents with pixels=0). Each part replaces its own entry in the JSON file, so
parts can run separately.
"""
import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import tiled_vae  # noqa: E402
from engine.embedded import DEFAULT_MODEL  # noqa: E402
from engine.checkpoints import load_component  # noqa: E402
from engine.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from stamps import save_part, stamp  # noqa: E402

OUT = ROOT / "bench" / "results" / "tiled_vae.json"
STAMP = stamp(Path(__file__).name)  # before this run writes its own results file, which would read as -dirty
UNTILED = 10 ** 12  # a pixel budget no image reaches


def timed(fn):
    t = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - t


def compare(vae, plain, tiled, tile, runs=3):
    """plain(vae) in fp32 and fp64, tiled(vae, tile) in fp32: max abs diffs, output scale, and the
    seconds of `runs` alternating fp32 runs of each with their medians. tile: latent px; None:
    ENGINE_VAE_TILE or the default."""
    def run(fn):
        out, t = timed(fn)
        return [o.double() for o in (out if isinstance(out, tuple) else (out,))], round(t, 2)

    times = {"untiled": [], "tiled": []}
    for _ in range(runs):
        (ref, t_ref), (out, t_tiled) = run(lambda: plain(vae)), run(lambda: tiled(vae, tile))
        times["untiled"].append(t_ref)
        times["tiled"].append(t_tiled)
    exact, _ = run(lambda: plain(copy.deepcopy(vae).double()))

    def diff(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(tile_latent_px=tiled_vae.settings(vae, tile=tile)[1], max_abs_diff=diff(out, ref),
                output_std=ref[0].std().item(), output_abs_max=ref[0].abs().max().item(),
                untiled_vs_fp64=diff(ref, exact), tiled_vs_fp64=diff(out, exact),
                untiled_s=med["untiled"], tiled_s=med["tiled"], runs=times,
                tiled_over_untiled=round(med["tiled"] / med["untiled"], 3))


def dtype(vae):
    return next(vae.parameters()).dtype


def sd_vae():
    from engine.kernels import cpu

    cpu.retain_freed_memory()  # as reading a model's files onto the CPU does
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines, so a tone shift between tiles shows
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return vae


def part_sd(args):
    """At the default buffer (every layer fits: it runs whole) and at 1/16 of it, which at 512² keeps
    what the default keeps at 2048² (the 512-wide activations, not the 256- and 128-wide)."""
    vae = sd_vae()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    out = dict(config="block_out_channels 128/256/512/512, layers_per_block 2, 32 groups, f=8, "
                      "mid attention", output_px=512)
    default = tiled_vae.BUFFER_BYTES
    for name, buffer in (("decode", default), ("decode_buffer_1_16", default // 16)):
        tiled_vae.BUFFER_BYTES = buffer
        try:
            out[name] = dict(buffer_mib=buffer >> 20, **compare(
                vae, lambda v: v.decode(z.to(dtype(v))),
                lambda v, t: tiled_vae.decode(v, z.to(dtype(v)), t), args.sd_tile, args.runs))
        finally:
            tiled_vae.BUFFER_BYTES = default
    return out


def tiny_vae():
    return load_component(DEFAULT_MODEL / "vae", "vae").eval()


def part_tiny(args):
    vae, g = tiny_vae(), torch.Generator().manual_seed(1)
    z = torch.randn(1, vae.config.latent_channels, 256, 256, generator=g)
    x = torch.rand(1, 3, 1024, 1024, generator=g) * 2 - 1
    decode = compare(vae, lambda v: v.decode_latents(z.to(dtype(v))),
                     lambda v, t: tiled_vae.decode_latents(v, z.to(dtype(v)), pixels=0, tile=t),
                     args.tiny_tile, args.runs)
    encode = compare(vae, lambda v: v.encode(x.to(dtype(v))),
                     lambda v, t: v.moments(tiled_vae.encode(v, x.to(dtype(v)), t)), args.tiny_tile,
                     args.runs)
    return dict(output_px=1024, decode=decode, encode=encode)


def child(mode, size, which="tiny"):
    """One decode in this process; prints a JSON line with its time and this process's peak RSS."""
    vae, pixels = (tiny_vae() if which == "tiny" else sd_vae()), 0 if mode == "tiled" else UNTILED
    n = size // vae.downscale
    z = torch.randn(1, vae.config.latent_channels, n, n, generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    img, t = timed(lambda: tiled_vae.decode_latents(vae, z, pixels=pixels))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(mode=mode, output_px=size, seconds=round(t, 1),
                          peak_rss_mib=round(peak / 1024),
                          rss_before_decode_mib=round(before / 1024),
                          output_mib=round(img.nbytes / 2 ** 20),
                          tile_latent_px=tiled_vae.settings(vae)[1] if mode == "tiled" else None)))


def part_rss(args, which="tiny", modes=("tiled", "untiled")):
    rows, part = {}, "rss" if which == "tiny" else f"{which}_rss"
    for size in args.sizes:
        for mode in modes:
            p = subprocess.run([sys.executable, __file__, "--child", mode, str(size), which],
                               capture_output=True, text=True)
            row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else dict(
                mode=mode, output_px=size, error=p.stderr.strip().splitlines()[-1:])
            print(row, flush=True)
            rows[f"{mode}_{size}"] = row
            save(part, {**load().get(part, {}), **rows})
    return {**load().get(part, {}), **rows}


def part_sd_rss(args):
    """The SD VAE's decode, tiled only (untiled, a 2048² decode keeps 2 GiB activations)."""
    return part_rss(args, "sd", ("tiled",))


def load():
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save(part, value):
    save_part(OUT, part, value, STAMP, device=f"CPU {platform.machine()} x{torch.get_num_threads()} threads",
              torch=torch.__version__, dtype="float32")


PARTS = {"sd": part_sd, "tiny": part_tiny, "rss": part_rss, "sd_rss": part_sd_rss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096],
                    help="output sides for the rss part")
    ap.add_argument("--sd-tile", type=int, default=32, help="latent px (2 × 2 tiles at 512²)")
    ap.add_argument("--tiny-tile", type=int, default=None,
                    help="latent px; default 512 // 4 = 128 (2 × 2 tiles)")
    ap.add_argument("--runs", type=int, default=3, help="alternating timed runs of each (sd, tiny)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SIZE", "VAE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    for name in args.only:
        value = PARTS[name](args)
        print(name, json.dumps(value, indent=2), flush=True)
        save(name, value)


if __name__ == "__main__":
    main()
