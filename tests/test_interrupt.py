"""Ctrl-C (SIGINT) and SIGTERM during a command: one `interrupted:` line, exit 130 / 143, and none
of the command's outputs left behind (a train-ti checkpoint stays, with how to resume)."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from engine import world


def interrupt(args, cwd, ready, signum=signal.SIGINT, timeout=180):
    """Start `python -m engine ARGS`, send `signum` once ready(stderr so far) holds; (rc, stderr)."""
    log = cwd / "stderr.txt"
    with open(log, "w") as err:
        # a test run started in the background ignores SIGINT, and its children would inherit that
        proc = subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        t0 = time.time()
        try:
            while not ready(log.read_text()):
                assert proc.poll() is None, "it finished before it could be interrupted"
                assert time.time() - t0 < timeout, "it never got going"
                time.sleep(0.1)
            proc.send_signal(signum)
            rc = proc.wait(timeout=60)
        finally:
            proc.kill()
    return rc, log.read_text()


def left(folder):
    """What a command left in a folder: every file but the test's own log."""
    return sorted(p.name for p in folder.rglob("*") if p.name != "stderr.txt")


def started(bar):
    return lambda text: f"{bar}:" in text


def scene_png(path, side):
    pixels = world.render(world.scenes(5, 1)[0], side)
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_generate(tmp_path, signum, code):
    (tmp_path / "out").mkdir()
    rc, err = interrupt(["generate", "--prompt", "a red star", "--steps", "900", "--out",
                         "out/a.png"], tmp_path, started("generate"), signum)
    assert rc == code and err.strip().splitlines()[-1] == "interrupted: no output written"
    assert left(tmp_path) == ["out"]


def test_iterinv_leaves_no_folder(tmp_path):
    image = scene_png(tmp_path / "in.png", 256)
    rc, err = interrupt(["iterinv", "--image", str(image), "--prompt", "x", "--steps", "900",
                         "--out", "res"], tmp_path, started("invert"))
    assert rc == 130 and "interrupted:" in err.splitlines()[-1]
    assert left(tmp_path) == ["in.png"]


def test_demo_leaves_no_folder(tmp_path):
    rc, err = interrupt(["demo", "--steps", "900", "--out", "d/e"], tmp_path, started("generate"))
    assert rc == 130 and "interrupted:" in err.splitlines()[-1]
    assert left(tmp_path) == []


def test_train_ti_keeps_its_checkpoint_and_says_how_to_resume(tmp_path):
    (tmp_path / "imgs").mkdir()
    scene_png(tmp_path / "imgs" / "a.png", 64)
    ckpt = tmp_path / "c.ckpt.safetensors"
    rc, err = interrupt(["train-ti", "--images", "imgs", "--token", "c", "--init-token", "star",
                         "--steps", "900", "--checkpoint-every", "2", "--out", "c.safetensors"],
                        tmp_path, lambda _: ckpt.is_file())
    assert rc == 130
    assert err.strip().splitlines()[-1] == \
        f"interrupted: rerun the same command to resume from {ckpt.name}"
    assert left(tmp_path) == ["a.png", "c.ckpt.safetensors", "imgs"]


def mask_png(path, side):
    m = np.zeros((side, side), np.uint8)
    m[side // 4:3 * side // 4, side // 4:3 * side // 4] = 255
    Image.fromarray(m).save(path)
    return path


LONG = [  # (the command line, a progress bar it runs once working); inputs: in.png 64², small.png
    # 16², mask.png
    ("img2img --image in.png --prompt x --strength 1 --steps 900 --out o.png --profile prof",
     "img2img:"),
    ("upscale --image small.png --prompt x --steps 900 --out o.png", "upscale to 64²:"),
    ("invert --image in.png --steps 900 --out o.safetensors", "invert:"),
    ("edit --image in.png --prompt x --steps 900 --out o.png", "invert:"),
    ("iterinv-edit --image in.png --prompt x --edit y --steps 900 --out res", "invert:"),
    ("blend --image in.png --mask mask.png --prompt x --steps 900 --out o.png", "stage 1/"),
]


@pytest.mark.parametrize("args,bar", LONG, ids=[a.split()[0] for a, _ in LONG])
def test_interrupted_command_leaves_nothing(tmp_path, args, bar):
    inputs = [scene_png(tmp_path / "in.png", 64), scene_png(tmp_path / "small.png", 16),
              mask_png(tmp_path / "mask.png", 64)]
    rc, err = interrupt(args.split(), tmp_path, lambda text: bar in text)
    lines = err.strip().splitlines()
    assert rc == 130 and "Traceback" not in err, err
    assert lines[-1] == "interrupted: no output written"
    assert sum(line.startswith("interrupted:") for line in lines) == 1
    # no output, sidecar (o_sheet.png, o.json, o.png of invert), temporary, folder or --profile
    assert left(tmp_path) == sorted(p.name for p in inputs)
