"""DDIM inversion, null-text inversion, Direct Inversion and the image metrics."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import engine
from engine import direct, images, metrics, schedule as S, world
from engine.cli import main
from engine.denoiser import Denoiser, constant
from engine.invert import Trajectory, invert, null_text, null_text_cond
from engine.sample import ddim

EPS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
           set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
V = {**EPS, "prediction_type": "v_prediction"}


class Toy:
    """A 'UNet' whose implied ε is a fixed tensor scaled by a function of t (or constant), in the config's
    prediction type; DDIM is exactly invertible for it because ε does not depend on x."""

    def __init__(self, sched, eps, depends_on_t=True):
        self.sched, self.eps, self.depends_on_t = sched, eps, depends_on_t

    def __call__(self, x, t, emb, labels=None, copies=1):
        e = self.eps * (1 + t / 1000 if self.depends_on_t else 1.0) * (1 + emb.mean((1, 2)).view(-1, 1, 1, 1))
        return S.eps_to_output(self.sched, e.to(x), t, x)


def _toy(d, depends_on_t, guidance=1.0):
    sched = S.SchedulerConfig.from_dict(d)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g)
    return sched, Denoiser(Toy(sched, eps.double(), depends_on_t), guidance), z0


@pytest.mark.parametrize("d", [EPS, V], ids=["eps", "v"])
@pytest.mark.parametrize("convention,depends_on_t", [("destination", True), ("source", False)])
@pytest.mark.parametrize("steps,strength", [(10, 1.0), (50, 1.0), (20, 0.5)])
def test_inversion_then_sampling_reconstructs_exactly(d, convention, depends_on_t, steps, strength):
    sched, den, z0 = _toy(d, depends_on_t)
    cond = constant(torch.zeros(2, 3, 5, dtype=torch.float64))
    traj = invert(den, z0, cond, sched, steps, strength, convention, progress=False)
    assert len(traj.latents) == traj.steps + 1 == len(traj.timesteps) and traj.timesteps[-1] > traj.timesteps[0]
    assert torch.equal(traj.latents[0], z0) and not torch.allclose(traj.latents[-1], z0)
    x = ddim(den, traj.latents[-1], cond, sched, steps, strength, progress=False)
    assert (x - z0).abs().max() <= 1e-5


def test_source_convention_evaluates_at_the_current_timestep():
    sched, den, z0 = _toy(EPS, True)
    seen = []
    unet = den.unet
    den.unet = lambda x, t, emb, labels=None, copies=1: (seen.append(t), unet(x, t, emb))[1]
    cond = constant(torch.zeros(2, 3, 5, dtype=torch.float64))
    invert(den, z0, cond, sched, 10, convention="source", progress=False)
    assert seen == [0] + list(range(1, 901, 100))  # the clean latent is evaluated at t = 0
    seen.clear()
    invert(den, z0, cond, sched, 10, convention="destination", progress=False)
    assert seen == list(range(1, 1001, 100))


@pytest.mark.parametrize("d", [EPS, V], ids=["eps", "v"])
def test_direct_inversion_lambda_one_walks_the_inversion_back(d):
    sched, den, z0 = _toy(d, True)
    cond = constant(torch.zeros(2, 3, 5, dtype=torch.float64))
    traj = invert(den, z0, cond, sched, 20, convention="source", progress=False)  # source: not exact without it
    assert (ddim(den, traj.latents[-1], cond, sched, 20, progress=False) - z0).abs().max() > 1e-2
    edit_den = Denoiser(den.unet, 3.0)
    guided = constant(torch.cat([torch.full((2, 3, 5), 0.5, dtype=torch.float64), torch.zeros(2, 3, 5).double()]))
    x = direct.edit(edit_den, traj, guided, sched, lam=1.0, progress=False)
    assert (x - z0).abs().max() <= 1e-5


@pytest.mark.parametrize("d", [EPS, V], ids=["eps", "v"])
def test_direct_inversion_authors_pairing_follows_their_code(d):
    """Their sampling step i merges noises[N−1−i]: the ε their inversion evaluated at the step's own
    timestep (at x̃_T: their last, identity step's). Transcribed on our grid, with their ε recomputed
    from the inverted latents."""
    sched, den, z0 = _toy(d, True)
    inv_cond = constant(torch.zeros(2, 3, 5, dtype=torch.float64))
    traj = invert(den, z0, inv_cond, sched, 20, convention="source", progress=False)
    guided_den, lam = Denoiser(den.unet, 3.0), 0.7
    guided = constant(torch.cat([torch.full((2, 3, 5), 0.5, dtype=torch.float64), torch.zeros(2, 3, 5).double()]))
    ts, n = traj.timesteps, len(traj.timesteps) - 1
    x = traj.latents[-1]
    for i in range(n):
        t, t_prev, x_inv = ts[n - i], ts[n - i - 1], traj.latents[n - i]
        e = S.predict_x0_eps(sched, guided_den(x, t, guided), t, x)[1]
        e_inv = S.predict_x0_eps(sched, den(x_inv, t, inv_cond), t, x_inv)[1]
        x = S.ddim_eps_step(sched, (1 - lam) * e + lam * e_inv, t, t_prev, x)
    top = direct.top_noise(den, traj, inv_cond, sched)
    got = direct.edit(guided_den, traj, guided, sched, lam, pairing="authors", top=top, progress=False)
    assert (got - x).abs().max() <= 1e-8
    mirror = direct.edit(guided_den, traj, guided, sched, lam, progress=False)
    assert (mirror - x).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs top"):
        direct.edit(guided_den, traj, guided, sched, lam, pairing="authors", progress=False)
    with pytest.raises(ValueError, match="pairing='next'"):
        direct.edit(guided_den, traj, guided, sched, lam, pairing="next", progress=False)
    # the destination convention evaluates the inverse step arriving at t at t: both pairings agree
    dest = invert(den, z0, inv_cond, sched, 20, convention="destination", progress=False)
    assert torch.equal(direct.edit(guided_den, dest, guided, sched, lam, pairing="authors", progress=False),
                       direct.edit(guided_den, dest, guided, sched, lam, progress=False))


@pytest.mark.parametrize("d", [EPS, V], ids=["eps", "v"])
def test_direct_inversion_x_t_pairing_merges_the_inverted_noise_itself(d):
    """The paper's "repeated injection of the original encoded noise x̃_T": ε ← (1−λ)·ε_cfg + λ·x̃_T."""
    sched, den, z0 = _toy(d, True)
    traj = invert(den, z0, constant(torch.zeros(2, 3, 5, dtype=torch.float64)), sched, 20, convention="source",
                  progress=False)
    guided_den, lam = Denoiser(den.unet, 3.0), 0.3
    guided = constant(torch.cat([torch.full((2, 3, 5), 0.5, dtype=torch.float64), torch.zeros(2, 3, 5).double()]))
    x_t = x = traj.latents[-1]
    for i, (t, t_prev) in enumerate(traj.sampling_pairs):
        e = S.predict_x0_eps(sched, guided_den(x, t, guided), t, x)[1]
        x = S.ddim_eps_step(sched, (1 - lam) * e + lam * x_t if i < 5 else e, t, t_prev, x)
    got = direct.edit(guided_den, traj, guided, sched, lam, inject_steps=5, pairing="x_T", progress=False)
    assert (got - x).abs().max() <= 1e-8


ZERO_SNR = {**V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


class ToyV:
    """A v-prediction 'UNet' whose output is a fixed tensor scaled by t and the prompt: at ᾱ = 0 (zero terminal
    SNR) no ε-parameterised toy exists, since every output there reads as ε = x."""

    def __init__(self, v):
        self.v = v

    def __call__(self, x, t, emb, labels=None, copies=1):
        return (self.v * (1 + t / 1000) * (1 + emb.mean((1, 2)).view(-1, 1, 1, 1))).to(x)


@pytest.mark.parametrize("convention", ["source", "destination"])
def test_direct_inversion_lambda_one_walks_back_at_zero_terminal_snr(convention):
    sched = S.SchedulerConfig.from_dict(ZERO_SNR)
    g = torch.Generator().manual_seed(0)
    z0, v = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g).double()
    den, cond = Denoiser(ToyV(v)), constant(torch.zeros(2, 3, 5, dtype=torch.float64))
    traj = invert(den, z0, cond, sched, 20, convention=convention, progress=False)
    assert traj.timesteps[-1] == 999 and S.abar(sched, 999) == 0
    assert (ddim(den, traj.latents[-1], cond, sched, 20, progress=False) - z0).abs().max() > 1e-2
    guided = constant(torch.cat([torch.full((2, 3, 5), 0.5, dtype=torch.float64), torch.zeros(2, 3, 5).double()]))
    x = direct.edit(Denoiser(den.unet, 3.0), traj, guided, sched, lam=1.0, progress=False)
    assert torch.isfinite(x).all() and (x - z0).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.eps_to_output(sched, v, 999, z0)


@pytest.mark.parametrize("d", [EPS, V, ZERO_SNR, {**V, "prediction_type": "sample"}], ids=["eps", "v", "v0", "x0"])
def test_x0_to_output_inverts_the_x0_half_of_predict_x0_eps(d):
    sched = S.SchedulerConfig.from_dict(d)
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g).double()
    for t in (0, 500, 999):
        got, _ = S.predict_x0_eps(sched, S.x0_to_output(sched, x0, t, x), t, x)
        assert (got - x0).abs().max() <= 1e-9


