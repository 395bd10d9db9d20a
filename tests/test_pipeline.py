"""End-to-end parity with diffusers pipelines on the same folders (CPU, fp32), and the loader's components."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine.checkpoints import load as load_components

PIXEL_TOL = 2 / 255  # the end-to-end bound on [0, 1] pixels
MODEL_TOL = 1e-4     # the bound on UNet / VAE / text-encoder outputs


def _pixels(x):
    """(B, 3, H, W) in [-1, 1] → [0, 1] as diffusers' postprocess clamps it."""
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("kind,size", [("sd1", (64, 64)), ("sd2", (64, 96))])
def test_generate_matches_diffusers(tiny, kind, size):
    folder, ref = tiny(kind)
    h, w = size
    want = ref("a red star", num_inference_steps=10, guidance_scale=7.5, height=h, width=w,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = engine.load(folder).generate("a red star", steps=10, guidance=7.5, seed=3, height=h, width=w,
                                       output="pt", progress=False)
    assert got.shape == want.shape
    assert want.std() > 0.05  # a real image, not a saturated blank
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_generate_negative_prompt_and_eta(tiny):
    folder, ref = tiny("sd1")
    want = ref(["a star", "red"], negative_prompt=["st", "a"], num_inference_steps=6, guidance_scale=5.0, eta=0.7,
               height=64, width=64, generator=torch.Generator().manual_seed(5), output_type="pt").images
    got = engine.load(folder).generate(["a star", "red"], negative=["st", "a"], steps=6, guidance=5.0, eta=0.7,
                                       seed=5, height=64, width=64, output="pt", progress=False)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_img2img_matches_diffusers(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    folder, _ = tiny("sd1")
    ref = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    want = ref("a red star", image=image, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = engine.load(folder).img2img(image, "a red star", strength=0.6, steps=10, guidance=7.5, seed=4,
                                      output="pt", progress=False)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_upscale_matches_diffusers(tiny):
    folder, ref = tiny("x4")
    image = Image.fromarray((np.random.RandomState(0).rand(16, 24, 3) * 255).astype(np.uint8))
    want = ref("a red star", image=image, num_inference_steps=10, guidance_scale=7.5, noise_level=20,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = engine.load(folder).upscale(image, "a red star", steps=10, guidance=7.5, noise_level=20, seed=3,
                                      output="pt", progress=False)
    assert got.shape == want.shape == (1, 3, 64, 96)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


@pytest.mark.parametrize("kind", ["sd1", "sd2", "x4"])
def test_components_match_reference(tiny, kind):
    """UNet, VAE encode/decode and text encoder loaded by our loader vs the diffusers/transformers objects."""
    folder, ref = tiny(kind)
    ours = load_components(folder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ids = ref.tokenizer(["a red star!"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ours.tokenizer(["a red star!"]), ids)
        ctx = ref.text_encoder(ids)[0]
        assert (ours.text_encoder(ids) - ctx).abs().max().item() <= MODEL_TOL

        cin = ref.unet.config.in_channels
        x = torch.randn(2, cin, 8, 12, generator=g)
        ctx2 = ctx.repeat(2, 1, 1)
        labels = torch.tensor([20, 300]) if kind == "x4" else None
        want = ref.unet(x, torch.tensor([999, 1]), ctx2, class_labels=labels).sample
        got = ours.unet(x, torch.tensor([999, 1]), ctx2, labels)
        assert (got - want).abs().max().item() <= MODEL_TOL

        img = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
        dist = ref.vae.encode(img).latent_dist
        mean, logvar = ours.vae.encode(img)
        assert (mean - dist.mean).abs().max().item() <= MODEL_TOL
        assert (logvar - dist.logvar).abs().max().item() <= MODEL_TOL
        assert (ours.vae.decode(dist.mean) - ref.vae.decode(dist.mean).sample).abs().max().item() <= MODEL_TOL


def test_same_seed_is_bit_identical(tiny):
    folder, _ = tiny("sd2")
    pipe = engine.load(folder)
    run = lambda seed: pipe.generate("a star", steps=4, seed=seed, height=64, width=64, output="pt", progress=False)
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pipeline_imports_no_reference_library(tiny):
    folder, _ = tiny("sd1")
    code = ("import sys, engine; p = engine.load(sys.argv[1]); p.generate('a star', steps=2, height=64, width=64, "
            "progress=False); bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


def test_cli_writes_image_and_profile(tiny, tmp_path, capsys):
    from engine.cli import main

    folder, _ = tiny("sd1")
    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red star", "--steps", "3", "--out", str(out),
                 "--profile", str(tmp_path / "prof"), "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    printed = capsys.readouterr().out
    for stage in ("tokenize", "text encode", "unet step 3", "vae decode"):
        assert stage in printed
