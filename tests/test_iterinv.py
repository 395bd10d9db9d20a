"""IterInv (SR-stage inversion, paper and fast solvers), the cascade, DiffEdit, and the iterinv CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine
from engine import diffedit, images, iterinv, metrics, schedule as S, world
from engine.cli import main
from engine.denoiser import Denoiser, constant
from engine.invert import invert
from engine.embedded import DEFAULT_UPSCALER
from engine.sample import ddim

# the tiny-x4 / SD x4-upscaler scheduler: v-prediction, ᾱ[0] as the final alpha
V = S.SchedulerConfig(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
EPS = S.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)


class Toy:
    """A 'UNet' whose output depends nonlinearly on x and t (so inversion is not exact for plain DDIM)."""

    def __init__(self, c=4):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(c, c, 1, 1, generator=g, dtype=torch.float64) * 0.5
        self.b = torch.randn(1, c, 8, 8, generator=g, dtype=torch.float64)

    def __call__(self, x, t, emb, labels=None, copies=1):
        return torch.tanh(torch.nn.functional.conv2d(x, self.w)) * (1 + t / 1000) + 0.5 * self.b


def _setup(sched=V):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    return Denoiser(Toy()), z0, constant(torch.zeros(2, 3, 5, dtype=torch.float64)), sched


def _one_step_errors(den, sol, cond, sched):
    ts, zs = sol.timesteps, sol.latents
    return [(S.ddim_step(sched, den(zs[k + 1], ts[k + 1], cond), ts[k + 1], ts[k], zs[k + 1])[0] - zs[k]).abs().max()
            .item() for k in range(len(zs) - 1)]


# the paper's solver is for the SR stage's v-prediction (on ε-prediction its fixed steps contract too slowly
# near T to reach 1e-6 in 21 iterations); ours converges for both
@pytest.mark.parametrize("mode,sched", [("paper", V), ("fast", V), ("fast", EPS)], ids=["paper-v", "fast-v", "fast-eps"])
def test_inner_solve_drives_the_one_step_error_down(mode, sched):
    den, z0, cond, sched = _setup(sched)
    kw = {"tol": 1e-9, "max_iter": 20} if mode == "fast" else {}
    sol = iterinv.solve(mode, den, z0, cond, sched, 50, progress=False, **kw)  # paper mode: T = 50, N = 21
    assert sol.timesteps == [-1] + [t for _, t in S.inversion_timesteps(sched, 50)]
    assert max(_one_step_errors(den, sol, cond, sched)) <= 1e-6
    # so sampling back from z_T reconstructs z0, which plain DDIM inversion does not
    assert (ddim(den, sol.latents[-1], cond, sched, 50, progress=False) - z0).abs().max() <= 1e-4
    traj = invert(den, z0, cond, sched, 50, progress=False)
    assert (ddim(den, traj.latents[-1], cond, sched, 50, progress=False) - z0).abs().max() > 1e-3


def test_fast_and_paper_find_the_same_latents_and_fast_needs_fewer_calls():
    den, z0, cond, sched = _setup()
    paper = iterinv.solve_paper(den, z0, cond, sched, 50, progress=False)
    fast = iterinv.solve_fast(den, z0, cond, sched, 50, tol=1e-9, max_iter=20, progress=False)
    assert (paper.latents[-1] - fast.latents[-1]).abs().max() <= 1e-5
    assert paper.evals == 50 * 21 and fast.evals < paper.evals / 3


def test_fast_stops_each_sample_on_its_own():
    den, z0, cond, sched = _setup()
    both = iterinv.solve_fast(den, z0, cond, sched, 10, progress=False)
    one = iterinv.solve_fast(den, z0[:1], constant(torch.zeros(1, 3, 5, dtype=torch.float64)), sched, 10,
                             progress=False)
    assert (both.latents[-1][:1] - one.latents[-1]).abs().max() <= 1e-12


def test_paper_step_sizes():
    s = iterinv.step_sizes(50)
    assert s[0] == pytest.approx(0.3) and s[-1] == pytest.approx(0.3 * 0.5**0.5) and (s.diff() < 0).all()


@pytest.mark.parametrize("sched", [V, EPS], ids=["v", "eps"])
def test_forward_and_inverse_steps_are_exact_inverses(sched):
    """Along one ε, DDIM up t_prev → t then down t → t_prev returns the start (the identity the fast solver's
    fixed point rests on); in the model's own output type, v or ε."""
    g = torch.Generator().manual_seed(2)
    x, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for t_prev, t in S.inversion_timesteps(sched, 50)[::7]:
        up = S.ddim_eps_step(sched, eps, t_prev, t, x)
        out = S.eps_to_output(sched, eps, t, up)
        assert (S.ddim_step(sched, out, t, t_prev, up)[0] - x).abs().max() <= 1e-10


def test_masked_ddim_endpoints():
    den, z0, cond, sched = _setup(EPS)
    traj = invert(den, z0, cond, sched, 10, 0.8, progress=False)
    keep = diffedit.masked_ddim(den, traj, cond, sched, torch.zeros(1, 1, 8, 8, dtype=torch.float64), progress=False)
    assert torch.equal(keep, z0)
    free = diffedit.masked_ddim(den, traj, cond, sched, torch.ones(1, 1, 8, 8, dtype=torch.float64), progress=False)
    assert torch.equal(free, ddim(den, traj.latents[-1], cond, sched, 10, 0.8, progress=False))


# ---- the embedded cascade ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cascade():
    scene = world.scenes(905, 1)[0]
    pil = Image.fromarray((world.render(scene, 256) * 255).round().astype(np.uint8))
    cas = iterinv.Cascade(engine.load().model, engine.load(DEFAULT_UPSCALER).model)
    return cas, scene, pil, cas.invert(pil, scene.caption(), 256, "fast", "npi", steps=10, progress=False)