def test_x0_to_output_refuses_epsilon_at_zero_terminal_snr():
    sched = S.SchedulerConfig.from_dict({**ZERO_SNR, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.x0_to_output(sched, torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))


def test_direct_inversion_lambda_zero_is_plain_cfg_sampling():
    sched, den, z0 = _toy(EPS, True)
    traj = invert(den, z0, constant(torch.zeros(2, 3, 5, dtype=torch.float64)), sched, 20, progress=False)
    guided_den = Denoiser(den.unet, 3.0)
    guided = constant(torch.cat([torch.full((2, 3, 5), 0.5).double(), torch.full((2, 3, 5), -0.2).double()]))
    want = ddim(guided_den, traj.latents[-1], guided, sched, 20, progress=False)
    assert torch.equal(direct.edit(guided_den, traj, guided, sched, lam=0.0, progress=False), want)
    # λ in between, only the first steps: differs from both ends
    mid = direct.edit(guided_den, traj, guided, sched, lam=0.5, inject_steps=5, progress=False)
    assert not torch.allclose(mid, want) and not torch.allclose(mid, z0)


def test_injected_steps():
    assert direct.injected_steps(10) == list(range(10))
    assert direct.injected_steps(10, 4) == [0, 1, 2, 3]
    assert direct.injected_steps(10, None, 3) == [0, 3, 6, 9]
    assert direct.injected_steps(10, 0) == []
    for bad in (dict(inject_steps=11), dict(inject_steps=-1), dict(every=0), dict(inject_steps=True)):
        with pytest.raises(ValueError):
            direct.injected_steps(10, **bad)
    with pytest.raises(ValueError, match="lambda"):
        direct.check_lambda(1.5)


def test_trajectory_save_load_roundtrip(tmp_path):
    sched, den, z0 = _toy(V, True)
    traj = invert(den, z0.float(), constant(torch.zeros(2, 3, 5)), sched, 7, 0.6, progress=False)
    path = traj.save(tmp_path / "t.safetensors", {"prompt": "x"})
    back = Trajectory.load(path)
    assert (back.timesteps, back.convention, back.num_steps, back.strength) == (traj.timesteps, "destination", 7, 0.6)
    assert all(torch.equal(a, b) for a, b in zip(back.latents + back.noises, traj.latents + traj.noises))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    with pytest.raises(FileNotFoundError):
        Trajectory.load(tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def tiny():
    pipe = engine.load()
    scenes = world.scenes(900, 2)
    return pipe, scenes, torch.from_numpy(world.render_batch(scenes, 64))


def test_null_text_iterinv_settings():
    """IterInv's stage I: 51 Adam steps on every sampling step, none stopped early, on the summed error."""
    sched, den, z0 = _toy(EPS, True, guidance=3.0)
    cond = torch.full((2, 3, 5), 0.5, dtype=torch.float64)
    traj = invert(den, z0, constant(cond), sched, 4, progress=False)
    seen = []
    unet = den.unet
    den.unet = lambda x, t, emb, labels=None, copies=1: (seen.append(t), unet(x, t, emb))[1]
    out = null_text(den, traj, cond, torch.zeros(2, 3, 5, dtype=torch.float64), sched, "iterinv", progress=False)
    assert len(out.uncond) == 4 and out.guidance == 3.0
    assert len(seen) == 4 * (1 + 51 + 1)  # the conditional half, the 51 steps, the step taken
    with pytest.raises(ValueError, match="'iterinv'"):
        null_text(den, traj, cond, cond, sched, "iterinv-ish", progress=False)


@pytest.mark.parametrize("method", ["reference", "fast", "iterinv"])
def test_null_text_beats_plain_guided_reconstruction(tiny, method):
    pipe, scenes, x = tiny
    caps = [s.caption() for s in scenes]
    traj = pipe.invert(x, caps, steps=10, null_text=method, progress=False)
    assert traj.guidance == 7.5 and len(traj.uncond) == 10
    nti = pipe.reconstruct(traj, caps, output="pt", progress=False)
    c = pipe.model
    with torch.no_grad():
        emb = pipe.model.encode_prompt(caps, None, True)
        plain = c.vae.decode_latents(ddim(Denoiser(c.unet, 7.5), traj.latents[-1], constant(emb), c.scheduler, 10,
                                          progress=False))
        # the null-text loss of the first step with ᾱ_t > 0 (at ᾱ_t = 0, zero terminal SNR, the step's ε is x_t
        # itself and the embedding moves only its √ᾱ_prev·x0 term): the guided step against the inverted latent
        k = next(k for k, (t, _) in enumerate(traj.sampling_pairs) if S.abar(c.scheduler, t) > 0)
        (t, t_prev), x_t = traj.sampling_pairs[k], traj.latents[-1 - k]
        loss = lambda u: (S.ddim_step(c.scheduler, Denoiser(c.unet, 7.5)(x_t, t, constant(torch.cat([u, emb[2:]]))),  # noqa: E731
                                      t, t_prev, x_t)[0] - traj.latents[-2 - k]).square().mean().item()
        # IterInv's settings (lr 1e-3, from "") move the embedding less in a step than P2P's (lr 1e-2)
        assert loss(traj.uncond[k]) < (0.9 if method == "iterinv" else 0.75) * loss(emb[:2])
    # at 10 steps and CFG 7.5 IterInv's settings gain about 4 dB, the others more
    assert (metrics.psnr(nti, x) > metrics.psnr(plain, x) + (3 if method == "iterinv" else 5)).all()
    assert (metrics.psnr(nti, x) > 25).all()


def test_null_text_needs_guidance(tiny):
    sched, den, z0 = _toy(EPS, True)
    traj = invert(den, z0, constant(torch.zeros(2, 3, 5).double()), sched, 5, progress=False)
    with pytest.raises(ValueError, match="guidance"):
        null_text(den, traj, torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), sched)
    with pytest.raises(ValueError, match="null-text"):
        null_text_cond(traj, torch.zeros(2, 3, 5))


def test_edit_changes_the_named_attribute_and_is_deterministic(tiny):
    pipe, scenes, x = tiny
    s = scenes[0]
    target = s.replace(0, colour="blue" if s.objects[0].colour != "blue" else "red")
    a, traj = pipe.edit(x[:1], [target.caption(), s.caption()], steps=20, lam=0.5, output="pt", progress=False)
    b, _ = pipe.edit(x[:1], [target.caption(), s.caption()], steps=20, lam=0.5, output="pt", progress=False)
    assert torch.equal(a, b) and traj.convention == "source" and traj.steps == 20
    assert metrics.psnr(a[1:], x[:1]) > metrics.psnr(a[:1], x[:1])  # the unedited prompt stays closer


def test_edit_pairings_at_lambda_one(tiny):
    """λ = 1: the mirror pairing gives back the inversion's start, the authors' pairing does not; both
    batch one image under several prompts."""
    pipe, scenes, x = tiny
    back = pipe.model.decode(pipe.model.encode(x[:1]))
    kw = dict(steps=8, lam=1.0, output="pt", progress=False)
    mirror, _ = pipe.edit(x[:1], ["a blue ring", "a red star"], **kw)
    authors, _ = pipe.edit(x[:1], ["a blue ring", "a red star"], pairing="authors", **kw)
    assert (mirror - back).abs().max() <= 1e-3 and (authors - back).abs().max() > 1e-2
    assert torch.equal(authors[0], authors[1])  # λ = 1: the prompt is not used
    x_t, _ = pipe.edit(x[:1], "a blue ring", pairing="x_T", **{**kw, "lam": 0.5})
    assert torch.isfinite(x_t).all() and (x_t - back).abs().max() > 1e-2
    with pytest.raises(ValueError, match="pairing='next'"):
        pipe.edit(x[:1], "a blue ring", pairing="next", **kw)


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 33, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    ours = metrics.ssim(a, b)
    ref = [structural_similarity(((a[i] + 1) / 2).numpy(), ((b[i] + 1) / 2).numpy(), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)
           for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2))


