"""The embedded model's recipe: a resumed stage equals an uninterrupted one; captions and hard negatives."""
import importlib.util
import json
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


def test_hard_negatives_change_a_named_attribute(recipe):
    ss = world.scenes(recipe.TRAIN_SEED, 200)
    caps = recipe.captions(ss)
    rng = np.random.default_rng(0)
    for i, s in enumerate(ss):
        for j in range(recipe.CAPTIONS):
            assert recipe.hard_negative(s, i, j, rng) != caps[i][j]
    assert all(cs[0] == s.caption() for cs, s in zip(caps, ss))
