"""Ours vs the CPU runtimes people pick for Stable Diffusion: one CFG step (batch 2) of the SD1.5 UNet.

    python bench/bench_cpu_peers.py [--repeats 5] [--latent 64] [--threads 2] [--runners ours,openvino_f32,...]

One set of random weights (bench/cache/sd15_unet, written once) runs as: our UNet in fp32 and, where the CPU
has native bf16 (AVX-512-bf16 or AMX), in bf16; diffusers' UNet; and our UNet exported once to ONNX with
torch's own ops, as a user's export would be (bench/cache/sd15_unet_onnx_<latent>), under ONNX Runtime and
under OpenVINO, with OpenVINO's precision hint at f32 and at its default for this CPU. Runs alternate in a
rotating order, median of --repeats each, every runner on
the same inputs and thread count. Each output is compared with our fp32 output: the f32 runners must agree to
1e-3 of the output's largest value (else the bench fails); the reduced-precision ones are reported. One-time
costs (ONNX export, load, compile) are reported apart from the step time. Writes bench/results/cpu_peers.json
(or --out). OpenVINO, ONNX Runtime and onnx are bench-only: pip install -e ".[peers]".
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_unet import weights  # noqa: E402

from engine.checkpoints import load_component  # noqa: E402
from engine.embedded import source_commit  # noqa: E402
from engine.kernels.cpu import cpuinfo  # noqa: E402
from engine.profile import cpu_name  # noqa: E402

RUNNERS = ("ours", "ours_bf16", "diffusers", "onnxruntime", "openvino_f32", "openvino_default")
F32_TOLERANCE = 1e-3
INPUTS = ("sample", "timestep", "encoder_hidden_states")


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512-bf16 or AMX), from its Linux flags."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo("flags").split()))


def export_onnx(model: torch.nn.Module, inputs: tuple, path: Path) -> float:
    """Our UNet as ONNX (weights in an external file), once; returns the seconds it took (0 when cached)."""
    if path.exists():
        return 0.0
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # torch's own ops, which ONNX has: what a user exporting a UNet gives these runtimes
    with (tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad(),
          mock.patch.dict(os.environ, {"ENGINE_KERNELS": "torch"})):
        torch.onnx.export(model, inputs, f"{tmp}/unet.onnx", dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=["out"])
        partial = path.with_suffix(".partial")  # the graph is renamed into place last: a cut-off export re-runs
        onnx.save(onnx.load(f"{tmp}/unet.onnx"), str(partial), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=path.name + ".data")
        partial.rename(path)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated subset of {','.join(RUNNERS)}")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "cache"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_peers.json"))
    args = ap.parse_args()
    chosen = [r for r in args.runners.split(",") if r]
    unknown = sorted(set(chosen) - set(RUNNERS))
    if unknown or "ours" not in chosen:
        sys.exit(f"error: --runners must include ours and name only {', '.join(RUNNERS)} (got {args.runners})")
    if "ours_bf16" in chosen and not native_bf16():
        chosen.remove("ours_bf16")
        print("this CPU has no native bf16 (AVX-512-bf16 or AMX): ours_bf16 skipped")
    torch.set_num_threads(args.threads)
    stamp = {"commit": source_commit(), "model_version": "SD1.5 UNet architecture, random weights (seed 0)",
             "command": " ".join(["python bench/bench_cpu_peers.py", *sys.argv[1:]])}

    folder = weights(Path(args.cache))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.latent, args.latent, generator=g)
    t = torch.tensor(500)
    ctx = torch.randn(2, 77, 768, generator=g)
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    one_time, runners = {}, {}

    t0 = time.perf_counter()
    ours = load_component(folder, "unet")
    one_time["ours_load_s"] = time.perf_counter() - t0
    runners["ours"] = lambda: ours(x, t, ctx)
    onnx_path = Path(args.cache) / f"sd15_unet_onnx_{args.latent}" / "unet.onnx"  # input shapes are fixed
    if {"onnxruntime", "openvino_f32", "openvino_default"} & set(chosen):
        one_time["onnx_export_s"] = export_onnx(ours, (x, t, ctx), onnx_path)
        gc.collect()
    if "ours_bf16" in chosen:
        t0 = time.perf_counter()
        ours_bf16 = load_component(folder, "unet", torch.bfloat16)
        one_time["ours_bf16_load_s"] = time.perf_counter() - t0
        xb, ctxb = x.bfloat16(), ctx.bfloat16()
        runners["ours_bf16"] = lambda: ours_bf16(xb, t, ctxb)
    if "diffusers" in chosen:
        from diffusers import UNet2DConditionModel

        t0 = time.perf_counter()
        ref = UNet2DConditionModel.from_pretrained(folder).eval()
        one_time["diffusers_load_s"] = time.perf_counter() - t0
        runners["diffusers"] = lambda: ref(x, t, ctx).sample
    if "onnxruntime" in chosen:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        one_time["onnxruntime_session_s"] = time.perf_counter() - t0
        runners["onnxruntime"] = lambda: torch.from_numpy(sess.run(None, feed)[0])
    ov_precision = {}
    openvino_runs = [(n, hint) for n, hint in (("openvino_f32", "f32"), ("openvino_default", None)) if n in chosen]
    if openvino_runs:
        import openvino as ov

        core = ov.Core()
    for name, hint in openvino_runs:
        config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        t0 = time.perf_counter()
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        one_time[f"{name}_compile_s"] = time.perf_counter() - t0
        ov_precision[name] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16
        request = compiled.create_infer_request()
        runners[name] = (lambda r: lambda: torch.from_numpy(r.infer(feed)[0].copy()))(request)
        gc.collect()

    names = [r for r in RUNNERS if r in runners]
    with torch.inference_mode():
        from torch.utils.flop_counter import FlopCounterMode

        # the model's own FLOPs, with direct convolutions (Winograd's are fewer), for every runner
        with FlopCounterMode(display=False) as fc, mock.patch.dict(os.environ, {"ENGINE_KERNELS": "torch"}):
            runners["ours"]()
        gflop = fc.get_total_flops() / 1e9
        expected = runners["ours"]().float()
        scale = expected.abs().max().item()
        rel_diff, first_s = {}, {}
        for name in names:  # first call: the warm-up, and the agreement check
            t0 = time.perf_counter()
            rel_diff[name] = (runners[name]().float() - expected).abs().max().item() / scale
            first_s[name] = time.perf_counter() - t0
        times = {name: [] for name in names}
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    reduced = {"ours_bf16"} | {n for n, p in ov_precision.items() if p != "f32"}
    disagree = [n for n in names if n not in reduced and rel_diff[n] > F32_TOLERANCE]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "onnxruntime", "openvino", "onnx"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    result = {
        "benchmark": "SD1.5 UNet, one CFG step (batch 2), random weights, one file for every runner",
        "cpu": cpu_name(), "native_bf16": native_bf16(), "threads": args.threads, "latent": [args.latent] * 2,
        "batch": 2, "repeats": args.repeats, "versions": versions, "gflop_per_step": gflop,
        "openvino_inference_precision": ov_precision, "one_time_s": one_time, "first_call_s": first_s,
        "max_rel_diff_vs_ours_fp32": rel_diff, "f32_tolerance": F32_TOLERANCE, "seconds": times, "median_s": med,
        "ratio_ours_over": {k: med["ours"] / v for k, v in med.items() if k != "ours"},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **stamp,
    }
    if "ours_bf16" in med:
        result["ratio_ours_bf16_over"] = {k: med["ours_bf16"] / v for k, v in med.items() if k != "ours_bf16"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cpu_name()}, {args.threads} threads, {gflop:.0f} GFLOP per step; one-time: "
          + ", ".join(f"{k} {v:.1f}" for k, v in one_time.items()))
    for k in names:
        print(f"{k:>17}: median {med[k]:7.3f} s  {gflop / med[k]:6.1f} GFLOP/s  rel diff {rel_diff[k]:.1e}  "
              f"runs {[round(s, 2) for s in times[k]]}")
    print(f"OpenVINO precision: {ov_precision}  → {out}")
    if disagree:
        sys.exit(f"error: {', '.join(disagree)} disagree with ours beyond {F32_TOLERANCE} relative")


if __name__ == "__main__":
    main()
