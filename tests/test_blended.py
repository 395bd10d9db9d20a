"""Blended latent diffusion, tiles + alpha compositing, the multi-stage edit and the blend CLI."""
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine
from engine import blended as B, regions as R, images, metrics, schedule as S, world
from engine.cli import main
from engine.denoiser import Denoiser, constant
from engine.embedded import DEFAULT_MODEL, DEFAULT_UPSCALER
from engine.rng import generator, randn_tensor
from engine.sample import ddim

EPS = S.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
FAST = dict(steps=4, candidates=2, repaint=1, sr_steps=2, stage_steps=10)  # enough to run every code path


class Toy:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 4, 1, 1, generator=g) * 0.5

    def __call__(self, x, t, emb, labels=None, copies=1):
        return torch.tanh(torch.nn.functional.conv2d(x, self.w)) * (1 + t / 1000)


def _toy():
    g = torch.Generator().manual_seed(1)
    z_src, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return Denoiser(Toy()), z_src, x, constant(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_all_ones_mask_is_plain_sampling(eta):
    den, z_src, x, cond = _toy()
    ones = torch.ones(2, 1, 8, 8)
    for blend in B.BLENDS:
        got = B.blended(den, x, z_src, ones, cond, EPS, 10, eta=eta, blend=blend, generator=generator(3), progress=False)
        assert torch.equal(got, ddim(den, x, cond, EPS, 10, eta=eta, generator=generator(3), progress=False)), blend


def test_all_zeros_mask_keeps_the_source_and_half_masks_keep_their_half():
    den, z_src, x, cond = _toy()
    zeros = torch.zeros(2, 1, 8, 8)
    assert torch.equal(B.blended(den, x, z_src, zeros, cond, EPS, 10, blend="exact", generator=generator(0),
                                 progress=False), z_src)
    half = torch.zeros(2, 1, 8, 8)
    half[..., 4:] = 1
    for blend in ("exact", "before", "after"):
        got = B.blended(den, x, z_src, half, cond, EPS, 10, blend=blend, repeats=2, generator=generator(0),
                        progress=False)
        outside = (got - z_src)[..., :4].abs().max().item()
        # "exact" ends on the clean source; the others on it noised to t = 1 (or not blended after the last step)
        assert outside == 0 if blend == "exact" else 0 < outside < 0.2, (blend, outside)
        assert (got - z_src)[..., 4:].abs().max() > 0.5


def test_repaint_schedule():
    pairs = S.step_pairs(EPS, 4)
    assert B.repaint_walk(pairs, 0) == pairs
    walk = B.repaint_walk(pairs, 2)
    assert sum(tn < t for t, tn in walk) == 10 and sum(tn > t for t, tn in walk) == 6
    assert walk[-1] == pairs[-1] and walk[-2] == pairs[-2]  # no re-noise after the last step
    (t, tp), up = pairs[0], walk[1]
    assert walk[0] == (t, tp) and up == (tp, t)  # jump back up to where the step started
    walk = B.repaint_walk(pairs, 1, jump=2)
    assert [tn < t for t, tn in walk[:6]] == [True, True, False, True, True, True]
    assert walk[2] == (pairs[1][1], pairs[0][0])
    # re-noising from t up to t_to keeps a sample of q(x0, t) a sample of q(x0, t_to): its noise variance
    g = torch.Generator().manual_seed(0)
    n1, n2 = torch.randn(2, 200_000, generator=g, dtype=torch.float64)
    abar = S.alphas_cumprod(EPS).double()
    up = S.renoise(EPS, S.q_sample(EPS, torch.zeros_like(n1), 200, n1), 200, 500, n2)
    assert abs(up.var().item() - (1 - abar[500].item())) < 0.01
    assert torch.allclose(S.renoise(EPS, n1, 200, 500, 0 * n2), (abar[500] / abar[200]).sqrt() * n1)


def test_progressive_masks_shrink_to_the_mask():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 6:9, 6:9] = 1
    ms = R.progressive(m, 2)
    assert len(ms) == 3 and torch.equal(ms[-1], m)
    assert ms[0].sum() > ms[1].sum() > ms[2].sum() and bool((ms[0] >= ms[1]).all())


# ---- tiles --------------------------------------------------------------------------------------------------

