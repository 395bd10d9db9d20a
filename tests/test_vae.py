"""Parity of engine.models.vae.AutoencoderKL with diffusers' AutoencoderKL (test-only reference).

Random-init small diffusers VAEs are saved with save_pretrained, loaded into ours from the safetensors
file on the meta device with assign=True, and compared in fp32 on the CPU on non-square images.
Tolerance: max abs diff <= 1e-4 on every output.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.models.vae import AutoencoderKL, VAEConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

CONFIGS = {
    "f8": dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1, sample_size=32),
    # like the x4 upscaler's VAE: 3 levels, f=4, its own scaling factor
    "f4": dict(block_out_channels=(16, 32, 64), norm_num_groups=8, layers_per_block=2, sample_size=64,
               scaling_factor=0.08333),
    "no_quant_no_attn": dict(block_out_channels=(32, 64), norm_num_groups=16, layers_per_block=1,
                             use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                             latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
}


def _diffusers_vae(kw):
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kw).eval()
    with torch.no_grad():  # make norms and biases non-trivial so a misplaced affine or bias shows up
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return ref


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    ref = _diffusers_vae(CONFIGS[request.param])
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp, safe_serialization=True)
    config = VAEConfig.from_dict(json.loads((tmp / "config.json").read_text()))
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ours.load_state_dict(load_file(tmp / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    return ref, ours.eval()


def _close(a, b):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL, f"max abs diff {err:.3g} > {TOL}"


@torch.no_grad()
def test_encode_parity(pair):
    ref, ours = pair
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, ours.config.latent_channels, 48 // ours.downscale, 64 // ours.downscale)
    assert mean.abs().mean() > 1e-2 and mean.std() > 1e-2  # not trivially tiny
    _close(mean, dist.mean)
    _close(logvar, dist.logvar)

    sample_ref = dist.sample(generator=torch.Generator().manual_seed(0))
    sample_ours = ours.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(0))
    c = ours.config
    _close(sample_ours, (sample_ref - (c.shift_factor or 0.0)) * c.scaling_factor)
    _close(ours.encode_latents(x), (dist.mean - (c.shift_factor or 0.0)) * c.scaling_factor)


@torch.no_grad()
def test_decode_parity(pair):
    ref, ours = pair
    c = ours.config
    z = torch.randn(2, c.latent_channels, 6, 8, generator=torch.Generator().manual_seed(2))
    img = ref.decode(z).sample
    assert img.shape == (2, 3, 6 * ours.downscale, 8 * ours.downscale)
    assert img.std() > 1e-2
    _close(ours.decode(z), img)
    latents = (z - (c.shift_factor or 0.0)) * c.scaling_factor
    _close(ours.decode_latents(latents), img)


def test_downscale():
    assert AutoencoderKL(VAEConfig.from_dict(dict(CONFIGS["f8"], down_block_types=["DownEncoderBlock2D"] * 4,
                                                  up_block_types=["UpDecoderBlock2D"] * 4))).downscale == 8
    with torch.device("meta"):
        assert AutoencoderKL(VAEConfig(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                                       up_block_types=("UpDecoderBlock2D",) * 3)).downscale == 4


BASE = dict(_class_name="AutoencoderKL", _diffusers_version="0.42.1", block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def test_config_ignores_metadata():
    c = VAEConfig.from_dict(dict(BASE, _name_or_path="x", _use_default_values=["act_fn"]))
    assert c.block_out_channels == (32, 64) and c.act_fn == "silu"


@pytest.mark.parametrize("field,value", [
    ("act_fn", "relu"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("latents_std", [1.0, 1.0, 1.0, 1.0]),
    ("block_out_channels", [32, 48]),  # 48 is not a multiple of 32 groups
    ("shift_factor", "zero"),
    ("use_quant_conv", "yes"),
    ("norm_type", "spatial"),  # unknown key that would change the model
])
def test_config_rejects_unsupported(field, value):
    with pytest.raises(ValueError, match=field):
        VAEConfig.from_dict(dict(BASE, **{field: value}))
