"""Everything a lent GPU should measure, in one process (meant to end within 8 minutes on one H100 / H200):

1. each Triton kernel at the real SD 1.5 and SDXL shapes, in fp16 and bf16: its first call (compile) time, its
   error against torch in fp32, and the median time of it and of torch;
2. one SD 1.5 CFG UNet step (batch 2, 64² latent) and a 50-step 512² DDIM generation, random weights, with our
   kernels (ENGINE_KERNELS=auto), with the torch ops (ENGINE_KERNELS=torch) and with diffusers' UNet (SDPA) on
   the same weights: steps/s, TFLOP/s (FLOPs counted by torch on the step), peak memory;
3. the VAE decode at 512² and tiled at 2048².

    python bench/gpu.py              # on a CUDA machine → bench/results/gpu_<device>.json
    python bench/gpu.py --dry-run    # the same code on the CPU at tiny shapes, Triton interpreted (run by CI)

A part that fails is recorded with its error and the others still run; the JSON names the device, the versions
and the commit.
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = {  # (batch, heads, query length, key length, head dim); (batch, channels, side); (c_in, c_out, side, stride)
    "attention": [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
                  (2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64), (1, 1, 4096, 4096, 512)],
    "group_norm": [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 640, 64), (1, 512, 64), (1, 128, 512)],
    "conv": [(320, 320, 64, 1), (640, 640, 32, 1), (1280, 1280, 16, 1), (320, 320, 64, 2), (640, 640, 64, 1)],
}
TINY = {"attention": [(1, 2, 64, 64, 16), (1, 2, 64, 7, 32)], "group_norm": [(1, 32, 8)], "conv": [(8, 16, 8, 1)]}
TINY_MODEL = {  # small enough for the Triton interpreter
    "unet": dict(block_out_channels=[16, 32], layers_per_block=1, sample_size=8, cross_attention_dim=16,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], norm_num_groups=8,
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4),
    "vae": dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    "text_encoder": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4),
}


def timed(fn, repeats, sync):
    fn()
    runs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def kernel_rows(torch, kernels, shapes, dtypes, device, repeats, sync):
    """Per kernel, shape and dtype: first-call seconds, relative error against torch in fp32, median times."""
    F = torch.nn.functional
    rows = []
    for dtype in dtypes:
        for b, h, nq, nk, d in shapes["attention"]:
            q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
            k, v = (torch.randn(b, h, nk, d, device=device, dtype=dtype) for _ in range(2))
            rows.append(kernel_row("attention", [b, h, nq, nk, d], dtype, sync, repeats,
                                   lambda: kernels.flash.attention_op(q, k, v, d ** -0.5, False)[0],
                                   lambda: F.scaled_dot_product_attention(q, k, v),
                                   lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float())))
        for b, c, s in shapes["group_norm"]:
            x = torch.randn(b, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w, bias = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
            rows.append(kernel_row("group_norm_silu", [b, c, s, s], dtype, sync, repeats,
                                   lambda: kernels.gn.group_norm_op(x, w, bias, 32 if c % 32 == 0 else 8, 1e-5,
                                                                    True)[0],
                                   lambda: F.silu(F.group_norm(x, 32 if c % 32 == 0 else 8, w, bias, 1e-5)),
                                   lambda: F.silu(F.group_norm(x.float(), 32 if c % 32 == 0 else 8, w.float(),
                                                               bias.float(), 1e-5))))
        for cin, cout, s, stride in shapes["conv"]:
            x = torch.randn(2, cin, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(cout, cin, 3, 3, device=device, dtype=dtype) / (9 * cin) ** 0.5).contiguous(
                memory_format=torch.channels_last)
            bias = torch.randn(cout, device=device, dtype=dtype)
            rows.append(kernel_row("conv3x3", [2, cin, s, s, cout, stride], dtype, sync, repeats,
                                   lambda: kernels.conv.triton_conv2d(x, w, bias, stride, 1),
                                   lambda: F.conv2d(x, w, bias, stride, 1),
                                   lambda: F.conv2d(x.float(), w.float(), bias.float(), stride, 1)))
    return rows


def kernel_row(name, shape, dtype, sync, repeats, ours, theirs, exact):
    row = {"kernel": name, "shape": shape, "dtype": str(dtype).removeprefix("torch.")}
    try:
        sync()
        t0 = time.perf_counter()
        out = ours()
        sync()
        row["first_call_s"] = round(time.perf_counter() - t0, 4)
        ref = exact()
        row["rel_error"] = float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        row["torch_rel_error"] = float((theirs().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        row["triton_s"], row["torch_s"] = timed(ours, repeats, sync), timed(theirs, repeats, sync)
        row["torch_over_triton"] = round(row["torch_s"] / row["triton_s"], 3)
    except Exception as e:  # a kernel that fails at a shape is a finding, not the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
    print(json.dumps(row), flush=True)
    return row


def models(torch, cfgs, device, dtype):
    """Our UNet, VAE and text encoder with random weights (seed 0), and diffusers' UNet on the same weights when
    diffusers is installed."""
    from engine.models.clip import CLIPTextConfig, CLIPTextModel
    from engine.models.unet import UNet2DConditionModel, UNetConfig
    from engine.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    ours = {"unet": UNet2DConditionModel(UNetConfig.from_dict(cfgs["unet"])),
            "vae": AutoencoderKL(VAEConfig.from_dict(cfgs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(cfgs["text_encoder"]))}
    ours = {k: m.to(device, dtype).eval().requires_grad_(False) for k, m in ours.items()}
    try:
        import diffusers
    except ImportError:
        return ours, None
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in cfgs["unet"].items() if not k.startswith("_")})
    theirs.load_state_dict(ours["unet"].state_dict())
    return ours, theirs.to(device, dtype).eval().requires_grad_(False)


def pipeline_part(torch, cfgs, side, steps, device, dtype, repeats, sync, peak, state):
    """One CFG UNet step and a `steps`-step DDIM generation at side², ours (auto and torch kernels) and diffusers;
    state["pipe"] is our pipeline, for the VAE part."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine import schedule
    from engine.checkpoints import Components
    from engine.pipeline import Pipeline
    from engine.tokenizer import Tokenizer

    ours, theirs = models(torch, cfgs, device, dtype)
    chars = [chr(c) for c in range(97, 123)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    vocab_size = ours["text_encoder"].text_model.embeddings.token_embedding.weight.shape[0]
    vocab.update({f"x{i}</w>": i for i in range(len(vocab), vocab_size)})
    sched = schedule.SchedulerConfig.from_dict(cfgs["scheduler"])
    pipe = state["pipe"] = Pipeline(Components(ours["unet"], ours["vae"], ours["text_encoder"],
                                               Tokenizer(vocab, []), sched))
    lat = side // pipe.model.downscale
    x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
    t = torch.tensor([500] * 2, device=device)
    ctx = torch.randn(2, 77, cfgs["unet"]["cross_attention_dim"], device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        ours["unet"](x, t, ctx)
    flops = counter.get_total_flops()
    fast = "auto" if device == "cuda" else "triton"  # the dry run interprets the kernels the GPU compiles
    runs = {"ours_triton": (fast, lambda: ours["unet"](x, t, ctx)), "ours_torch": ("torch", lambda: ours["unet"](x, t, ctx))}
    out = {"unet_flops_per_step": flops, "latent": lat, "steps": steps, "what": (
        "step: one UNet call on a CFG batch of 2; generate: ours is Pipeline.generate (text encoder, DDIM, CFG 7.5, "
        "VAE decode), diffusers' is its UNet in a DDIMScheduler loop with CFG 7.5 and our VAE decode")}
    if theirs is not None:
        runs["diffusers_sdpa"] = ("torch", lambda: theirs(x, t, ctx).sample)
        a, b = ours["unet"](x, t, ctx).float(), theirs(x, t, ctx).sample.float()
        out["ours_vs_diffusers_step_rel_error"] = float((a - b).abs().max() / b.abs().max())
    for name, (mode, step) in runs.items():
        os.environ["ENGINE_KERNELS"] = mode
        peak(reset=True)
        s = timed(step, repeats, sync)
        out[f"{name}_step_s"], out[f"{name}_tflops"] = s, round(flops / s / 1e12, 3)
        out[f"{name}_step_peak_bytes"] = peak()
    for key in ("ours_triton", "ours_torch"):
        os.environ["ENGINE_KERNELS"] = runs[key][0]
        peak(reset=True)
        s = timed(lambda: pipe.generate("a red star", steps=steps, height=side, width=side, output="pt",
                                        progress=False), 1, sync)
        out[f"{key}_generate_s"], out[f"{key}_generate_it_s"] = s, round(steps / s, 2)
        out[f"{key}_generate_peak_bytes"] = peak()
    if theirs is not None:
        out.update(diffusers_generate(torch, theirs, ours, cfgs, lat, steps, device, dtype, sync, peak))
    os.environ["ENGINE_KERNELS"] = "auto"
    return out


def diffusers_generate(torch, unet, ours, cfgs, lat, steps, device, dtype, sync, peak):
    """diffusers' denoising loop (its UNet with SDPA, DDIMScheduler, CFG 7.5) and our VAE decode, as its pipeline
    runs it after the text encoder."""
    import diffusers

    sched = diffusers.DDIMScheduler.from_config(cfgs["scheduler"])
    ctx = torch.randn(2, 77, cfgs["unet"]["cross_attention_dim"], device=device, dtype=dtype)

    def run():
        sched.set_timesteps(steps)
        x = torch.randn(1, 4, lat, lat, device=device, dtype=dtype)
        for t in sched.timesteps:
            u, c = unet(torch.cat([x, x]), t, ctx).sample.chunk(2)
            x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
        return ours["vae"].decode(x / 0.18215)

    peak(reset=True)
    s = timed(run, 1, sync)
    return {"diffusers_sdpa_generate_s": s, "diffusers_sdpa_generate_it_s": round(steps / s, 2),
            "diffusers_sdpa_generate_peak_bytes": peak()}


def vae_part(torch, pipe, side, tiled_side, device, dtype, sync, peak):
    from engine import tiled_vae

    vae, f = pipe.model.vae, pipe.model.downscale
    out = {}
    for name, s, pixels in (("decode", side, None), ("tiled_decode", tiled_side, 0)):
        z = torch.randn(1, 4, s // f, s // f, device=device, dtype=dtype)
        peak(reset=True)
        out[f"{name}_side"] = s
        out[f"{name}_s"] = timed(lambda: tiled_vae.decode_latents(vae, z, pixels=pixels,
                                                                  tile=max(8, side // f // 2)), 1, sync)
        out[f"{name}_peak_bytes"] = peak()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, the Triton kernels interpreted")
    ap.add_argument("--out", type=Path, help="the JSON file (default bench/results/gpu_<device>.json)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from engine import kernels, ldm
    from engine.embedded import source_commit

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def peak(reset=False):
        if not cuda:
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated()

    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, dry run)"
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"device": name, "dry_run": args.dry_run, "torch": torch.__version__, "triton": triton_version,
              "diffusers": diffusers_version, "commit": source_commit(), "command": " ".join(["python bench/gpu.py",
                                                                                      *sys.argv[1:]]),
              "parts": {}, "errors": {}}
    repeats = 1 if args.dry_run else args.repeats
    if args.dry_run:
        cfgs = {**{k: {**v} for k, v in TINY_MODEL.items()}, "scheduler": ldm.preset("sd1")["scheduler"]}
        plan = dict(shapes=TINY, dtypes=[torch.float32], dtype=torch.float32, side=32, steps=2, tiled=128)
    else:
        cfgs = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in ldm.preset("sd1").items()}
        plan = dict(shapes=REAL, dtypes=[torch.float16, torch.bfloat16], dtype=torch.float16, side=512, steps=50,
                    tiled=2048)
    parts = [("kernels", lambda: kernel_rows(torch, kernels, plan["shapes"], plan["dtypes"], device, repeats, sync))]
    state = {}
    parts.append(("pipeline", lambda: pipeline_part(torch, cfgs, plan["side"], plan["steps"], device, plan["dtype"],
                                                    repeats, sync, peak, state)))
    parts.append(("vae", lambda: vae_part(torch, state["pipe"], plan["side"], plan["tiled"], device, plan["dtype"],
                                          sync, peak)))
    for part, fn in parts:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                result["parts"][part] = fn()
        except Exception:
            result["errors"][part] = traceback.format_exc(limit=3)[-2000:]
            print(result["errors"][part], file=sys.stderr)
        result[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or ROOT / "bench" / "results" / f"gpu_{slug}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']} s; {len(result['errors'])} part(s) failed)")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