def test_tile_boxes_cover_align_and_overlap():
    boxes = R.tile_boxes(1024, 512, 256, 64)
    cover = torch.zeros(1024, 512)
    for y, x, th, tw in boxes:
        assert y % 16 == 0 and x % 16 == 0 and th == tw == 256
        cover[y:y + th, x:x + tw] += 1
    assert cover.min() >= 1
    ys, xs = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert all(b - a <= 256 - 64 for a, b in zip(ys, ys[1:])) and all(b - a <= 256 - 64 for a, b in zip(xs, xs[1:]))
    assert boxes == sorted(boxes)  # raster order
    assert R.tile_boxes(256, 256, 256, 64) == [(0, 0, 256, 256)]
    with pytest.raises(ValueError, match="multiples of 16"):
        R.tile_boxes(1000, 1000, 256, 64)


def test_identity_stage_in_tiles_reproduces_the_input_over_any_canvas():
    g = torch.Generator().manual_seed(0)
    x, canvas = torch.rand(1, 3, 640, 640, generator=g), torch.rand(1, 3, 640, 640, generator=g)
    tiles = [((y, x0, th, tw), x[..., y:y + th, x0:x0 + tw]) for y, x0, th, tw in R.tile_boxes(640, 640, 256, 64)]
    assert (R.composite(canvas, tiles, 32) - x).abs().max() < 1e-6


def test_alpha_ramps_leave_no_seam():
    boxes = R.tile_boxes(512, 512, 256, 64)
    tiles = [((y, x, th, tw), torch.full((1, 1, th, tw), float(k))) for k, (y, x, th, tw) in enumerate(boxes)]
    out = R.composite(torch.zeros(1, 1, 512, 512), tiles, 32)
    step = max((out[..., 1:] - out[..., :-1]).abs().max(), (out[..., 1:, :] - out[..., :-1, :]).abs().max())
    assert step < 0.1 * len(boxes)  # neighbouring tiles differ by up to len(boxes) − 1; the ramps spread it
    hard = R.composite(torch.zeros(1, 1, 512, 512), tiles, 0)
    assert (hard[..., 1:] - hard[..., :-1]).abs().max() >= 1  # without ramps: a hard seam


# ---- masks, crops, stages, options --------------------------------------------------------------------------

def test_mask_is_resized_thresholded_or_refused():
    m = np.zeros((32, 32), np.float32)
    m[8:16, 8:16] = 1
    assert torch.equal(R.prepare_mask(m, (32, 32)), torch.from_numpy(m)[None, None])
    with pytest.warns(UserWarning, match="resized"):
        big = R.prepare_mask(Image.fromarray((m * 255).astype(np.uint8)), (64, 64))
    assert big.shape == (1, 1, 64, 64) and big.sum() == 4 * m.sum()
    soft = m * 0.7
    soft[0, 0] = 0.3
    with pytest.warns(UserWarning, match="2 grey|grey pixels"):
        hard = R.prepare_mask(soft, (32, 32))
    assert torch.equal(hard, torch.from_numpy(m)[None, None])
    with pytest.raises(ValueError, match="draw the mask at the image's size"):
        R.prepare_mask(m, (32, 48))
    with pytest.raises(ValueError, match="NaN"):
        R.prepare_mask(m * np.nan, (32, 32))
    with pytest.raises(ValueError, match="single-channel"):
        R.prepare_mask(np.zeros((2, 32, 32)), (32, 32))


def test_crop_box_and_stage_sides():
    m = torch.zeros(1, 1, 2048, 3072)
    m[..., 1000:1300, 2000:2100] = 1
    y, x, side = R.crop_box(m, 1.2, 64)
    assert side == 368 and side % 16 == 0
    assert y <= 1000 and y + side >= 1300 and x <= 2000 and x + side >= 2100
    edge = torch.zeros(1, 1, 512, 512)
    edge[..., :100, :100] = 1
    assert R.crop_box(edge, 1.0, 256) == (0, 0, 256)  # clamped to the image
    assert R.crop_box(torch.ones(1, 1, 256, 256), None, 64) == (0, 0, 256)
    with pytest.raises(ValueError, match="square"):
        R.crop_box(m, None, 64)
    assert [R.stage_sides(s, 64) for s in (64, 256, 512, 1024, 2048)] == [
        [64], [64, 256], [64, 256, 512], [64, 256, 1024], [64, 256, 1024, 2048]]
    assert [R.stage_sides(s, 64, 2) for s in (64, 256, 768, 1024)] == [
        [64], [64, 128, 256], [64, 128, 256, 512, 768], [64, 128, 256, 512, 1024]]


