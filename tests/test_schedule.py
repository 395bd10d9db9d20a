"""engine.schedule vs diffusers DDIMScheduler (test-only reference); step parity: max abs diff <= 1e-6."""
import ast
import pathlib
import types
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine import schedule as S

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMInverseScheduler, DDIMScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)

ATOL = 1e-6
# a few fp32 ulps: the same formula, arranged otherwise, rounds otherwise on another CPU's vector units
RTOL = 2**-20

SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
X4_DDIM = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear", "beta_start": 0.0001,
           "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
           "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
X4_LOW_RES = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
              "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000, "trained_betas": None,
              "variance_type": "fixed_small"}
IF_DDPM = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
           "beta_end": 0.02, "clip_sample": True, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95,
           "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.5,
           "thresholding": True, "variance_type": "learned_range"}
LINEAR = {"beta_schedule": "linear"}
TRAINED = {"num_train_timesteps": 50, "trained_betas": torch.linspace(1e-3, 0.2, 50).tolist()}
ZERO_SNR = {**SD15_PNDM, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
CONFIGS = {"sd15_pndm": SD15_PNDM, "x4": X4_DDIM, "x4_low_res": X4_LOW_RES, "if": IF_DDPM, "linear": LINEAR,
           "trained": TRAINED, "zero_snr": ZERO_SNR}


def ref(d, **over):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DDIMScheduler.from_config({**d, **over})


def cfg(d, **over):
    return S.SchedulerConfig.from_dict({**d, **over})


def test_engine_never_imports_diffusers():
    tree = ast.parse(pathlib.Path(S.__file__).read_text())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(m.split(".")[0] in ("diffusers", "transformers") for m in mods)


@pytest.mark.parametrize("name", CONFIGS)
def test_betas_and_alphas_cumprod_bit_exact(name):
    r, c = ref(CONFIGS[name]), cfg(CONFIGS[name])
    assert S.betas(c).dtype == S.alphas_cumprod(c).dtype == torch.float32
    assert torch.equal(S.betas(c), r.betas)
    assert torch.equal(S.alphas_cumprod(c), r.alphas_cumprod)
    assert torch.equal(S.final_alpha(c), r.final_alpha_cumprod)


def test_from_dict_defaults_match_ddim_and_ignores_other_scheduler_fields():
    c = S.SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": False,
                                     "interpolation_type": "linear", "variance_type": "fixed_small"})
    r = ref({}).config
    for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
              "steps_offset", "set_alpha_to_one", "clip_sample_range",
              "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr"):
        assert getattr(c, k) == r[k], k
    assert c.timestep_spacing is None  # absent: each scheduler's own default, DDIM's "leading"
    assert c.clip_sample is None and r["clip_sample"]  # absent: DDIM clips, Heun and LCM do not
    d = ref({})
    d.set_timesteps(10)
    assert S.timesteps(c, 10).tolist() == d.timesteps.tolist()
    assert isinstance(cfg(TRAINED).trained_betas, tuple) and hash(cfg(TRAINED))


@pytest.mark.parametrize("field,value", [("beta_schedule", "cosine"), ("prediction_type", "eps"),
                                         ("timestep_spacing", "karras")])
def test_bad_enum_value_names_field_value_and_allowed(field, value):
    with pytest.raises(ValueError, match=field) as e:
        cfg(SD15_PNDM, **{field: value})
    assert value in str(e.value)


def test_unknown_key_and_bad_trained_betas_raise():
    with pytest.raises(ValueError, match="beta_strat"):
        cfg(SD15_PNDM, beta_strat=0.1)
    with pytest.raises(ValueError, match="trained_betas"):
        cfg({"trained_betas": [0.1, 0.2]})


@pytest.mark.parametrize("n", [0, -1, -50, 1001, 2.5])
def test_bad_num_steps(n):
    with pytest.raises(ValueError, match=r"steps=.*: need a whole number in \[1, 1000\]"):
        S.timesteps(cfg(SD15_PNDM), n)


def test_bad_strength_and_missing_noise():
    with pytest.raises(ValueError, match="strength"):
        S.timesteps(cfg(SD15_PNDM), 10, strength=1.5)
    c, x = cfg(SD15_PNDM), torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        S.ddim_step(c, x, 981, 961, x, eta=0.5)


STEPS = [1, 2, 3, 7, 10, 25, 50, 61, 100, 103, 999, 1000]


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", STEPS)
def test_timesteps_match_set_timesteps(spacing, offset, n):
    r, c = ref(LINEAR, timestep_spacing=spacing, steps_offset=offset), cfg(LINEAR, timestep_spacing=spacing,
                                                                           steps_offset=offset)
    r.set_timesteps(n)
    if r.timesteps.max() >= 1000:  # diffusers indexes past the table (leading, offset 1, n=1000); we refuse
        with pytest.raises(ValueError, match="grid"):
            S.timesteps(c, n)
        return
    ts = S.timesteps(c, n)
    assert ts.dtype == torch.int64 and len(ts) == n
    # trailing: diffusers' float arange sometimes adds a spurious (n+1)-th step t = -1; the first n agree
    assert torch.equal(ts, r.timesteps[:n])
    assert all(S.prev_timestep(c, t, n) == t - 1000 // n for t in ts.tolist())


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.75, 0.8, 1.0])
@pytest.mark.parametrize("n", [1, 10, 50, 37])
def test_strength_truncation_matches_img2img_get_timesteps(strength, n):
    r, c = ref(SD15_PNDM), cfg(SD15_PNDM)
    r.set_timesteps(n)
    expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=r), n, strength, "cpu")
    assert torch.equal(S.timesteps(c, n, strength), expected)


