"""Installed normally (not editable), the engine imports beside the current diffusers, transformers and PyPI's
unrelated `kernels` package, and runs from a folder that is not the repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of a copy of the repository's tracked files, in a folder of its own."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():  # a file deleted in the work tree is not copied
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)], check=True)
    return target


def run(code_or_args, site, cwd):
    env = {**os.environ, "PYTHONPATH": str(site)}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_one_process_holds_engine_diffusers_transformers_and_pypi_kernels(installed, tmp_path):
    pytest.importorskip("kernels")  # PyPI's, pulled in by transformers
    r = run("import engine, engine.kernels, diffusers, transformers, kernels\n"
            "from diffusers import AutoencoderKL, UNet2DConditionModel\n"
            "from transformers import CLIPTextModel\n"
            "assert engine.kernels.__file__.startswith(engine.__path__[0]), engine.kernels.__file__\n"
            "assert not kernels.__file__.startswith(engine.__path__[0]), kernels.__file__\n"
            "print(engine.__file__)", installed, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(installed))


def test_generate_runs_from_a_foreign_folder(installed, tmp_path):
    out = tmp_path / "a.png"
    r = run(["-m", "engine", "generate", "--prompt", "a red star", "--steps", "2", "--quiet", "--out", str(out)],
            installed, tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
