"""The embedded model's recipe: a resumed stage equals an uninterrupted one; captions and hard negatives."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "weights" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(recipe, build, total, stop_at=None):
    """A toy stage under the name "clip": a linear layer fitted to random data drawn from each step's
    generators; raises KeyboardInterrupt before step stop_at."""
    recipe.BUILD = build
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = recipe.adamw(model.parameters(), 1e-2)

    def step(i, rng):
        if i == stop_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 4) + float(rng.normal())
        return recipe.update(model(x).square().mean(), opt, model)

    recipe.checkpointed("clip", {"model": model}, opt, total, step, every=2)
    return model.state_dict()


def test_a_resumed_stage_equals_an_uninterrupted_one(recipe, tmp_path):
    build = recipe.BUILD
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        whole = run_stage(recipe, tmp_path / "a", 6)
        with pytest.raises(KeyboardInterrupt):
            run_stage(recipe, tmp_path / "b", 6, stop_at=3)
        assert torch.load(tmp_path / "b" / "clip.pt", weights_only=False)["step"] == 2
        resumed = run_stage(recipe, tmp_path / "b", 6)
    finally:
        recipe.BUILD = build
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_bf16_steps_resume_in_bf16_only(recipe, tmp_path):
    build, precision = recipe.BUILD, recipe.PRECISION
    for d in "abcd":
        (tmp_path / d).mkdir()
    try:
        full = run_stage(recipe, tmp_path / "a", 6)
        recipe.PRECISION = "bf16"
        whole = run_stage(recipe, tmp_path / "b", 6)
        with pytest.raises(KeyboardInterrupt):
            run_stage(recipe, tmp_path / "c", 6, stop_at=3)
        resumed = run_stage(recipe, tmp_path / "c", 6)
        assert run_stage(recipe, tmp_path / "a", 6)["weight"].equal(full["weight"])  # finished: nothing to redo
        recipe.PRECISION = "fp32"
        with pytest.raises(KeyboardInterrupt):
            run_stage(recipe, tmp_path / "d", 6, stop_at=3)
        recipe.PRECISION = "bf16"
        with pytest.raises(recipe.RecipeError, match="--precision fp32"):
            run_stage(recipe, tmp_path / "d", 6)
    finally:
        recipe.BUILD, recipe.PRECISION = build, precision
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not torch.equal(whole["weight"], full["weight"])  # the bf16 steps did run in bf16


def test_stage_times_add_up_over_runs(recipe, tmp_path):
    build = recipe.BUILD
    recipe.BUILD = tmp_path
    try:
        recipe.record_time("vae", 10.0)
        recipe.record_time("vae", 2.5)
    finally:
        recipe.BUILD = build
    times = json.loads((tmp_path / "times.json").read_text())
    assert times["vae"]["seconds"] == 12.5 and times["vae"]["runs"] == 2


def test_a_killed_stage_has_its_time_written_down_up_to_its_last_checkpoint(recipe, tmp_path):
    build, clock = recipe.BUILD, recipe.CLOCK
    recipe.CLOCK = recipe.StageClock("clip")
    recipe.CLOCK.since -= 100.0  # as if the stage had started 100 s ago
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage(recipe, tmp_path, 6, stop_at=5)  # checkpoints at steps 2 and 4, then killed: no end lap
        entry = json.loads((tmp_path / "times.json").read_text())["clip"]
        recipe.CLOCK.since -= 50.0  # 50 s more when the stage ends
        recipe.CLOCK.lap()
    finally:
        recipe.BUILD, recipe.CLOCK = build, clock
    after = json.loads((tmp_path / "times.json").read_text())["clip"]
    assert entry["runs"] == 1 and 100.0 <= entry["seconds"] < 110.0
    assert after["runs"] == 1 and after["seconds"] >= entry["seconds"] + 50.0


def test_the_tokenizer_stage_makes_every_word_of_the_language_one_token(recipe, tmp_path):
    from engine.tokenizer import Tokenizer

    build = recipe.BUILD
    recipe.BUILD = tmp_path
    try:
        recipe.stage_tokenizer()
    finally:
        recipe.BUILD = build
    tok = Tokenizer.from_dir(tmp_path / "tokenizer")
    tables = (world.SIZE_WORDS, world.SHAPE_WORDS, world.COLOUR_WORDS, world.POSITION_WORDS, world.BACKGROUND_WORDS)
    phrases = [p for t in tables for ws in t.values() for p in ws] + list(world.BG_COLOURS)
    words = {w for p in phrases for w in re.findall(r"[a-z]+", p)}  # the pre-tokenizer splits "left-hand" at "-"
    split = [w for w in words if len(tok.encode(w)) != 3]  # one token is 3 ids with the start and end tokens
    assert len(words) > 50 and not split, split


def test_min_snr_weights_weigh_the_x0_error_as_epsilon_prediction_does_up_to_gamma(recipe):
    from engine import schedule

    sched = schedule.SchedulerConfig.from_dict(recipe.BASE_SCHED)
    abar = schedule.alphas_cumprod(sched).double()
    snr = abar / (1 - abar)
    x0_weight = recipe.min_snr_weights(sched).double() * (1 + snr)  # a v error is (1 + SNR)·x0 error, squared
    mid, capped = (snr > 0.2) & (snr < 5), (snr > 5) & (snr < 40)
    assert mid.sum() > 300 and torch.allclose(x0_weight[mid], snr[mid], rtol=1e-5)  # ε-prediction: SNR·x0 error
    assert capped.sum() > 50 and torch.allclose(x0_weight[capped], torch.full_like(snr[capped], 5.0), rtol=1e-4)
    v_weight = recipe.min_snr_weights(sched)
    assert v_weight.min() == pytest.approx(0.1) and v_weight[-1] == pytest.approx(0.1)  # pure noise still learns


def test_hard_negatives_change_a_named_attribute(recipe):
    ss = world.scenes(recipe.TRAIN_SEED, 200)
    caps = recipe.captions(ss)
    rng = np.random.default_rng(0)
    for i, s in enumerate(ss):
        for j in range(recipe.CAPTIONS):
            assert recipe.hard_negative(s, i, j, rng) != caps[i][j]
    assert all(cs[0] == s.caption() for cs, s in zip(caps, ss))
