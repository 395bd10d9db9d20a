"""Tiled VAE encode/decode (engine.tiled_vae) equals the untiled one.

Random-weight small VAEs (f=2, 4, 8; with and without mid-block attention and quant convs), fp32 on
the CPU, batch 2, latent sizes that are not multiples of the tile, tiles forced small so there are
many of them. Tolerance: max abs diff <= 1e-4 on every output. Also: the strategy's switch (pixel
budget and tile side from arguments, else the environment; never tiled when recording gradients),
its validation errors, and that the VAE module itself never tiles.
"""
import ast
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine import tiled_vae
from engine.models.vae import AutoencoderKL, VAEConfig

TOL = 1e-4
UNTILED = 10 ** 9  # a pixel budget no test image reaches

CONFIGS = {
    "f4_attn": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1),
    "f8_attn": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
    "f2_plain": dict(block_out_channels=(16, 32), norm_num_groups=16, layers_per_block=2,
                     latent_channels=8, mid_block_add_attention=False, use_quant_conv=False,
                     use_post_quant_conv=False),
}


def _vae(kw):
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so per-tile statistics would show
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return vae


@pytest.fixture(scope="module", params=list(CONFIGS))
def vae(request):
    return _vae(CONFIGS[request.param])


def _close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g} > {TOL}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_decode_equals_untiled(vae):
    z = torch.randn(2, vae.config.latent_channels, 13, 11, generator=_gen(1))
    ref = vae.decode(z)
    assert ref.std() > 0.1
    _close(tiled_vae.decode(vae, z, tile=4), ref)  # 4 × 3 tiles, uneven
    latents = vae.latents(z, torch.zeros_like(z))
    _close(tiled_vae.decode_latents(vae, latents, pixels=0, tile=4), vae.decode_latents(latents))


@torch.no_grad()
@pytest.mark.parametrize("extra", [(0, 0), (3, 1)])  # sides multiples of the downscale, and not
def test_encode_equals_untiled(vae, extra):
    f = vae.downscale
    x = torch.rand(2, 3, 9 * f + extra[0], 7 * f + extra[1], generator=_gen(2)) * 2 - 1
    mean, logvar = vae.encode(x)
    tiled = vae.moments(tiled_vae.encode(vae, x, tile=3))
    _close(tiled[0], mean)
    _close(tiled[1], logvar)
    for sample in (False, True):  # the entry point: tiled encode, then the same scaling and draw
        ref = vae.encode_latents(x, sample, _gen(5))
        _close(tiled_vae.encode_latents(vae, x, sample, _gen(5), pixels=0, tile=3), ref)


@torch.no_grad()
def test_untiled_path_is_the_plain_vae(vae):
    """Under the budget the entry points are exactly the module's own untiled compositions, run one image at a
    time (so that an image's result does not depend on its batch); the latents are drawn for the whole batch."""
    z = torch.randn(2, vae.config.latent_channels, 5, 6, generator=_gen(6))
    x = torch.rand(2, 3, 5 * vae.downscale, 6 * vae.downscale, generator=_gen(7)) * 2 - 1
    assert torch.equal(tiled_vae.decode_latents(vae, z, pixels=UNTILED),
                       torch.cat([vae.decode_latents(one) for one in z.split(1)]))
    moments = [torch.cat(m) for m in zip(*(vae.encode(one) for one in x.split(1)))]
    for sample in (False, True):
        assert torch.equal(tiled_vae.encode_latents(vae, x, sample, _gen(8), pixels=UNTILED),
                           vae.latents(*moments, sample, _gen(8)))
    assert torch.equal(tiled_vae.decode_latents(vae, z[1:], pixels=UNTILED),
                       tiled_vae.decode_latents(vae, z, pixels=UNTILED)[1:])


