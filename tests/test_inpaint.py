"""Inpainting: a 9-channel inpainting UNet and the legacy way with an ordinary one, against diffusers'
StableDiffusionInpaintPipeline; the CLI command; blend with an inpainting model."""
import numpy as np
import pytest
import torch
from PIL import Image

import engine

PIXEL_TOL = 2 / 255


def _pixels(x):
    return (x / 2 + 0.5).clamp(0, 1)


def _inputs(h=64, w=96):
    image = Image.fromarray((np.random.RandomState(1).rand(h, w, 3) * 255).astype(np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 3: w - 8] = 255
    return image, Image.fromarray(m)


def _reference(folder):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("kind,strength,eta", [("sd1_inpaint", 1.0, 0.0), ("sd1_inpaint", 0.6, 0.5), ("sd1", 1.0, 0.0),
                                               ("sd1", 0.7, 0.0)])
def test_inpaint_matches_diffusers(tiny, kind, strength, eta):
    """Non-square, two prompts, a negative prompt; 9-channel and legacy (4-channel) inpainting."""
    folder, _ = tiny(kind)
    image, mask = _inputs()
    kw = dict(strength=strength, num_inference_steps=8, guidance_scale=6.0, eta=eta, height=64, width=96,
              generator=torch.Generator().manual_seed(7), output_type="pt")
    want = _reference(folder)(["a red star", "st"], image=image, mask_image=mask, negative_prompt=["a", "a"], **kw).images
    got = engine.load(folder).inpaint(image, mask, ["a red star", "st"], negative="a", strength=strength, steps=8,
                                      guidance=6.0, eta=eta, seed=7, output="pt", progress=False)
    assert got.shape == want.shape and want.std() > 0.05
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_inpainting_model_refuses_other_methods(tiny):
    pipe = engine.load(tiny("sd1_inpaint")[0])
    assert pipe.model.is_inpainting
    with pytest.raises(ValueError, match="inpainting model"):
        pipe.generate("a", steps=2, progress=False)


def test_inpaint_cli(tiny, tmp_path, cli_error):
    from engine.cli import main

    folder, _ = tiny("sd1_inpaint")
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    argv = ["inpaint", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--prompt", "a red star", "--steps", "4", "--seed", "3", "--quiet"]
    assert main(argv + ["--out", str(out)]) == 0
    api = engine.load(folder).inpaint(image, mask, "a red star", steps=4, seed=3, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api[0]))
    out.unlink()
    Image.new("L", (50, 64)).save(tmp_path / "bad.png")
    cli_error(argv[:6] + [str(tmp_path / "bad.png")] + argv[7:] + ["--out", str(tmp_path / "x.png")],
              "mask")


def blend_128(model, repaint=0):
    """A 128² blend of a random image with the base model in both stages (64², then 128²): (result, image,
    mask)."""
    from engine import blended as B

    src = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(128, 128)
    mask[32:96, 40:100] = 1
    opts = B.Options(steps=3, candidates=1, repaint=repaint, stage_steps=4, upscaler="bicubic",
                     stage_model="base", guidance=4.0)
    return B.MultiStage(model, None).edit(src, mask.numpy(), "a red star", opts, progress=False), src, mask


def test_blend_gives_an_inpainting_model_its_mask_channels(tiny, monkeypatch):
    """Stage 1 and a base-model stage both feed the UNet the repaint mask and the masked image's latent."""
    import torch.nn.functional as F

    from engine.model import Model

    model = engine.load(tiny("sd1_inpaint")[0]).model
    seen, real = [], Model.inpainting_denoiser

    def spy(self, den, image, repaint, batch=1, generator=None):
        out = real(self, den, image, repaint, batch, generator)
        seen.append((image, repaint, batch, out.concat))
        return out
    monkeypatch.setattr(Model, "inpainting_denoiser", spy)
    res, src, mask = blend_128(model)
    assert torch.equal(res.image * (1 - mask), src * (1 - mask))
    assert [image.shape[-1] for image, *_ in seen] == [64, 128]
    for image, repaint, batch, extra in seen:
        assert extra.shape == (batch, 5, image.shape[-2] // 8, image.shape[-1] // 8)
        assert torch.equal(extra[:, :1], F.interpolate(repaint, size=extra.shape[2:]).expand(batch, 1, -1, -1))
        assert torch.allclose(extra[:1, 1:], model.encode(image * (repaint < 0.5)))
        assert 0 < repaint.mean() < 1


def test_inpaint_without_a_mask_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="mask: need a mask image"):
        engine.load(tiny("sd1_inpaint")[0]).inpaint(torch.zeros(1, 3, 64, 64), None, "a", steps=2, progress=False)
