"""The σ-space samplers (engine.ksample) against diffusers' schedulers, end to end on the tiny folders."""
import json
import shutil

import pytest
import torch

import engine

PIXEL_TOL = 2 / 255
SCHEDULERS = {"euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
              "heun": ("HeunDiscreteScheduler", {}),
              "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
              "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
              "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {})}
CASES = [(s, k) for s in SCHEDULERS for k in ("default", "karras", "exponential")
         if s not in ("euler_a", "lcm") or k == "default"]


def _with(ref, scheduler):
    """A copy of the shared reference pipeline with another scheduler (the original stays as it was)."""
    out = type(ref)(**{**ref.components, "scheduler": scheduler})
    out.set_progress_bar_config(disable=True)
    return out


def _reference(ref, folder, sampler, schedule):
    import diffusers

    name, extra = SCHEDULERS[sampler]
    kw = {} if schedule == "default" else {f"use_{schedule}_sigmas": True}
    return _with(ref, getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler", **extra, **kw))


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("sampler,schedule", CASES)
def test_generate_matches_the_diffusers_scheduler(tiny, kind, sampler, schedule):
    folder, ref = tiny(kind)
    ref = _reference(ref, folder, sampler, schedule)
    kw = dict(negative_prompt="st", num_inference_steps=7, guidance_scale=6.0, height=64, width=96)
    want = ref("a red star", generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    got = engine.load(folder).generate("a red star", negative="st", steps=7, guidance=6.0, seed=3, height=64,
                                       width=96, output="pt", progress=False, sampler=sampler, schedule=schedule)
    assert want.std() > 0.05
    assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL


def test_a_config_without_timestep_spacing_takes_each_schedulers_default(tiny, tmp_path):
    """Hub configs written before timestep_spacing existed: DDIM walks "leading", diffusers' Euler "linspace"."""
    folder, ref = tiny("sd1")
    bare = shutil.copytree(folder, tmp_path / "bare")
    path = bare / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    del cfg["timestep_spacing"]
    path.write_text(json.dumps(cfg))
    pipe = engine.load(bare)
    for sampler in ("ddim", "euler"):
        if sampler == "ddim":
            from diffusers import DDIMScheduler as cls
        else:
            from diffusers import EulerDiscreteScheduler as cls
        sched = cls.from_pretrained(bare, subfolder="scheduler")
        want = _with(ref, sched)("a red star", num_inference_steps=6, generator=torch.Generator().manual_seed(1), height=64, width=64,
                   output_type="pt").images
        got = pipe.generate("a red star", steps=6, seed=1, output="pt", progress=False, sampler=sampler)
        assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL, sampler
    assert sched.config.timestep_spacing == "linspace"


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="lms"), "sampler='lms': use one of ddim, euler"),
    (dict(schedule="beta"), "schedule='beta'"),
    (dict(sampler="euler", eta=0.5), "eta=0.5 is DDIM's"),
    (dict(schedule="karras"), "DDIM walks its own"),
    (dict(sampler="lcm", schedule="karras"), "distillation timesteps"),
    (dict(sampler="lcm", steps=60), "takes 1 to 50 steps"),
    (dict(sampler="dpmpp_2m", steps=999), "takes 1 to 500 steps"),
])
def test_sampler_arguments_are_checked(kwargs, match):
    pipe = engine.load()
    with pytest.raises(ValueError, match=match):
        pipe.generate("a red star", **{"steps": 2, "progress": False, **kwargs})


def test_the_cli_lists_every_sampler_and_schedule():
    from engine import flags, ksample

    assert flags.SAMPLER_NAMES == ("ddim", *ksample.SAMPLERS) and flags.SCHEDULE_NAMES == ksample.SCHEDULES


def test_half_precision_models_run_every_sampler(tiny):
    """The UNet runs in the model's dtype, the steps in float32: an fp16 model gives the fp32 image closely."""
    folder, _ = tiny("sd1")
    full, half = engine.load(folder), engine.load(folder, dtype=torch.float16)
    for sampler in ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm"):
        a, b = (p.generate("a red star", steps=5, seed=2, output="pt", progress=False, sampler=sampler)
                for p in (full, half))
        assert b.dtype == torch.float32 and (a - b.float()).abs().max() < 0.05, sampler


@pytest.mark.parametrize("sampler,schedule", [("euler", "default"), ("euler_a", "default"), ("heun", "karras"),
                                              ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "exponential"),
                                              ("unipc", "default"), ("lcm", "default")])