@torch.no_grad()
def test_synchronised_statistics_make_it_exact(monkeypatch):
    """The same tiles with each crop's own GroupNorm statistics are far off: the sync is what makes
    it exact."""
    vae = _vae(CONFIGS["f4_attn"])
    z = torch.randn(1, 4, 12, 12, generator=_gen(3))
    ref = vae.decode(z)
    monkeypatch.setattr(tiled_vae, "_norm", lambda gn, x, mean, var, act: kernels.group_norm(
        x, gn.num_groups, gn.weight, gn.bias, gn.eps, act))
    assert (tiled_vae.decode(vae, z, tile=4) - ref).abs().max() > 1e-2


def test_switch_by_pixel_budget(monkeypatch):
    vae = _vae(CONFIGS["f4_attn"])
    calls = []
    for name in ("decode", "encode"):
        real = getattr(tiled_vae, name)

        def spy(vae, t, tile=None, real=real, name=name):
            calls.append((name, tile))
            return real(vae, t, tile)
        monkeypatch.setattr(tiled_vae, name, spy)
    z, x = torch.randn(1, 4, 6, 5), torch.rand(1, 3, 24, 20)
    monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", str(24 * 20))  # = the image: not above the budget
    with torch.no_grad():
        tiled_vae.decode_latents(vae, z), tiled_vae.encode_latents(vae, x)
        assert calls == []
        monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", str(24 * 20 - 1))
        monkeypatch.setenv("ENGINE_VAE_TILE", "2")
        vae.decode_latents(z), vae.encode_latents(x), vae.decode(z), vae.encode(x)
        assert calls == []  # the module itself never tiles, whatever the environment
        tiled_vae.decode_latents(vae, z), tiled_vae.encode_latents(vae, x)
        assert calls == [("decode", 2), ("encode", 2)]
    tiled_vae.decode_latents(vae, z)  # recording gradients: never tiled
    tiled_vae.encode_latents(vae, x, pixels=0)
    assert calls == [("decode", 2), ("encode", 2)]
    with torch.no_grad():  # arguments win over the environment, both ways
        tiled_vae.decode_latents(vae, z, pixels=UNTILED), tiled_vae.encode_latents(vae, x, tile=9)
        assert calls == [("decode", 2), ("encode", 2), ("encode", 9)]
        monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", str(UNTILED))
        tiled_vae.decode_latents(vae, z, pixels=0, tile=3)
        tiled_vae.encode_latents(vae, x, pixels=24 * 20)
    assert calls == [("decode", 2), ("encode", 2), ("encode", 9), ("decode", 3)]
    assert tiled_vae.settings(vae, pixels=7, tile=5) == (7, 5)
    assert tiled_vae.settings(vae) == (UNTILED, 2)