def test_masked_metrics():
    a = torch.zeros(1, 3, 32, 32)
    b = a.clone()
    b[..., :16, :] = 1.0  # top half differs by 0.5 on the [0, 1] scale
    bottom = torch.zeros(1, 1, 32, 32)
    bottom[..., 16:, :] = 1
    assert metrics.mse(a, b).item() == pytest.approx(0.125)
    assert metrics.mse(a, b, bottom).item() == 0 and metrics.mse(a, b, 1 - bottom).item() == pytest.approx(0.25)
    assert metrics.psnr(a, b, 1 - bottom).item() == pytest.approx(10 * np.log10(4))
    assert metrics.ssim(a, b, bottom).item() > metrics.ssim(a, b).item() > metrics.ssim(a, b, 1 - bottom).item()
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(a, b[..., :16])


def _src(tmp_path, size=64):
    arr = world.render(world.scenes(901, 1)[0], size)
    path = tmp_path / "src.png"
    images.save(images.to_pil(torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1)[0], path)
    return path


def test_cli_bad_inputs(tmp_path, capsys, cli_error):
    src = _src(tmp_path)
    odd = tmp_path / "odd.png"
    images.save(images.to_pil(torch.zeros(1, 3, 30, 30))[0], odd)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = str(tmp_path / "e.png")
    cli_error(["edit", "--image", str(odd), "--prompt", "a red star", "--out", out], "multiples of 4")
    cli_error(["edit", "--image", str(src), "--prompt-file", str(empty), "--out", out], "no prompts")
    cli_error(["edit", "--image", str(src), "--prompt-file", str(tmp_path / "nope.txt"), "--out", out], "no such prompt file")
    cli_error(["edit", "--image", str(src), "--prompt", "x", "--lambda", "2", "--out", out], "lambda")
    cli_error(["edit", "--image", str(src), "--prompt", "x", "--inject-steps", "101", "--out", out], "inject_steps")
    cli_error(["edit", "--image", str(tmp_path / "nope.png"), "--prompt", "x", "--out", out], "no such image")
    cli_error(["invert", "--image", str(src), "--out", str(tmp_path / "t.png")], ".safetensors")
    cli_error(["invert", "--image", str(src), "--out", str(tmp_path / "no" / "t.safetensors")], ".safetensors")