def test_cascade_reconstructs_with_the_same_noise_augmentation(cascade):
    cas, scene, pil, inv = cascade
    truth = images.to_tensor(pil)
    assert [im.shape[-1] for im in inv.images] == [64, 256]
    sr, st = cas.sr, inv.stages[0]
    z0 = sr.vae.encode_latents(truth)
    cond = constant(sr.encode_prompt([scene.caption()], None, False))
    with torch.no_grad():
        def sample(noise):
            return ddim(cas.sr_denoiser(inv.images[0], noise, 100), st.z_T, cond, sr.scheduler, 10, progress=False)
        same = sample(st.noise)
        other = sample(torch.randn(st.noise.shape, generator=torch.Generator().manual_seed(5)))
        ceiling = metrics.psnr(sr.vae.decode_latents(z0), truth)
    assert torch.equal(sr.vae.decode_latents(same), inv.images[1])  # the reconstruction reused ĉ
    assert 10 * (same - z0).square().mean() < (other - z0).square().mean()
    assert metrics.psnr(inv.images[1], truth) > ceiling - 0.1


def test_cascade_edit_is_deterministic_and_its_inversion_file_round_trips(cascade, tmp_path):
    cas, scene, pil, inv = cascade
    target = scene.replace(0, colour="blue" if scene.objects[0].colour != "blue" else "red").caption()
    outs, mask = cas.edit(pil, scene.caption(), target, inv.stages, steps=10, progress=False)
    assert mask.shape == (1, 1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    again, _ = cas.edit(pil, scene.caption(), target, inv.stages, steps=10, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert [o.shape[-1] for o in outs] == [64, 256]
    bp, _ = cas.edit(pil, scene.caption(), target, inv.stages, steps=10, backproject=3, progress=False)
    assert torch.equal(bp[0], outs[0])
    drift = [(F.avg_pool2d(o[1], 4) - o[0]).abs().max().item() for o in (outs, bp)]
    assert drift[1] < 0.1 * drift[0], drift  # the ×4 stage's 4×4 means follow the edited stage below
    path = inv.save(tmp_path / "inv.safetensors")
    meta, stages = iterinv.CascadeInversion.load_stages(path)
    assert meta["prompt"] == [scene.caption()] and meta["sizes"] == [64, 256]
    assert torch.equal(stages[0].z_T, inv.stages[0].z_T) and torch.equal(stages[0].noise, inv.stages[0].noise)


def test_pyramid_and_argument_errors(cascade):
    cas, scene, pil, _ = cascade
    assert [x.shape[-1] for x in iterinv.pyramid(pil, 1024)] == [64, 256, 1024]
    with pytest.raises(ValueError, match="square"):
        iterinv.pyramid(pil.crop((0, 0, 256, 200)), 256)
    with pytest.raises(ValueError, match="256 or 1024"):
        iterinv.pyramid(pil, 512)
    with pytest.raises(ValueError, match="method"):
        cas.invert(pil, "x", method="newton")
    with pytest.raises(ValueError, match="noise_level"):
        cas.invert(pil, "x", noise_level=400)


def test_cli_iterinv_and_edit(cascade, tmp_path, capsys, cli_error):
    _, scene, pil, _ = cascade
    src = images.save(pil, tmp_path / "src.png")
    out = tmp_path / "inv"
    assert main(["iterinv", "--image", str(src), "--prompt", scene.caption(), "--size", "256", "--steps", "5",
                 "--stage1", "npi", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["inversion.safetensors", "metrics.json", "reconstruction.png",
                                                     "sheet.png", "stage_64.png"]
    report = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "ssim", "mse", "clip_score", "vae_ceiling_psnr", "seconds"} <= set(report["reconstruction"])
    edit = tmp_path / "edit"
    target = scene.replace(0, colour="blue" if scene.objects[0].colour != "blue" else "red").caption()
    assert main(["iterinv-edit", "--image", str(src), "--prompt", scene.caption(), "--edit", target,
                 "--inversion", str(out / "inversion.safetensors"), "--steps", "5", "--backproject", "2",
                 "--out", str(edit), "--quiet"]) == 0
    assert {"edit.png", "mask.png", "sheet.png", "edit.json"} <= {p.name for p in edit.iterdir()}
    cli_error(["iterinv-edit", "--image", str(src), "--prompt", "x", "--edit", target, "--inversion",
                str(out / "inversion.safetensors"), "--out", str(tmp_path / "edit2")], "--steps 5")
    report = json.loads((edit / "edit.json").read_text())
    assert "psnr_outside_mask" in report and report["backproject"] == 2


def test_cli_iterinv_bad_inputs(cascade, tmp_path, capsys, cli_error):
    _, _, pil, _ = cascade
    src = images.save(pil, tmp_path / "src.png")
    wide = images.save(pil.crop((0, 0, 256, 128)), tmp_path / "wide.png")
    (tmp_path / "inv").mkdir()
    base = ["--prompt", "x", "--out", str(tmp_path / "inv")]
    cli_error(["iterinv", "--image", str(wide), *base], "square")
    cli_error(["iterinv", "--image", str(tmp_path / "nope.png"), *base], "no such image")
    cli_error(["iterinv", "--image", str(src), "--out", str(tmp_path / "a" / "b"), "--prompt", "x"], "does not exist")
    cli_error(["iterinv-edit", "--image", str(src), "--edit", "y", "--inversion", str(tmp_path / "no.safetensors"),
                *base], "no such inversion file")
    cli_error(["iterinv-edit", "--image", str(src), "--edit", "y", "--backproject", "-1", *base], "backproject=-1")
