"""UNet2DConditionModel for SD 1.x, SD 2.x, SDXL and the SD x4 upscaler. Names mirror diffusers'
state-dict keys."""
from dataclasses import dataclass, fields

import torch
from torch import nn

from .. import graphs
from .blocks import (ATTENTION_HOOK, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D,
                     TimestepEmbedding, Transformer2DModel, Upsample2D, by_row, timestep_embedding)

# config.json fields that must hold exactly this value (diffusers' default) for this engine to be
# correct
_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "dropout",
            "addition_embed_type_num_heads"}
_DOWN, _UP = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | list = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | list = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list = 768
    transformer_layers_per_block: int | list = 1
    # diffusers' legacy name: the number of heads unless num_attention_heads is set
    attention_head_dim: int | list = 8
    num_attention_heads: int | list | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    sample_size: int | None = None
    # SDXL: the pooled text embedding and the micro-conditioning ids, embedded into the time embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k in _FIXED and v != _FIXED[k]:
                raise ValueError(f"unet config: {k}={v!r} is not supported (only {_FIXED[k]!r})")
            if k not in names and k not in _FIXED and k not in _IGNORED:
                raise ValueError(f"unet config: unknown field {k!r}; "
                                 "this engine does not implement it")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        n = len(cfg.block_out_channels)
        for k, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
            bad = [b for b in getattr(cfg, k) if b not in allowed]
            if bad or len(getattr(cfg, k)) != n:
                raise ValueError(f"unet config: {k}={getattr(cfg, k)!r}; "
                                 f"need {n} entries from {allowed}")
        if cfg.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unet config: addition_embed_type={cfg.addition_embed_type!r} is not "
                             "supported (only null, or \"text_time\" for SDXL)")
        if cfg.addition_embed_type and not (cfg.addition_time_embed_dim and cfg.projection_class_embeddings_input_dim):
            raise ValueError("unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if cfg.class_embed_type is not None:
            raise ValueError(f"unet config: class_embed_type={cfg.class_embed_type!r} is not "
                             "supported (only null, with num_class_embeds for the x4 upscaler)")
        if (isinstance(cfg.cross_attention_dim, (list, tuple))
                and len(set(cfg.cross_attention_dim)) > 1):
            raise ValueError("unet config: per-block cross_attention_dim values are not supported")
        if any(isinstance(x, (list, tuple))
               for x in _per_block(cfg.transformer_layers_per_block, n)):
            raise ValueError("unet config: nested transformer_layers_per_block is not supported")
        return cfg

    @property
    def heads(self) -> list:
        return _per_block(self.num_attention_heads or self.attention_head_dim,
                          len(self.block_out_channels))


class _Block(nn.Module):
    """A down or up block: resnets interleaved with optional attentions, then an optional
    resampler."""

    def __init__(self, in_chs, out_ch, temb, cfg, heads, depth, cross, only_cross, down=None,
                 up=False, n_attn=None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_ch, temb, g, eps) for c in in_chs)
        if cross:
            self.attentions = nn.ModuleList(
                Transformer2DModel(heads, out_ch // heads, out_ch,
                                   _per_block(cfg.cross_attention_dim, 1)[0], depth, g,
                                   cfg.use_linear_projection, only_cross, cfg.upcast_attention)
                for _ in range(n_attn or len(in_chs)))
        else:
            self.attentions = None
        if down is not None:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, down)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, n = list(cfg.block_out_channels), len(cfg.block_out_channels)
        heads, layers = cfg.heads, _per_block(cfg.layers_per_block, n)
        depth = _per_block(cfg.transformer_layers_per_block, n)
        only_cross = _per_block(cfg.only_cross_attention, n)
        temb = ch[0] * 4
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            in_chs = [ch[max(i - 1, 0)]] + [ch[i]] * (layers[i] - 1)
            self.down_blocks.append(_Block(in_chs, ch[i], temb, cfg, heads[i], depth[i],
                                           kind.startswith("CrossAttn"), only_cross[i],
                                           down=cfg.downsample_padding if i < n - 1 else None))

        self.mid_block = _Block([ch[-1], ch[-1]], ch[-1], temb, cfg, heads[-1], depth[-1], True,
                                False, n_attn=1)
        for r in self.mid_block.resnets:
            r.output_scale_factor = cfg.mid_block_scale_factor

        self.up_blocks = nn.ModuleList()
        rch, rheads, rlayers, rdepth, ronly = (x[::-1]
                                               for x in (ch, heads, layers, depth, only_cross))
        for i, kind in enumerate(cfg.up_block_types):
            prev, skip = rch[max(i - 1, 0)], rch[min(i + 1, n - 1)]
            in_chs = [(prev if j == 0 else rch[i]) + (skip if j == rlayers[i] else rch[i])
                      for j in range(rlayers[i] + 1)]
            self.up_blocks.append(_Block(in_chs, rch[i], temb, cfg, rheads[i], rdepth[i],
                                         kind.startswith("CrossAttn"), ronly[i], up=i < n - 1))

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, class_labels=None, text_embeds=None,
                time_ids=None, copies: int = 1) -> torch.Tensor:
        """ε / v prediction for latents x (B, C, H, W) at timesteps t, text context (B, L, D); SDXL also
        takes the pooled text embedding (B, P) and the micro-conditioning time_ids (B, n). copies: the
        batch is that many blocks of the same images (CFG's 2), see engine.graphs.run."""
        emb = self.embedding(x, t, class_labels, text_embeds, time_ids)
        if ATTENTION_HOOK.get() is not None:  # a compiled graph would not call it
            return self.body(x, emb, context)
        return graphs.run(self, "body", x, emb, context, copies=copies)

    def body(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The network after the embedding (emb: one row, or one per image); a compiled graph on
        the CPU where engine.graphs has one."""
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if block.attentions is not None:
                    h = block.attentions[j](h, context)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        mid = self.mid_block
        h = mid.attentions[0](mid.resnets[0](h, emb), context)
        h = mid.resnets[1](h, emb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if block.attentions is not None:
                    h = block.attentions[j](h, context)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, skips[-1].shape[2:])

        return self.conv_out(self.conv_norm_out(h, act="silu")).contiguous()

    def embedding(self, x, t, class_labels=None, text_embeds=None, time_ids=None) -> torch.Tensor:
        """The embedding every resnet adds: of the timestep, plus the class (x4 upscaler) or the
        added conditioning (SDXL). One row (1, D) when the batch shares it, as a sampler's batch
        does; else (B, D) computed row by row (blocks.by_row)."""
        cfg, b = self.config, x.shape[0]
        rows = [torch.as_tensor(t, device=x.device).reshape(-1).expand(b)]
        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding (x4 upscaler): "
                                 "pass class_labels (noise level)")
            rows.append(torch.as_tensor(class_labels, device=x.device).reshape(-1).expand(b))
        if cfg.addition_embed_type == "text_time":
            rows.append(self.added_input(x, text_embeds, time_ids))
        n = 1 if all(bool((r == r[:1]).all()) for r in rows) else b
        emb = by_row(self.time_embedding, timestep_embedding(
            rows[0][:n], cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))
        if cfg.num_class_embeds is not None:
            emb = emb + self.class_embedding(rows[1][:n]).to(x.dtype)
        if cfg.addition_embed_type == "text_time":
            emb = emb + by_row(self.add_embedding, rows[-1][:n])
        return emb

    def added_input(self, x, text_embeds, time_ids) -> torch.Tensor:
        """SDXL's added conditioning: the pooled text embedding, then each micro-conditioning id
        (original size, crop corner, target size or aesthetic score) embedded sinusoidally."""
        cfg = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet is SDXL's (addition_embed_type \"text_time\"): "
                             "pass text_embeds (pooled) and time_ids")
        ids = torch.as_tensor(time_ids, device=x.device).reshape(x.shape[0], -1)
        want = cfg.projection_class_embeddings_input_dim - text_embeds.shape[-1]
        if ids.shape[1] * cfg.addition_time_embed_dim != want:
            raise ValueError(f"time_ids: {ids.shape[1]} per image, but this UNet embeds "
                             f"{want // cfg.addition_time_embed_dim} beside a {text_embeds.shape[-1]}-wide "
                             "pooled text embedding")
        times = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift).reshape(x.shape[0], -1)
        return torch.cat([text_embeds.to(times), times], -1).to(x.dtype)