@pytest.mark.parametrize("bad,match", [(dict(candidates=0), "candidates"), (dict(blend="during"), "blend"),
                                       (dict(max_side=100), "max_side"), (dict(overlap=256), "overlap"),
                                       (dict(start=-0.1), "start"), (dict(margin=0.5), "margin"),
                                       (dict(stage_steps=3), "stage_steps"),
                                       (dict(backproject=-1), "backproject"), (dict(start_on="ddpm"), "start_on"),
                                       (dict(stage_guidance=-1), "stage_guidance"), (dict(lowpass="box"), "lowpass"),
                                       (dict(stage_ratio=3), "stage_ratio")])
def test_options_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        B.Options(**bad)


def test_stage_starts_carried_over_from_sd_by_noise_level():
    """MSBD's 0.4 and 0.25 start SD's 100-step grid at t = 391 and 241; carried over to another
    schedule, the stage starts at the grid step whose noise level is nearest."""
    sd = B.SD_SCHEDULE
    for start, t in ((0.4, 391), (0.25, 241)):
        assert int(S.timesteps(sd, 100, start)[0]) == t
        assert B.stage_strength(sd, B.Options(start_on="sd"), start) == pytest.approx(start, abs=0.01)
        assert B.stage_strength(sd, B.Options(), start) == start
    x4 = S.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, steps_offset=1)
    want = S.abar(sd, 391).item()
    ab = S.alphas_cumprod(x4)[S.timesteps(x4, 100)]
    s = B.stage_strength(x4, B.Options(start_on="sd"), 0.4)
    got = S.abar(x4, int(S.timesteps(x4, 100, s)[0])).item()
    assert abs(got - want) == (ab - want).abs().min().item()
    assert got < S.abar(x4, int(S.timesteps(x4, 100, 0.4)[0])).item()  # more noise than 0.4 on its own grid
    for n in (7, 22, 100, 500):  # every count of kept steps comes back, whatever the float rounding
        ab = S.alphas_cumprod(x4)[S.timesteps(x4, n)]
        assert [len(S.timesteps(x4, n, S.strength_at(x4, n, a))) for a in ab] == list(range(n, 0, -1))


# ---- the embedded cascade -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def editor():
    return B.MultiStage(engine.load().model, engine.load(DEFAULT_UPSCALER).model,
                        metrics.Scorer.from_pretrained(DEFAULT_MODEL))


def _scene(res):
    sc = world.scenes(907, 1)[0]
    new = sc.replace(0, colour="blue" if sc.objects[0].colour != "blue" else "red")
    mask = (world.masks(sc, res)[0] >= 0.5).astype(np.float32)
    return sc, new, torch.from_numpy(world.render_batch([sc], res)), mask


def test_edit_keeps_the_outside_exactly_and_is_deterministic(editor):
    _, new, src, mask = _scene(256)
    opts = B.Options(**FAST, max_side=128, overlap=32)  # stage 2 in 3 × 3 tiles
    res = editor.edit(src, mask, new.caption(), opts, progress=False)
    m = torch.from_numpy(mask)[None, None]
    assert [s.shape[-1] for s in res.stages] == [64, 256]
    assert res.log[1]["tiles"] == 9 and 0 < res.log[1]["skipped_tiles"] < 9
    assert torch.equal(res.image * (1 - m), src * (1 - m))
    inside = lambda im: (im - src).abs().mul(m).sum() / (3 * m.sum())  # noqa: E731
    assert inside(res.image) > 0.5 * inside(torch.from_numpy(world.render_batch([new], 256)))  # a recolour
    assert len(res.scores) == 2 and res.chosen == int(np.argmax(res.scores))
    again = editor.edit(src, mask, new.caption(), opts, progress=False)
    assert torch.equal(res.image, again.image)
    other = editor.edit(src, mask, new.caption(), replace(opts, seed=1), progress=False)
    assert not torch.equal(res.image, other.image)


def test_backprojected_stages_keep_stage_1_colours(editor):
    _, new, src, mask = _scene(256)
    inner = F.max_pool2d(-F.avg_pool2d(torch.from_numpy(mask)[None, None], 4), 3, 1, 1) == -1  # 64² blocks well inside
    assert inner.sum() > 20
    drift = {}
    for k in (0, 3):
        res = editor.edit(src, mask, new.caption(), B.Options(**FAST, backproject=k), progress=False)
        drift[k] = (F.avg_pool2d(res.stages[1], 4) - res.stages[0]).abs()[inner.expand(1, 3, -1, -1)].max().item()
    assert B.Options().backproject == 3
    assert drift[3] < 0.1 * drift[0], drift


