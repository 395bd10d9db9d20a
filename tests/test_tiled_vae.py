"""Tiled VAE encode/decode (engine.tiled_vae) equals the untiled one.

Random-weight small VAEs (f=2, 4, 8; with and without mid-block attention and quant convs), fp32 on the CPU,
batch 2, latent sizes that are not multiples of the tile, tiles forced small so there are many of them.
Tolerance: max abs diff <= 1e-4 on every output.
"""
import pytest
import torch

from engine import kernels
from engine import tiled_vae
from engine.models.vae import AutoencoderKL, VAEConfig

TOL = 1e-4

CONFIGS = {
    "f4_attn": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1),
    "f8_attn": dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
    "f2_plain": dict(block_out_channels=(16, 32), norm_num_groups=16, layers_per_block=2, latent_channels=8,
                     mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
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
    vae.tile_pixels = 10 ** 9  # untiled unless a test says otherwise
    return vae


@pytest.fixture(scope="module", params=list(CONFIGS))
def vae(request):
    return _vae(CONFIGS[request.param])


def _close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g} > {TOL}"


@torch.no_grad()
def test_decode_equals_untiled(vae):
    z = torch.randn(2, vae.config.latent_channels, 13, 11, generator=torch.Generator().manual_seed(1))
    ref = vae.decode(z)
    assert ref.std() > 0.1
    _close(tiled_vae.decode(vae, z, tile=4), ref)  # 4 × 3 tiles, uneven


@torch.no_grad()
@pytest.mark.parametrize("extra", [(0, 0), (3, 1)])  # image sides multiples of the downscale factor, and not
def test_encode_equals_untiled(vae, extra):
    f = vae.downscale
    x = torch.rand(2, 3, 9 * f + extra[0], 7 * f + extra[1], generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = vae.encode(x)
    vae.tile_pixels, vae.tile_size = 0, 3
    try:
        tiled = vae.encode(x)
    finally:
        vae.tile_pixels, vae.tile_size = 10 ** 9, None
    _close(tiled[0], mean)
    _close(tiled[1], logvar)


@torch.no_grad()
def test_synchronised_statistics_make_it_exact(monkeypatch):
    """The same tiles with each crop's own GroupNorm statistics are far off: the sync is what makes it exact."""
    vae = _vae(CONFIGS["f4_attn"])
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    ref = vae.decode(z)
    monkeypatch.setattr(tiled_vae, "_norm", lambda gn, x, mean, var, act: kernels.group_norm(
        x, gn.num_groups, gn.weight, gn.bias, gn.eps, act))
    assert (tiled_vae.decode(vae, z, tile=4) - ref).abs().max() > 1e-2


def test_switch_by_pixel_budget(monkeypatch):
    vae = _vae(CONFIGS["f4_attn"])
    calls = []
    for name in ("decode", "encode"):
        real = getattr(tiled_vae, name)
        monkeypatch.setattr(tiled_vae, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    z, x = torch.randn(1, 4, 6, 5), torch.rand(1, 3, 24, 20)
    vae.tile_pixels = None
    monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", str(24 * 20))  # = the image: not above the budget
    with torch.no_grad():
        vae.decode_latents(z), vae.encode_latents(x)
        assert calls == []
        monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", str(24 * 20 - 1))
        monkeypatch.setenv("ENGINE_VAE_TILE", "2")
        vae.decode_latents(z), vae.encode_latents(x)
        assert calls == ["decode", "encode"]
    vae.decode(z)  # recording gradients: never tiled
    assert calls == ["decode", "encode"]
    vae.tile_pixels = 10 ** 9  # the attribute wins over the environment
    with torch.no_grad():
        vae.decode(z)
    assert calls == ["decode", "encode"]


def test_default_tile_is_512_image_pixels(monkeypatch):
    monkeypatch.delenv("ENGINE_VAE_TILE_PIXELS", raising=False)
    monkeypatch.delenv("ENGINE_VAE_TILE", raising=False)
    for name, tile in (("f8_attn", 64), ("f4_attn", 128)):
        vae = _vae(CONFIGS[name])
        vae.tile_pixels = None
        assert tiled_vae.settings(vae) == (1024 * 1024, tile)


@pytest.mark.parametrize("attr,value", [("tile_size", 0), ("tile_size", -3), ("tile_size", "big"),
                                        ("tile_size", 2.5), ("tile_pixels", -1), ("tile_pixels", "1M")])
def test_bad_settings(attr, value):
    vae = _vae(CONFIGS["f2_plain"])
    setattr(vae, attr, value)
    with torch.no_grad(), pytest.raises(ValueError, match=f"VAE tiling: {attr}"):
        vae.decode(torch.randn(1, 8, 4, 4))


def test_bad_env_and_argument(monkeypatch):
    vae = _vae(CONFIGS["f2_plain"])
    vae.tile_pixels = None
    monkeypatch.setenv("ENGINE_VAE_TILE_PIXELS", "lots")
    with pytest.raises(ValueError, match="ENGINE_VAE_TILE_PIXELS"):
        vae.decode(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="tile=0"):
        tiled_vae.decode(vae, torch.randn(1, 8, 4, 4), tile=0)
