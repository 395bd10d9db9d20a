"""The memory budget (engine.memory): sizes, the fitting size a refusal names, and the estimate
against a measured peak."""
import json
import subprocess
import sys

import pytest
import torch

import engine
from engine import memory


@pytest.mark.parametrize("text,want", [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("8GB", 8 * 2**30),
                                       ("8GiB", 8 * 2**30), ("1.5g", 3 * 2**29), ("4096", 4096),
                                       (10**9, 10**9)])
def test_parse_size(text, want):
    assert memory.parse_size(text) == want


@pytest.mark.parametrize("bad", ["lots", "0", "-1G", "8X", "", 0, True])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError, match="need a size such as 8G"):
        memory.parse_size(bad)


def test_check_names_the_largest_size_that_fits():
    def need(h, w):
        return 1000 + 3 * h * w

    budget = need(640, 480) + 5
    memory.check("job", need, 640, 480, budget, 8, "fix it")  # fits: no error
    with pytest.raises(memory.OutOfMemory) as e:
        memory.check("job", need, 4000, 3000, budget, 8, "fix it")
    msg = str(e.value)
    fit = msg.split("(")[1].split(" fits")[0]
    h, w = map(int, fit.split("×"))
    assert h % 8 == 0 and w % 8 == 0 and need(h, w) <= budget
    assert need(h + 8, w + 8) > budget
    assert msg.startswith("job at 4000×3000 needs about") and msg.endswith("; fix it")
    with pytest.raises(memory.OutOfMemory, match="no size fits"):
        memory.check("job", need, 640, 480, 999, 8, "fix it")


def test_generate_refused_under_max_memory_before_any_work():
    pipe = engine.load(max_memory="600M")
    with pytest.raises(memory.OutOfMemory, match=r"generate at 4096×4096 needs about .* fits\); "
                       r"pass a smaller height / width \(--height, --width\)"):
        pipe.generate("a red star", height=4096, width=4096, steps=1, progress=False)


def _covers(script: str, *args: str):
    """Run a script printing [measured peak, estimate]: the estimate is at least the peak and
    under twice it."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         check=True)
    measured, estimate = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured <= estimate < 2 * measured, (measured, estimate)


_RSS = """
import json, re
def rss(k):
    return int(re.search(k + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
"""

_PEAK = _RSS + """
import sys
import engine
from engine.memory import OVERHEAD
pipe, side = engine.load(), int(sys.argv[1])
pipe.generate("a red star", steps=1, height=32, width=32, progress=False)
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
pipe.generate("a red star", steps=2, height=side, width=side, progress=False)
print(json.dumps([rss("VmHWM") - base, OVERHEAD + max(pipe.model.peak_memory(side, side, 2, 1))]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_estimate_covers_the_measured_peak_and_is_not_far_above():
    """generate at 1024² on the embedded model (latent 256², CFG batch 2): the estimate the check
    uses is at least the measured peak, and under twice it."""
    _covers(_PEAK, "1024")


_TILED_PEAK = _RSS + """
import torch
import engine
from engine import tiled_vae
from engine.memory import OVERHEAD
m = engine.load().model
z = torch.randn(1, m.vae.config.latent_channels, 512, 512)
with torch.no_grad():
    tiled_vae.decode_latents(m.vae, z[..., :64, :64], pixels=0)
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    tiled_vae.decode_latents(m.vae, z)
print(json.dumps([rss("VmHWM") - base, OVERHEAD + m.peak_memory(2048, 2048, 1, 1)[1]]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tiled_decode_estimate_covers_the_measured_peak():
    """The embedded VAE decoding to 2048², tiled by default: the whole activations kept between
    stretches of tiles are in the estimate, which stays under twice the measured peak."""
    _covers(_TILED_PEAK)



def test_bf16_weight_copies_are_counted_until_made():
    """In bf16 on the CPU each weight gets a reordered copy at its first use (engine.kernels.cpu):
    the guard counts the copies still to be made, and no longer those made."""
    pipe = engine.load(dtype="bfloat16")
    m = pipe.model
    weights = sum(p.nbytes for c in (m.unet, m.vae, m.text_encoder) for p in c.parameters()
                  if p.dim() >= 2 and p.dtype == torch.bfloat16)
    assert m.reordered_bytes() == weights > 0
    pipe.generate("a red star", steps=1, progress=False)
    assert m.reordered_bytes() < weights / 2, (m.reordered_bytes(), weights)
    assert engine.load().model.reordered_bytes() == 0  # fp32: used as they are
