"""The UNet and VAE key maps of single-file LDM checkpoints (engine.ldm): generators of
(ldm_key, diffusers_key) pairs, computed from a diffusers config."""
from typing import Iterator

Pairs = Iterator[tuple[str, str]]


def weight_bias(src: str, dst: str, bias: bool = True) -> Pairs:
    yield f"{src}.weight", f"{dst}.weight"
    if bias:
        yield f"{src}.bias", f"{dst}.bias"


def _per_level(v, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


# ---------------------------------------------------------------- UNet
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2"}


def _unet_resnet(src: str, dst: str, shortcut: bool) -> Pairs:
    for a, b in _RESNET.items():
        yield from weight_bias(f"{src}.{a}", f"{dst}.{b}")
    if shortcut:
        yield from weight_bias(f"{src}.skip_connection", f"{dst}.conv_shortcut")


def _unet_attn(src: str, dst: str, depth: int) -> Pairs:
    names = ["norm", "proj_in", "proj_out"]
    for k in range(depth):
        t = f"transformer_blocks.{k}"
        names += [f"{t}.norm1", f"{t}.norm2", f"{t}.norm3", f"{t}.ff.net.0.proj", f"{t}.ff.net.2",
                  f"{t}.attn1.to_out.0", f"{t}.attn2.to_out.0"]
        for a in ("attn1", "attn2"):  # q/k/v carry no bias in LDM or diffusers
            for p in "qkv":
                yield f"{src}.{t}.{a}.to_{p}.weight", f"{dst}.{t}.{a}.to_{p}.weight"
    for n in names:
        yield from weight_bias(f"{src}.{n}", f"{dst}.{n}")


def unet_key_pairs(cfg: dict) -> Pairs:
    """(ldm_key, diffusers_key) for a UNet2DConditionModel config (LDM keys without
    `model.diffusion_model.`)."""
    ch, L = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    n = len(ch)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    up_depth = _per_level(cfg.get("reverse_transformer_layers_per_block") or depth[::-1], n)
    if not isinstance(L, int):
        raise ValueError(f"layers_per_block={L!r}: "
                         "per-block lists are not supported for LDM checkpoints")
    yield from weight_bias("time_embed.0", "time_embedding.linear_1")
    yield from weight_bias("time_embed.2", "time_embedding.linear_2")
    if cfg.get("class_embed_type") in ("projection", "timestep"):
        yield from weight_bias("label_emb.0.0", "class_embedding.linear_1")
        yield from weight_bias("label_emb.0.2", "class_embedding.linear_2")
    elif cfg.get("addition_embed_type") == "text_time":  # SDXL
        yield from weight_bias("label_emb.0.0", "add_embedding.linear_1")
        yield from weight_bias("label_emb.0.2", "add_embedding.linear_2")
    if cfg.get("num_class_embeds") is not None:
        yield "label_emb.weight", "class_embedding.weight"
    yield from weight_bias("input_blocks.0.0", "conv_in")
    for i, t in enumerate(cfg["down_block_types"]):
        for j in range(L):
            s, d = f"input_blocks.{1 + i * (L + 1) + j}", f"down_blocks.{i}"
            yield from _unet_resnet(f"{s}.0", f"{d}.resnets.{j}",
                                    j == 0 and ch[max(i - 1, 0)] != ch[i])
            if "CrossAttn" in t:
                yield from _unet_attn(f"{s}.1", f"{d}.attentions.{j}", depth[i])
        if i < n - 1:
            yield from weight_bias(f"input_blocks.{1 + i * (L + 1) + L}.0.op",
                           f"down_blocks.{i}.downsamplers.0.conv")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type={mid!r} is not an SD 1.x/2.x UNet")
    yield from _unet_resnet("middle_block.0", "mid_block.resnets.0", False)
    yield from _unet_attn("middle_block.1", "mid_block.attentions.0", depth[-1])
    yield from _unet_resnet("middle_block.2", "mid_block.resnets.1", False)
    for i, t in enumerate(cfg["up_block_types"]):
        attn = "CrossAttn" in t
        # every up resnet sees a concatenated skip, so all have a shortcut conv
        for j in range(L + 1):
            s, d = f"output_blocks.{i * (L + 1) + j}", f"up_blocks.{i}"
            yield from _unet_resnet(f"{s}.0", f"{d}.resnets.{j}", True)
            if attn:
                yield from _unet_attn(f"{s}.1", f"{d}.attentions.{j}", up_depth[i])
        if i < n - 1:
            # after the attention, if any
            s = f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.conv"
            yield from weight_bias(s, f"up_blocks.{i}.upsamplers.0.conv")
    yield from weight_bias("out.0", "conv_norm_out")
    yield from weight_bias("out.2", "conv_out")


# ---------------------------------------------------------------- VAE
def _vae_resnet(src: str, dst: str, shortcut: bool) -> Pairs:
    for n in ("norm1", "conv1", "norm2", "conv2"):
        yield from weight_bias(f"{src}.{n}", f"{dst}.{n}")
    if shortcut:
        yield from weight_bias(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def _vae_mid(side: str, attn: bool) -> Pairs:
    yield from _vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
    yield from _vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)
    if attn:
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                     ("proj_out", "to_out.0")):
            yield from weight_bias(f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}")


def vae_key_pairs(cfg: dict) -> Pairs:
    """(ldm_key, diffusers_key) for an AutoencoderKL config (LDM keys without
    `first_stage_model.`)."""
    ch, L, attn = (list(cfg["block_out_channels"]), cfg["layers_per_block"],
                   cfg.get("mid_block_add_attention", True))
    n = len(ch)
    yield from weight_bias("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        for j in range(L):
            yield from _vae_resnet(f"encoder.down.{i}.block.{j}",
                                   f"encoder.down_blocks.{i}.resnets.{j}",
                                   j == 0 and ch[max(i - 1, 0)] != ch[i])
        if i < n - 1:
            yield from weight_bias(f"encoder.down.{i}.downsample.conv",
                           f"encoder.down_blocks.{i}.downsamplers.0.conv")
    yield from _vae_mid("encoder", attn)
    yield from weight_bias("encoder.norm_out", "encoder.conv_norm_out")
    yield from weight_bias("encoder.conv_out", "encoder.conv_out")
    yield from weight_bias("decoder.conv_in", "decoder.conv_in")
    yield from _vae_mid("decoder", attn)
    rev = ch[::-1]
    # diffusers up_blocks.k is LDM up.{n-1-k}: LDM indexes the decoder by resolution level
    for k in range(n):
        for j in range(L + 1):
            yield from _vae_resnet(f"decoder.up.{n - 1 - k}.block.{j}",
                                   f"decoder.up_blocks.{k}.resnets.{j}",
                                   j == 0 and rev[max(k - 1, 0)] != rev[k])
        if k < n - 1:
            yield from weight_bias(f"decoder.up.{n - 1 - k}.upsample.conv",
                           f"decoder.up_blocks.{k}.upsamplers.0.conv")
    yield from weight_bias("decoder.norm_out", "decoder.conv_norm_out")
    yield from weight_bias("decoder.conv_out", "decoder.conv_out")
    for q, use in (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv")):
        if cfg.get(use, True):
            yield from weight_bias(q, q)