STEP_CASES = [
    ("eps", {**SD15_PNDM}),
    ("eps_alpha_one", {**SD15_PNDM, "set_alpha_to_one": True}),
    ("v", {**X4_DDIM}),
    ("v_alpha_one", {**X4_DDIM, "set_alpha_to_one": True}),
    ("sample", {**SD15_PNDM, "prediction_type": "sample"}),
    ("eps_clip", {**SD15_PNDM, "clip_sample": True, "clip_sample_range": 0.8}),
    ("v_clip", {**X4_DDIM, "clip_sample": True}),
    ("eps_threshold", IF_DDPM),
    ("v_threshold_trailing", {**IF_DDPM, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("sample_linspace", {**LINEAR, "prediction_type": "sample", "timestep_spacing": "linspace"}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("name,d", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_ddim_step_matches_diffusers(name, d, eta, dtype):
    n, g = 10, torch.Generator().manual_seed(0)
    r, c = ref(d), cfg(d)
    r.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    for t in S.timesteps(c, n):  # includes the last step, t_prev < 0 -> final alpha
        out = (torch.randn(x.shape, generator=g) * 1.5).to(dtype)
        z = torch.randn(x.shape, generator=g).to(dtype)
        want_x, want_x0 = r.step(out, t, x, eta=eta, variance_noise=z, return_dict=False)
        got_x, got_x0 = S.ddim_step(c, out, t, S.prev_timestep(c, t, n), x, eta=eta, noise=z)
        torch.testing.assert_close(got_x0, want_x0, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got_x, want_x, atol=ATOL, rtol=RTOL)
        x = want_x


def test_ddim_step_at_zero_terminal_snr_with_eta_one_is_the_ddpm_posterior():
    c, g = cfg(ZERO_SNR, prediction_type="v_prediction"), torch.Generator().manual_seed(0)
    x, out, z = torch.randn(3, 2, 4, 8, 8, generator=g)
    t, t_prev = S.timesteps(c, 10)[:2]
    assert S.abar(c, t) == 0
    got, x0 = S.ddim_step(c, out, t, t_prev, x, eta=1.0, noise=z)
    a_prev = S.abar(c, t_prev)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(x0, -out, atol=0, rtol=0)  # v-prediction at ᾱ = 0: x0 = −v
    torch.testing.assert_close(got, a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * z, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_q_sample_and_velocity_match_add_noise(name):
    g = torch.Generator().manual_seed(1)
    r, c = ref(CONFIGS[name]), cfg(CONFIGS[name])
    x0, z = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    top = c.num_train_timesteps - 1
    for t in (torch.tensor([0, top // 2, top]), torch.tensor(top // 3), torch.tensor([7])):
        torch.testing.assert_close(S.q_sample(c, x0, t, z), r.add_noise(x0, z, t), atol=ATOL, rtol=0)
        torch.testing.assert_close(S.get_velocity(c, x0, t, z), r.get_velocity(x0, z, t), atol=ATOL, rtol=0)
    torch.testing.assert_close(S.q_sample(c, x0, 5, z), r.add_noise(x0, z, torch.tensor(5)), atol=ATOL, rtol=0)


def test_predict_x0_eps_roundtrips_q_sample_for_every_prediction_type():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    for pt in S.PREDICTION_TYPES:
        c = cfg(SD15_PNDM, prediction_type=pt)
        xt = S.q_sample(c, x0, 500, eps)
        out = {"epsilon": eps, "sample": x0, "v_prediction": S.get_velocity(c, x0, 500, eps)}[pt]
        got_x0, got_eps = S.predict_x0_eps(c, out, 500, xt)
        torch.testing.assert_close(got_x0, x0, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_eps, eps, atol=1e-6, rtol=0)


def _const_eps_model(c, eps):
    """A 'model' whose implied eps is the same tensor at every (x, t), in the config's prediction type."""
    def model(x, t):
        a = S.abar(c, t, x.dtype)
        return eps if c.prediction_type == "epsilon" else (eps - (1 - a) ** 0.5 * x) / a**0.5
    return model


@pytest.mark.parametrize("d", [SD15_PNDM, {**SD15_PNDM, "set_alpha_to_one": True}, X4_DDIM,
                               {**X4_DDIM, "timestep_spacing": "trailing"}, {**SD15_PNDM, "timestep_spacing":
                                                                            "linspace"}],
                         ids=["sd15", "sd15_alpha_one", "x4_v", "x4_v_trailing", "sd15_linspace"])
@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inversion_then_ddim_is_exact_mirror(d, n, dtype):
    g = torch.Generator().manual_seed(3)
    c = cfg(d)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g, dtype=dtype), torch.randn(1, 4, 8, 8, generator=g, dtype=dtype)
    model = _const_eps_model(c, eps)
    pairs, ts = S.inversion_timesteps(c, n), S.timesteps(c, n)
    assert pairs[0][0] == -1 and pairs[-1][1] == ts[0].item() and len(pairs) == n  # none of these ends at t = 0
    assert pairs == [(tp, t) for t, tp in reversed(S.step_pairs(c, n))]
    x = x0
    for t_from, t_to in pairs:
        x = S.ddim_inverse_step(c, model(x, t_to), t_from, t_to, x)
    for t, t_prev in S.step_pairs(c, n):
        x, _ = S.ddim_step(c, model(x, t), t, t_prev, x)
    # float32 v-prediction: float32 sqrt(abar)^2 + sqrt(1-abar)^2 != 1 and the test model's eps -> v -> eps round
    # trip cost ~3e-5 over 2 x 50 steps; in float64 the mirror is exact to rounding
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if c.prediction_type == "epsilon" else 1e-4)
    torch.testing.assert_close(x, x0, atol=tol, rtol=0)


@pytest.mark.parametrize("d", [SD15_PNDM, X4_DDIM, {**SD15_PNDM, "prediction_type": "sample"}],
                         ids=["eps", "v", "sample"])
def test_inverse_step_is_algebraic_inverse_of_ddim_step(d):
    g = torch.Generator().manual_seed(4)
    c = cfg(d)
    for t, t_prev in S.step_pairs(c, 20):
        x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                         dtype=torch.float64)
        if c.prediction_type == "sample":
            x0 = torch.randn_like(x)
            x = S.q_sample(c, x0, t, eps)
            out_fwd = out_inv = x0
        else:
            model = _const_eps_model(c, eps)
            out_fwd = model(x, t)
        x_prev, _ = S.ddim_step(c, out_fwd, t, t_prev, x)
        if c.prediction_type != "sample":
            out_inv = model(x_prev, t)
        else:  # the x0 that, read at (x_prev, t), implies the same eps
            a = S.abar(c, t, x.dtype)
            out_inv = (x_prev - (1 - a) ** 0.5 * eps) / a**0.5
        torch.testing.assert_close(S.ddim_inverse_step(c, out_inv, t_prev, t, x_prev), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("d", [SD15_PNDM, {**SD15_PNDM, "set_alpha_to_one": True},
                               {**SD15_PNDM, "timestep_spacing": "trailing"}], ids=["sd15", "alpha_one", "trailing"])
@pytest.mark.parametrize("n", [6, 10, 50])
def test_inverse_eps_matches_diffusers_ddim_inverse_scheduler(d, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = DDIMInverseScheduler.from_config(d)
    r.set_timesteps(n)
    c, g = cfg(d), torch.Generator().manual_seed(5)
    pairs = S.inversion_timesteps(c, n)
    assert [t_to for _, t_to in pairs] == r.timesteps.tolist()
    x = torch.randn(1, 4, 8, 8, generator=g)
    for (t_from, t_to), t in zip(pairs, r.timesteps):
        eps = torch.randn(x.shape, generator=g)
        want = r.step(eps, t, x, return_dict=False)[0]
        torch.testing.assert_close(S.ddim_inverse_step(c, eps, t_from, t_to, x), want, atol=ATOL, rtol=0)
        x = want


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 1000), spacing=st.sampled_from(S.TIMESTEP_SPACINGS), offset=st.integers(0, 1),
       strength=st.floats(0.0, 1.0))
def test_grid_properties(n, spacing, offset, strength):
    c = cfg(LINEAR, timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset == 1 and n == 1000:
        return
    ts = S.timesteps(c, n)
    assert len(ts) == n and bool((ts[:-1] > ts[1:]).all()) and 0 <= ts.min() and ts.max() < 1000
    r = ref(LINEAR, timestep_spacing=spacing, steps_offset=offset)
    r.set_timesteps(n)
    assert torch.equal(ts, r.timesteps[:n])
    tail = S.timesteps(c, n, strength)
    assert torch.equal(tail, ts[len(ts) - len(tail):])
    pairs = S.inversion_timesteps(c, n, strength)
    assert len(pairs) == len(tail)
    if pairs:
        assert pairs[-1][1] == tail[0].item() and pairs == [(b, a) for a, b in reversed(S.step_pairs(c, n, strength))]
        # the walk starts at final alpha (-1) unless the lowest grid t exceeds T // n (trailing n=6, leading+1 n=501)
        assert pairs[0][0] == max(tail[-1].item() - 1000 // n, -1)
        assert all(a < b for a, b in pairs)
    if spacing == "leading":  # on the leading grid the inverse walk chains exactly through the grid
        assert all(pairs[k][1] == pairs[k + 1][0] for k in range(len(pairs) - 1))
