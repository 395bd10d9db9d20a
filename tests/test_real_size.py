"""Real-size single files (random weights at SD 1.5 and SDXL sizes) load with nothing beside them, in about
their own size of memory, and generate an image. Slow: writes multi-gigabyte files; run before a release."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from engine import clip_vocab, ldm
from test_ldm import clip_to_openclip, unet_to_ldm, vae_to_ldm

pytestmark = pytest.mark.slow


def _random(names_shapes: dict, dtype) -> dict:
    """Weights that keep activations tame through many layers: norms at identity, the rest small."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in names_shapes.items():
        if "norm" in k or "ln_" in k:
            out[k] = (torch.ones if k.endswith("weight") else torch.zeros)(shape, dtype=dtype)
        else:
            out[k] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return out


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def write_reference_file(version: str, path, dtype):
    """The family's reference model (engine.ldm.preset), random, in diffusers layout, written through the
    test-side inverse key maps (checked against diffusers' converters in test_ldm) as one LDM-layout file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = ldm.preset(version)
    with torch.device("meta"):
        unet = _shapes(UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if not k.startswith("_")}))
        vae = _shapes(AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if not k.startswith("_")}))
        text = _shapes(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])))
        text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
        if version == "sdxl":
            big = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
            text_2 = {"text_model." + k: tuple(v.shape) for k, v in big.text_model.state_dict().items()
                      if not k.endswith("position_ids")}
            text_2["text_projection.weight"] = tuple(big.text_projection.weight.shape)
    sd = {**unet_to_ldm(_random(unet, dtype), cfg["unet"]), **vae_to_ldm(_random(vae, dtype), cfg["vae"])}
    if version == "sdxl":
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in _random(text, dtype).items()})
        sd.update(clip_to_openclip(_random(text_2, dtype), "conditioner.embedders.1.model."))
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in _random(text, dtype).items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


CHILD = textwrap.dedent("""
    import json, sys, time, torch, engine
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    before = status("VmRSS:")
    t0 = time.perf_counter()
    pipe = engine.load(path, dtype=dtype)
    load_s, peak = time.perf_counter() - t0, status("VmHWM:")
    t0 = time.perf_counter()
    x = pipe.generate("a photo of a cat", steps=2, guidance=5.0, height=64, width=64, output="pt", progress=False)
    print(json.dumps({"load_s": load_s, "load_rss": peak - before, "generate_s": time.perf_counter() - t0,
                      "finite": bool(torch.isfinite(x).all()), "shape": list(x.shape),
                      "family": type(pipe.model.text_encoder_2).__name__}))
""")


@pytest.mark.parametrize("version,dtype", [("sd1", "float32"), ("sdxl", "float16")])
def test_real_size_single_file_loads_in_its_own_size(tmp_path, version, dtype):
    if clip_vocab.open_clip_bpe() is None and not clip_vocab.cached_folders():
        pytest.skip("no CLIP vocabulary here (pip install --no-deps open-clip-torch)")
    path = write_reference_file(version, tmp_path / f"{version}.safetensors", getattr(torch, dtype))
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(version, f"file {size / 2**30:.2f} GiB", json.dumps(got))
    assert got["finite"] and got["shape"] == [1, 3, 64, 64]
    assert got["family"] == ("CLIPTextModelWithProjection" if version == "sdxl" else "NoneType")
    assert got["load_rss"] <= 1.2 * size, (got["load_rss"] / size)
