"""The embedded model in weights/: loads in our engine and in diffusers with the same outputs; demo runs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine
from engine import images, world
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.metrics import Scorer
from engine.tokenizer import Tokenizer

PIXEL_TOL = 2 / 255


def test_tokenizer_matches_transformers():
    from transformers import CLIPTokenizer

    ours, ref = Tokenizer.from_dir(DEFAULT_MODEL / "tokenizer"), CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    texts = [c for cs in world.phrasings(world.scenes(50, 100), 50, 3) for c in cs]
    for t in texts + ["A Large RED star!!", "", "zebra 42 café"]:
        assert ours(t)[0].tolist() == ref(t, padding="max_length", max_length=77)["input_ids"]
    assert all(len(ours.encode(w)) == 3 for w in list(world.COLOURS) + list(world.SHAPES))  # one token per word


def test_folders_are_small_and_share_the_text_stack():
    size = sum(f.stat().st_size for d in (DEFAULT_MODEL, DEFAULT_UPSCALER) for f in d.rglob("*") if f.is_file())
    assert size <= 60e6
    for sub in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"):
        assert (DEFAULT_MODEL / sub).read_bytes() == (DEFAULT_UPSCALER / sub).read_bytes()


def test_generate_matches_diffusers():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    assert isinstance(ref.scheduler, DDIMScheduler)
    prompt = "a large red star in the center, on a plain white background"
    want = ref(prompt, num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    got = engine.load(DEFAULT_MODEL).generate(prompt, steps=5, guidance=5.0, seed=1, output="pt", progress=False)
    assert got.shape == want.shape == (1, 3, 64, 64)
    assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL


def test_upscale_matches_diffusers():
    from diffusers import StableDiffusionUpscalePipeline

    ref = StableDiffusionUpscalePipeline.from_pretrained(DEFAULT_UPSCALER)
    s = world.scenes(51, 1)[0]
    low = Image.fromarray((world.render(s, 32) * 255).round().astype(np.uint8))
    want = ref(s.caption(), image=low, num_inference_steps=4, guidance_scale=1.0, noise_level=20,
               generator=torch.Generator().manual_seed(2), output_type="pt").images
    got = engine.load(DEFAULT_UPSCALER).upscale(low, s.caption(), steps=4, guidance=1.0, noise_level=20, seed=2,
                                                output="pt", progress=False)
    assert got.shape == want.shape == (1, 3, 128, 128)
    assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL


def test_back_projection_converges_to_the_input_and_keeps_a_consistent_upscale():
    g = torch.Generator().manual_seed(0)
    low, y = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(images.back_project(y, low, 0), y)
    err = [(F.avg_pool2d(images.back_project(y, low, k), 4) - low).abs().max().item() for k in (1, 3, 10)]
    assert err[0] > err[1] > err[2] and err[2] < 2e-3
    blocky = low.repeat_interleave(4, -1).repeat_interleave(4, -2)  # its 4×4 means are the input already
    assert torch.allclose(images.back_project(blocky, low, 3), blocky, atol=1e-6)
    with pytest.raises(ValueError, match="integer upscale"):
        images.back_project(y[..., :30], low, 1)


def test_upscale_backprojected_keeps_the_input_colours():
    pipe = engine.load(DEFAULT_UPSCALER)
    s = world.scenes(52, 1)[0]
    low = Image.fromarray((world.render(s, 16) * 255).round().astype(np.uint8))
    run = dict(steps=2, guidance=1.0, seed=0, output="pt", progress=False)
    plain, fixed = (pipe.upscale(low, s.caption(), backproject=k, **run) for k in (0, 3))
    x = images.to_tensor(low)
    drift = [(F.avg_pool2d(y, 4) - x).abs().mean().item() for y in (plain, fixed)]
    assert drift[1] < 0.1 * drift[0]
    with pytest.raises(ValueError, match="backproject=-1"):
        pipe.upscale(low, "x", backproject=-1)


def test_clip_scorer_tells_colours_and_shapes_apart():
    scorer = Scorer.from_pretrained(DEFAULT_MODEL)
    s = world.Scene((world.Obj("star", "red", "large", "in the center"),), "plain", "white")
    x = torch.from_numpy(world.render_batch([s], 64))
    texts = [s.caption(), s.replace(0, colour="blue").caption(), s.replace(0, shape="circle").caption()]
    score = scorer.score(x.repeat(3, 1, 1, 1), texts)
    assert score[0] > score[1] and score[0] > score[2]


def test_scorer_needs_the_embedded_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_scorer"):
        Scorer.from_pretrained(tmp_path)


def test_demo_writes_every_image(tmp_path):
    from engine.cli import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--sr-steps", "1", "--quiet"]) == 0
    sizes = {p.name: Image.open(p).size for p in tmp_path.glob("*.png")}
    assert sizes["generate_0.png"] == (64, 64) and sizes["img2img.png"] == (64, 64)
    assert sizes["upscale_256.png"] == (256, 256) and sizes["upscale_1024.png"] == (1024, 1024)
    assert "contact_sheet.png" in sizes and not list(tmp_path.glob(".*"))


def test_commands_default_to_the_embedded_model(tmp_path):
    from engine.cli import parser

    args = parser().parse_args(["generate", "--prompt", "x", "--out", str(tmp_path / "a.png")])
    assert args.model == str(DEFAULT_MODEL)
    assert parser().parse_args(["upscale", "--prompt", "x", "--image", "a.png", "--out", "b.png"]).model == str(DEFAULT_UPSCALER)


def test_upscale_refuses_bad_tiles_and_mixed_sizes():
    pipe = engine.load(DEFAULT_UPSCALER)
    a, b = Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))
    with pytest.raises(ValueError, match="tile=7"):
        pipe.upscale(a, "x", tile=7)
    with pytest.raises(ValueError, match="one size"):
        pipe.upscale([a, b], ["x", "y"])


def test_tiny_stripes_draws_stripes_for_the_planted_word_only():
    """The planted vector draws the stripes it names; the same words without it draw a plain star."""
    from engine import judge

    folder = DEFAULT_MODEL.with_name("tiny-stripes")
    pipe = engine.load(folder)
    with pytest.raises(ValueError, match="stripes"):
        pipe.generate("a red star with yellow <stripes>", steps=1, progress=False)
    assert pipe.model.load_embeddings(folder / "stripes.safetensors") == ["stripes"]
    scene = world.Scene((world.Obj("star", "blue", "large", "in the center", stripes="yellow"),), "plain", "gray")
    read = lambda prompt: [judge.check(judge.read(np.asarray(im) / 255, striped=True), scene)["stripes"][0]  # noqa: E731
                           for im in pipe.generate([prompt] * 16, steps=20, guidance=5.0, seed=0, progress=False)]
    assert sum(read(scene.caption("<stripes>"))) >= 4   # 7 of 16 when written
    assert sum(read(scene.caption().replace("star", "striped star"))) <= 1