def test_ratio_2_stages_upscale_the_previous_stage_as_it_is(editor):
    """MSBD's ×2 stages: the ×4 model upscales each stage whole and its output is resized to twice
    it; back-projected, each stage's 2×2 means are the stage below it, also in tiles."""
    _, new, src, mask = _scene(256)
    opts = B.Options(**FAST, stage_ratio=2, max_side=128, overlap=32)
    res = editor.edit(src, mask, new.caption(), opts, progress=False)
    m = torch.from_numpy(mask)[None, None]
    assert [s.shape[-1] for s in res.stages] == [64, 128, 256] and res.log[2]["tiles"] == 9
    assert torch.equal(res.image * (1 - m), src * (1 - m))
    inner = F.max_pool2d(-F.avg_pool2d(m, 4), 3, 1, 1) == -1  # 64² blocks well inside the mask
    for lo, hi in zip(res.stages, res.stages[1:]):
        inside = F.interpolate(inner.float(), size=lo.shape[-2:]).bool().expand(1, 3, -1, -1)
        assert (F.avg_pool2d(hi, 2) - lo).abs()[inside].max() < 0.02, hi.shape
    plain = editor.edit(src, mask, new.caption(), replace(opts, backproject=0), progress=False,
                        first=res.stages[0])
    drift = (F.avg_pool2d(plain.stages[1], 2) - res.stages[0]).abs()[inner.expand(1, 3, -1, -1)]
    assert drift.max() > 0.05  # without back-projection the means are not held by construction
    # SR only: the stage is the ×4 upscale of the whole previous stage, resized to twice it
    only = editor.edit(src, mask, new.caption(), replace(opts, start=0, tiled_start=0, backproject=0,
                                                         max_side=256), progress=False, first=res.stages[0])
    gen, sr = generator(opts.seed), editor.sr
    randn_tensor((1, 3, 32, 32), gen, sr.device, torch.float32)  # the ĉ of the stage's diffusion, not run
    den = sr.upscaler_denoiser(res.stages[0], opts.sr_noise_level,
                               randn_tensor((1, 3, 64, 64), gen, sr.device, torch.float32), opts.sr_guidance)
    z = randn_tensor((1, sr.vae.config.latent_channels, 256 // sr.downscale, 256 // sr.downscale), gen,
                     sr.device, torch.float32)
    cond = sr.prompt_cond([new.caption()], None, False)
    up = R.resize(sr.decode(ddim(den, z, cond, sr.scheduler, opts.sr_steps, progress=False)).float(), 128)
    m128 = R.binary_mask(m, 128)
    assert torch.allclose(only.stages[1] * m128, up * m128, atol=1e-5)


def test_edit_with_an_empty_mask_returns_the_source(editor):
    _, new, src, mask = _scene(256)
    with pytest.warns(UserWarning, match="empty"):
        res = editor.edit(src, mask * 0, new.caption(), B.Options(**FAST), progress=False)
    assert torch.equal(res.image, src)


def test_edit_variants_run_and_refuse_bad_input(editor):
    _, new, src, mask = _scene(256)
    for variant in (dict(upscaler="bicubic", stage_model="base", lowpass="half"),
                    dict(margin=1.2, candidates=1, dilate=2, lowpass="no"),
                    dict(backproject=0, max_side=128, overlap=32, start_on="sd", stage_guidance=7.5)):
        res = editor.edit(src, mask, new.caption(), B.Options(**{**FAST, **variant}), progress=False)
        m = torch.from_numpy(mask)[None, None]
        assert torch.equal(res.image * (1 - m), src * (1 - m))
    unguided = editor.edit(src, mask, new.caption(), B.Options(**{**FAST, **variant, "stage_guidance": None}),
                           progress=False, first=res.stages[0])
    assert not torch.equal(unguided.image, res.image)  # the stages ran with CFG 7.5
    sharp = editor.edit(src, mask, new.caption(), B.Options(**{**FAST, **variant, "lowpass": "no"}), progress=False,
                        first=res.stages[0])
    assert not torch.equal(sharp.image, res.image)  # the stages blended in the original as it is
    # start 0: no diffusion in the stages (MSBD's "SR only"): the edit is stage 1 upscaled, as it is
    only = editor.edit(src, mask, new.caption(), B.Options(**FAST, upscaler="bicubic", start=0, backproject=0),
                       progress=False, first=res.stages[0])
    m = torch.from_numpy(mask)[None, None]
    assert torch.equal(only.image * m, R.resize(res.stages[0], 256, "bicubic") * m)
    assert (B.Options().stage_cfg, B.Options(stage_model="base").stage_cfg, B.Options(stage_guidance=3).stage_cfg) == (
        1.0, 7.5, 3)
    first = res.stages[0]
    again = editor.edit(src, mask, new.caption(), B.Options(**FAST, upscaler="bicubic"), progress=False, first=first)
    assert torch.equal(again.stages[0], first) and not torch.equal(again.image, res.image)
    with pytest.raises(ValueError, match="stage-1 result"):
        editor.edit(src, mask, "x", B.Options(**FAST), progress=False, first=first[..., :32, :32])
    with pytest.raises(ValueError, match="NaN"):
        editor.edit(src * np.nan, mask, "x", B.Options(**FAST), progress=False)
    with pytest.raises(ValueError, match="at least the base model"):
        editor.edit(src[..., :48, :48], np.ones((48, 48)), "x", B.Options(**FAST), progress=False)
    no_scorer = B.MultiStage(editor.base, editor.sr)
    with pytest.raises(ValueError, match="CLIP scorer"):
        no_scorer.edit(src, mask, "x", B.Options(**FAST), progress=False)


def test_cli_blend(tmp_path, capsys, cli_error):
    sc, new, _, mask = _scene(128)
    src = images.save(Image.fromarray((world.render(sc, 128) * 255).round().astype(np.uint8)), tmp_path / "in.png")
    mpath = images.save(Image.fromarray((mask * 255).astype(np.uint8)), tmp_path / "mask.png")
    fast = ["--steps", "3", "--candidates", "2", "--repaint", "0", "--sr-steps", "2", "--stage-steps", "10", "--quiet"]
    out = tmp_path / "edit.png"
    assert main(["blend", "--image", str(src), "--mask", str(mpath), "--prompt", new.caption(), "--size", "256",
                 *fast, "--out", str(out)]) == 0
    assert "pixel for pixel" in capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["size"] == 256 and report["outside_mask_max_abs_diff"] == 0
    assert [s["side"] for s in report["stages"]] == [64, 256] and len(report["candidate_clip_scores"]) == 2
    assert Image.open(out).size == (256, 256) and (tmp_path / "edit_sheet.png").is_file()
    # the written image is the source outside the mask, byte for byte
    edit = np.asarray(Image.open(out)).astype(int)
    big = np.asarray(images.load(src).resize((256, 256), Image.LANCZOS)).astype(int)
    keep = np.asarray(Image.open(mpath).resize((256, 256), Image.NEAREST)) < 128
    assert (edit[keep] == big[keep]).all()
    jpg = tmp_path / "edit.jpg"  # lossy: the exactness is not promised for what is written
    assert main(["blend", "--image", str(src), "--mask", str(mpath), "--prompt", new.caption(),
                 "--size", "256", *fast, "--out", str(jpg)]) == 0
    assert "before .jpg compression, which changes it" in capsys.readouterr().out

    wide = images.save(Image.new("L", (128, 64)), tmp_path / "wide.png")
    args = ["blend", "--image", str(src), "--prompt", "x", *fast]
    cli_error([*args, "--mask", str(wide), "--out", str(tmp_path / "e2.png")], "wide.png is 128×64 but the image is 128×128")
    cli_error([*args, "--mask", str(wide), "--size", "256", "--out", str(tmp_path / "e2.png")], "wide.png is 128×64 but the image is 128×128")
    cli_error([*args, "--mask", str(tmp_path / "no.png"), "--out", str(tmp_path / "e2.png")], "no such image")
    cli_error([*args, "--mask", str(mpath), "--max-side", "100", "--out", str(tmp_path / "e2.png")], "max_side")
    cli_error([*args, "--mask", str(mpath), "--out", str(tmp_path / "e2.txt")], "extension")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli_error([*args, "--mask", str(mpath), "--size", "250", "--out", str(tmp_path / "e2.png")], "multiple of 16")
