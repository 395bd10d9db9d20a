"""Every flag that sets a parameter of the Python API has the API's default (and says so in its
help), so that a default changed in one place only fails here."""
import argparse
import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch

import engine
from engine import demo, multires
from engine.api import Limits
from engine.blended import Options
from engine.cli import parser
from engine.flags import flag
from engine.iterinv import Cascade
from engine.jobs import Worker
from engine.multires import TrainConfig
from engine.pipeline import Pipeline

# command: (the APIs its flags feed, {flag dest: (API, parameter), or None for no API parameter})
APIS = {
    "generate": ([Pipeline.generate, engine.load], {}),
    "img2img": ([Pipeline.img2img, engine.load], {}),
    "inpaint": ([Pipeline.inpaint, engine.load], {}),
    "upscale": ([Pipeline.upscale, engine.load], {}),
    "invert": ([Pipeline.invert, engine.load], {}),
    "edit": ([Pipeline.edit, engine.load], {}),
    "p2p": ([Pipeline.prompt_to_prompt, engine.load], {}),
    "iterinv": ([Cascade.invert, Cascade, engine.load], {"mode": (Cascade.invert, "method")}),
    "iterinv-edit": ([Cascade.invert, Cascade.edit, Cascade, engine.load],
                     {"mode": (Cascade.invert, "method"), "guidance": (Cascade.invert, "guidance"),
                      "edit_guidance": (Cascade.edit, "guidance")}),
    "blend": ([Options, engine.load], {"upscaler": None, "upscale_with": (Options, "upscaler")}),
    "train-ti": ([TrainConfig, multires.load_images, engine.load], {}),
    "export-ti": ([multires.export_row], {}),
    "serve": ([Worker, Limits, engine.load], {"upscaler": None}),
    "demo": ([demo.run], {}),
}


def _defaults(api) -> dict:
    if dataclasses.is_dataclass(api):
        return {f.name: f.default for f in dataclasses.fields(api)
                if f.default is not dataclasses.MISSING}
    return {k: v.default for k, v in inspect.signature(api).parameters.items()
            if v.default is not inspect.Parameter.empty}


def _as_flag(v):
    """An API default as the command line holds it."""
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return list(v) if isinstance(v, tuple) else v


def _commands() -> dict:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_command_is_listed():
    assert set(_commands()) == set(APIS)


@pytest.mark.parametrize("command", sorted(APIS))
def test_flag_defaults_are_the_apis(command):
    apis, special = APIS[command]
    checked = []
    for action in _commands()[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.dest in special:
            targets = [special[action.dest]] if special[action.dest] else []
        else:
            targets = [(api, action.dest) for api in apis if action.dest in _defaults(api)]
        for api, name in targets:
            want = _as_flag(_defaults(api)[name])
            where = f"{command} {action.option_strings[0]} vs {api.__qualname__}({name}=…)"
            assert action.default == want and type(action.default) is type(want), where
            if isinstance(want, (int, float, str)) and not isinstance(want, bool) and want != "":
                shown = f"{want:g}" if isinstance(want, float) else str(want)
                assert f"(default {shown}" in action.help, where
            checked.append(action.dest)
    assert checked, f"{command}: no flag matched an API parameter"


def test_flag_takes_default_type_and_help_from_the_api(tmp_path, monkeypatch):
    (tmp_path / "some_api.py").write_text(
        "class Thing:\n"
        "    def run(self, steps=30, scale=2.5, name=None, *, mode='fast'):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(tmp_path)
    api = "some_api:Thing.run"

    p = argparse.ArgumentParser()
    flag(p, "--steps", api, "steps")
    flag(p, "--guidance", api, "CFG", param="scale", note="; ≤ 1 is off")
    flag(p, "--name", api, "a name", none="the model's")
    flag(p, "--mode", api, "mode", choices=["fast", "slow"])
    helps = {a.dest: a.help for a in p._actions}
    assert helps["steps"] == "steps (default 30)"
    assert helps["guidance"] == "CFG (default 2.5; ≤ 1 is off)"
    assert helps["name"] == "a name (default: the model's)"
    assert helps["mode"] == "mode (default fast)"
    assert vars(p.parse_args([])) == {"steps": 30, "guidance": 2.5, "name": None, "mode": "fast"}
    assert p.parse_args(["--steps", "4", "--guidance", "3"]).guidance == 3.0
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "4.5"])


def test_help_imports_no_torch():
    """Every command's --help is quick: building the parser imports no torch."""
    code = ("import sys, engine.cli as c; c.parser(); import engine; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fast_is_the_measured_fast_default():
    import json
    from pathlib import Path

    from engine import flags

    measured = json.loads((Path(__file__).resolve().parent.parent / "bench/results/samplers.json").read_text())
    assert flags.FAST == measured["fast_default"]
    base = ["generate", "--prompt", "x", "--out", "o.png"]
    a = parser().parse_args(base + ["--fast"])
    assert {"sampler": a.sampler, "steps": a.steps} == flags.FAST
    a = parser().parse_args(base + ["--fast", "--steps", "30"])
    assert (a.sampler, a.steps) == (flags.FAST["sampler"], 30)
