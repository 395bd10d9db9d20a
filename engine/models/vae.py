"""The KL autoencoder of Stable Diffusion (diffusers AutoencoderKL). Attribute names mirror its
state dict, so a diffusers `diffusion_pytorch_model.safetensors` loads with
`load_state_dict(sd, strict=True, assign=True)`.

A plain module: encode and decode always run the whole image at once. Bounded-memory tiling is an
execution strategy applied from outside (engine.tiled_vae), which reuses `moments`, `latents` and
`unscale` so the formulas live here only."""
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..rng import randn_tensor
from .blocks import (Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, SpatialSelfAttention,
                     Upsample2D)

EPS = 1e-6  # every norm in the diffusers VAE uses 1e-6, whatever the config says


@dataclass
class VAEConfig:
    """Fields and defaults of diffusers' AutoencoderKL `config.json`.

    Unknown-key policy of `from_dict`: keys starting with "_" (`_class_name`, `_diffusers_version`,
    `_name_or_path`, ...) are metadata and ignored; any other key we do not know raises ValueError,
    because a field we silently dropped could change the model. Supported-but-unusual values are
    checked in `__post_init__`, which names the field, the value and what is allowed.
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"VAE config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in known})

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ValueError(f"VAE config: {name}={getattr(self, name)!r} is not supported; "
                                 f"allowed: {allowed}")

        n = len(self.block_out_channels)
        need(n >= 1 and all(isinstance(c, int) and c > 0 and c % self.norm_num_groups == 0
                            for c in self.block_out_channels),
             "block_out_channels",
             f"a non-empty list of positive multiples of norm_num_groups={self.norm_num_groups}")
        need(tuple(self.down_block_types) == ("DownEncoderBlock2D",) * n, "down_block_types",
             f"{n} x 'DownEncoderBlock2D' (one per block_out_channels entry)")
        need(tuple(self.up_block_types) == ("UpDecoderBlock2D",) * n, "up_block_types",
             f"{n} x 'UpDecoderBlock2D' (one per block_out_channels entry)")
        need(self.act_fn == "silu", "act_fn", "'silu'")
        need(isinstance(self.layers_per_block, int) and self.layers_per_block >= 1,
             "layers_per_block", "int >= 1")
        need(self.shift_factor is None or isinstance(self.shift_factor, (int, float)),
             "shift_factor", "None or a float")
        need(self.latents_mean is None, "latents_mean",
             "None (per-channel latent statistics are not supported)")
        need(self.latents_std is None, "latents_std",
             "None (per-channel latent statistics are not supported)")
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv",
                     "mid_block_add_attention"):
            need(isinstance(getattr(self, name), bool), name, "true or false")


def _resnets(in_ch, out_ch, n, groups):
    return nn.ModuleList(ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS)
                         for i in range(n))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, add_downsample):
        super().__init__()
        self.resnets = _resnets(in_ch, out_ch, layers, groups)
        # padding=0 plus an asymmetric (0,1,0,1) pad inside Downsample2D, as in the original
        # LDM code
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_ch, padding=0)] if add_downsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, add_upsample):
        super().__init__()
        self.resnets = _resnets(in_ch, out_ch, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet → (single-head self-attention) → resnet."""

    def __init__(self, ch, groups, add_attention):
        super().__init__()
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(ch, groups, EPS)] if add_attention else [])
        self.resnets = _resnets(ch, ch, 2, groups)

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < n - 1)
            for i in range(n))
        self.mid_block = UNetMidBlock2D(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x), act="silu"))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        rev, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, g, i < n - 1)
            for i in range(n))
        self.conv_norm_out = GroupNorm(g, rev[-1], EPS)
        self.conv_out = Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, act="silu"))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] → (mean, logvar) of the unscaled latent Gaussian (see `moments`)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return self.moments(h)

    @staticmethod
    def moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output after quant_conv → (mean, logvar), logvar clamped to [-30, 20]."""
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def latents(self, mean: torch.Tensor, logvar: torch.Tensor, sample: bool = False,
                generator=None) -> torch.Tensor:
        """(mean, logvar) → latents the UNet sees: (z - shift_factor) * scaling_factor, z the mean
        or, with sample=True, a sample drawn with `generator` (diffusers' randn_tensor)."""
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * randn_tensor(mean.shape, generator, mean.device,
                                                               mean.dtype)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents the UNet sees → unscaled latents: latents / scaling_factor + shift_factor."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Image → latents the UNet sees, untiled (engine.tiled_vae.encode_latents tiles)."""
        return self.latents(*self.encode(x), sample, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → image in about [-1, 1] (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents the UNet sees → image, untiled (engine.tiled_vae.decode_latents tiles)."""
        return self.decode(self.unscale(latents))