def test_nan_image_is_refused(tiny):
    pipe, _, x = tiny
    bad = x[:1].clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe.invert(bad, "", steps=2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        pipe.edit(bad, "a red star", steps=2, progress=False)


def test_cli_invert_and_edit_write_their_files(tmp_path, capsys, cli_error):
    src = _src(tmp_path)
    assert main(["invert", "--image", str(src), "--steps", "5", "--null-text", "fast", "--out",
                 str(tmp_path / "t.safetensors"), "--quiet"]) == 0
    traj = Trajectory.load(tmp_path / "t.safetensors")
    assert traj.steps == 5 and traj.uncond is not None and (tmp_path / "t.png").is_file()
    (tmp_path / "p.txt").write_text("a small red star in the center, on a plain white background\n\na blue ring\n")
    assert main(["edit", "--image", str(src), "--prompt-file", str(tmp_path / "p.txt"), "--steps", "5",
                 "--pairing", "authors", "--out", str(tmp_path / "e.png"), "--quiet"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["e.json", "e_0.png", "e_1.png", "e_sheet.png", "p.txt", "src.png", "t.png", "t.safetensors"]
    import json
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["pairing"] == "authors"
    assert len(report["edits"]) == 2 and {"psnr_to_source", "ssim_to_source", "clip_score_edit"} <= set(report["edits"][0])