def test_vae_module_is_plain():
    """No tile attributes on the VAE, and nothing under engine/models imports engine.tiled_vae."""
    vae = _vae(CONFIGS["f2_plain"])
    assert not any(hasattr(vae, a) for a in ("tile_pixels", "tile_size"))
    models = Path(tiled_vae.__file__).parent / "models"
    for path in sorted(models.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
                assert not any("tiled_vae" in n for n in names), f"{path.name} imports tiled_vae"


def test_default_tile_is_512_image_pixels(monkeypatch):
    monkeypatch.delenv("ENGINE_VAE_TILE_PIXELS", raising=False)
    monkeypatch.delenv("ENGINE_VAE_TILE", raising=False)
    for name, tile in (("f8_attn", 64), ("f4_attn", 128)):
        assert tiled_vae.settings(_vae(CONFIGS[name])) == (1024 * 1024, tile)


@pytest.mark.parametrize("name,value", [("tile", 0), ("tile", -3), ("tile", "big"), ("tile", 2.5),
                                        ("pixels", -1), ("pixels", "1M")])
def test_bad_settings(name, value):
    vae = _vae(CONFIGS["f2_plain"])
    with torch.no_grad():  # raised even below the budget, where nothing is tiled
        with pytest.raises(ValueError, match=f"VAE tiling: {name}"):
            tiled_vae.decode_latents(vae, torch.randn(1, 8, 4, 4), **{name: value})
        with pytest.raises(ValueError, match=f"VAE tiling: {name}"):
            tiled_vae.encode_latents(vae, torch.rand(1, 3, 8, 8), **{name: value})


@pytest.mark.parametrize("env", ["ENGINE_VAE_TILE_PIXELS", "ENGINE_VAE_TILE"])
def test_bad_env_and_argument(monkeypatch, env):
    vae = _vae(CONFIGS["f2_plain"])
    monkeypatch.setenv(env, "lots")
    with pytest.raises(ValueError, match=rf"\(env {env}\)"):
        tiled_vae.decode_latents(vae, torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="tile=0"):
        tiled_vae.decode(vae, torch.randn(1, 8, 4, 4), tile=0)


def test_the_runtime_model_applies_the_strategy(monkeypatch):
    """engine.model.Model encodes and decodes through tiled_vae: tiled above its budget."""
    import engine

    m = engine.load().model
    calls = []
    for name in ("encode", "decode"):
        real = getattr(tiled_vae, name)
        monkeypatch.setattr(tiled_vae, name, lambda vae, t, tile=None, real=real, name=name:
                            calls.append(name) or real(vae, t, tile))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # as the Pipeline runs them
        plain = m.vae.decode_latents(m.vae.encode_latents(x))
        assert m.decode(m.encode(x)).shape == plain.shape and calls == []  # under the budget
        m.tile_pixels, m.tile_size = 0, 4
        _close(m.decode(m.encode(x)), plain)
    assert calls == ["encode", "decode"]


def test_papers_take_models_not_pipelines():
    import engine
    from engine.iterinv import Cascade
    from engine.embedded import DEFAULT_UPSCALER

    base, sr = engine.load(), engine.load(DEFAULT_UPSCALER)
    with pytest.raises(TypeError, match=r"a Pipeline's \.model"):
        Cascade(base, sr)
    Cascade(base.model, sr.model)
    with pytest.raises(AttributeError):
        base.semi = "remove"  # the façade has no settings of its own: pipe.model.semi


@torch.no_grad()
def test_stretches_end_where_the_activation_fits_the_buffer(monkeypatch):
    """With room for whole activations (but not for a layer's whole working set) the decode runs in many short
    stretches (few statistics passes each), without it in one; both exact."""
    vae = _vae(CONFIGS["f8_attn"])
    z = torch.randn(1, 4, 9, 10, generator=_gen(4))
    ref = vae.decode(z)
    tiled = tiled_vae._tiled
    monkeypatch.setattr(tiled_vae, "WORKING", 10 ** 9)
    for budget, few in ((1 << 30, False), (0, True)):
        calls = []
        monkeypatch.setattr(tiled_vae, "BUFFER_BYTES", budget)
        monkeypatch.setattr(tiled_vae, "_tiled", lambda *a, **k: calls.append(1) or tiled(*a, **k))
        _close(tiled_vae.decode(vae, z, tile=4), ref)
        assert (len(calls) <= 2) == few, len(calls)


@torch.no_grad()
def test_layers_whose_working_set_fits_run_whole(monkeypatch):
    """A layer whose input is kept and whose working set fits the buffer runs once, untiled (each conv called
    once, plus one shape probe); without room, the statistics passes call convolutions again."""
    vae = _vae(CONFIGS["f8_attn"])
    z = torch.randn(1, 4, 8, 8, generator=_gen(4))
    ref = vae.decode(z)
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    for budget in (1 << 30, 0):
        calls = dict.fromkeys(map(id, convs), 0)
        hooks = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for m in convs]
        monkeypatch.setattr(tiled_vae, "BUFFER_BYTES", budget)
        try:
            out = tiled_vae.decode(vae, z, tile=4)
        finally:
            for h in hooks:
                h.remove()
        _close(out, ref)
        assert (max(calls.values()) == 2) == bool(budget), calls