def test_img2img_inpaint_and_upscale_match_diffusers(tiny, sampler, schedule):
    """img2img from strength 0.6, an inpainting model from strength 0.7 and the x4 upscaler, each against its
    diffusers pipeline with the matching scheduler."""
    import numpy as np
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    rs = np.random.RandomState(5)
    image = Image.fromarray((rs.rand(64, 96, 3) * 255).astype(np.uint8))
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 30:80] = 255
    mask = Image.fromarray(mask)
    low = Image.fromarray((rs.rand(16, 24, 3) * 255).astype(np.uint8))
    kw = dict(num_inference_steps=8, guidance_scale=5.0, output_type="pt")
    ours = dict(steps=8, guidance=5.0, seed=4, output="pt", progress=False, sampler=sampler, schedule=schedule)
    runs = []
    folder, ref = tiny("sd1")
    ref = _reference(StableDiffusionImg2ImgPipeline(**ref.components), folder, sampler, schedule)
    runs.append((ref("a red star", image=image, strength=0.6, generator=torch.Generator().manual_seed(4), **kw),
                 engine.load(folder).img2img(image, "a red star", strength=0.6, **ours)))
    folder, ref = tiny("sd1_inpaint")
    ref = _reference(StableDiffusionInpaintPipeline(**ref.components), folder, sampler, schedule)
    runs.append((ref("a red star", image=image, mask_image=mask, strength=0.7, height=64, width=96,
                     generator=torch.Generator().manual_seed(4), **kw),
                 engine.load(folder).inpaint(image, mask, "a red star", strength=0.7, **ours)))
    folder, ref = tiny("x4")
    ref = _reference(ref, folder, sampler, schedule)
    runs.append((ref("a red star", image=low, noise_level=20, generator=torch.Generator().manual_seed(4), **kw),
                 engine.load(folder).upscale(low, "a red star", noise_level=20, **ours)))
    for want, got in runs:
        assert want.images.std() > 0.05
        assert ((got / 2 + 0.5).clamp(0, 1) - want.images).abs().max().item() <= PIXEL_TOL


def test_legacy_inpainting_keeps_ddim(tiny):
    with pytest.raises(ValueError, match="use sampler ddim, or an inpainting model"):
        engine.load(tiny("sd1")[0]).inpaint(torch.zeros(1, 3, 64, 64), torch.ones(64, 64), "a", steps=2,
                                            sampler="euler", progress=False)


def test_zero_terminal_snr_models_sample_with_every_sampler():
    """The embedded model has ᾱ = 0 at its top step (zero terminal SNR): σ there is taken nearly, not exactly,
    infinite, as diffusers does, and its Euler and DPM++ images are diffusers'."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from engine.embedded import DEFAULT_MODEL

    pipe = engine.load()
    assert pipe.model.scheduler.rescale_betas_zero_snr
    caption = "a large red star in the center, on a plain white background"
    for sampler in ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm"):
        assert torch.isfinite(pipe.generate(caption, steps=6, guidance=5.0, output="pt", progress=False,
                                            sampler=sampler)).all(), sampler
    ref = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    for sampler, cls in (("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)):
        ref.scheduler = cls.from_pretrained(DEFAULT_MODEL, subfolder="scheduler")
        want = ref(caption, num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        got = pipe.generate(caption, steps=6, guidance=5.0, output="pt", progress=False, sampler=sampler)
        assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL, sampler


def test_heun_on_a_zero_terminal_snr_model_starts_with_an_euler_step():
    """The embedded model's schedule has ᾱ_T ≈ 0 (σ_max ≈ 4096): Heun's mean of two slopes across that first
    step overshoots by about σ_max / σ_1 and gave noise at 10–25 steps; an Euler first step gives the image."""
    import engine
    from engine.metrics import psnr

    pipe = engine.load()
    assert pipe.model.scheduler.rescale_betas_zero_snr
    run = dict(guidance=5.0, seed=0, output="pt", progress=False)
    prompt = "a large red star in the center, on a plain white background"
    ref = pipe.generate(prompt, steps=50, **run)
    assert psnr(pipe.generate(prompt, steps=10, sampler="heun", **run), ref).item() > 28


def test_lcm_reads_its_distillation_fields_from_the_scheduler_config(tiny, tmp_path):
    """An LCM-distilled model's scheduler_config.json: original_inference_steps and timestep_scaling."""
    from diffusers import LCMScheduler

    folder, ref = tiny("sd1")
    lcm = shutil.copytree(folder, tmp_path / "lcm")
    path = lcm / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "original_inference_steps": 8,
                                "timestep_scaling": 0.5}))
    pipe = _with(ref, LCMScheduler.from_pretrained(lcm, subfolder="scheduler"))
    assert pipe.scheduler.config.original_inference_steps == 8
    kw = dict(num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    want = pipe("a red star", generator=torch.Generator().manual_seed(1), output_type="pt", **kw).images
    got = engine.load(lcm).generate("a red star", steps=4, guidance=1.0, seed=1, output="pt", progress=False,
                                    sampler="lcm")
    assert ((got / 2 + 0.5).clamp(0, 1) - want).abs().max().item() <= PIXEL_TOL
    from engine import ksample  # the fields change the grid (the tiny model's image hardly): the test can fail

    grids = [ksample.lcm_grid(engine.load(f).model.scheduler, 4).timesteps.tolist() for f in (lcm, folder)]
    assert grids[0] == pipe.scheduler.timesteps.tolist() != grids[1]
