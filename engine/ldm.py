"""Single-file SD 1.x / 2.x / SDXL / x4-upscaler checkpoints (original LDM / CompVis / Stability
key layout, SDXL's "conditioner" layout) → the diffusers / transformers state-dict names our models
mirror. Every mapping is computed from a config
as a generator of (ldm_key, diffusers_key) pairs; `_translate` applies it and names every missing or
left-over key."""
from __future__ import annotations

import copy
from typing import Iterator

from torch import Tensor

from .ldm_keys import Pairs, weight_bias, unet_key_pairs, vae_key_pairs

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# SD1 (HF CLIP) / SD2 (OpenCLIP)
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
# SDXL: CLIP ViT-L (HF layout) and OpenCLIP bigG; the refiner (and SD 2.x saved in this layout) keep
# their one OpenCLIP tower at embedders.0
XL_CLIP = "conditioner.embedders.0.transformer."
XL_OPENCLIP, SGM_OPENCLIP = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."
_PREFIXES = (("unet", UNET), ("vae", VAE), ("clip", CLIP), ("clip", XL_CLIP),
             ("openclip", OPENCLIP), ("openclip_2", XL_OPENCLIP), ("sgm", SGM_OPENCLIP))


class MissingKeysError(KeyError):
    def __str__(self):  # KeyError would print the repr of the message
        return self.args[0]


def split_components(sd: dict[str, Tensor], ema: bool = False) -> dict:
    """{"unet", "vae", "clip", "openclip", "openclip_2": prefix-stripped dicts, "ignored": sorted
    keys}. `openclip_2` is SDXL's bigG tower with its projection (text_encoder_2). Ignored:
    `model_ema.*` (unless `ema`: the UNet is then read from its flattened
    `model_ema.diffusion_model...` names), the DDPM schedule buffers (betas, alphas_cumprod*,
    sqrt_*, posterior_*, logvar, ...), `first_stage_model.loss.*` (VAE discriminator / LPIPS), and
    anything else outside the component prefixes."""
    out = {"unet": {}, "vae": {}, "clip": {}, "openclip": {}, "openclip_2": {}, "sgm": {},
           "ignored": []}
    for k, v in sd.items():
        for name, p in _PREFIXES:
            if k.startswith(p) and not k.startswith(VAE + "loss."):
                out[name][k[len(p):]] = v
                break
        else:
            out["ignored"].append(k)
    # the SDXL refiner's UNet embeds the pooled text (label_emb.0); SD 2.x's does not
    sgm = out.pop("sgm")
    out["openclip_2" if "label_emb.0.0.weight" in out["unet"] else "openclip"].update(sgm)
    if ema:  # "model.diffusion_model.a.b" → "model_ema.diffusion_modelab" (LitEma drops the dots)
        flat = {k: "model_ema." + "".join(k.split(".")[1:]) for k in sd if k.startswith(UNET)}
        _check([f for f in flat.values() if f not in sd], "EMA UNet (model_ema.*)")
        out["unet"] = {k[len(UNET):]: sd[f] for k, f in flat.items()}
    out["ignored"].sort()
    return out


def family(parts: dict) -> str:
    """"sd1", "sd2", "sdxl", "sdxl_refiner" or "x4" from split_components' parts: SDXL by its bigG
    tower (the refiner has no CLIP ViT-L), the x4 upscaler by its noise-level class embedding and
    its 7 input channels, SD 2.x by a 1024-wide cross-attention context (SD 1.x: 768)."""
    u = parts["unet"]
    if parts["openclip_2"]:
        return "sdxl" if parts["clip"] else "sdxl_refiner"
    if "label_emb.weight" in u and u["input_blocks.0.0.weight"].shape[1] == 7:
        return "x4"
    ctx = next((w.shape[1] for k, w in u.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx is None:
        return "sd2" if parts["openclip"] else "sd1"
    return "sd2" if ctx == 1024 else "sd1"


def _check(missing: list[str], what: str):
    if missing:
        raise MissingKeysError(f"{what}: {len(missing)} key(s) missing from the checkpoint: "
                               f"{', '.join(missing[:40])}"
                               + (" ..." if len(missing) > 40 else ""))


def _translate(sd: dict, pairs: Pairs, what: str, strict: bool = True,
               ignore=lambda k: False) -> dict:
    pairs = list(pairs)
    _check([s for s, _ in pairs if s not in sd], what)
    extra = sorted(set(sd) - {s for s, _ in pairs} - {k for k in sd if ignore(k)})
    if strict and extra:
        raise ValueError(f"{what}: {len(extra)} checkpoint key(s) not used by the config "
                         f"(wrong config?): {', '.join(extra[:40])}")
    return {d: sd[s] for s, d in pairs}


def unet_to_diffusers(sd_unet: dict[str, Tensor], unet_config: dict,
                      strict: bool = True) -> dict[str, Tensor]:
    """LDM UNet keys (prefix stripped) → diffusers UNet2DConditionModel keys; proj_in/out are
    reshaped to the config's `use_linear_projection` (1×1 conv ↔ linear) when a checkpoint stores
    the other form."""
    out = _translate(sd_unet, unet_key_pairs(unet_config), f"UNet ({UNET}*)", strict)
    linear = unet_config.get("use_linear_projection", False)
    for k, w in out.items():
        if k.endswith((".proj_in.weight", ".proj_out.weight")) and (w.ndim == 2) != linear:
            out[k] = w[:, :, 0, 0] if linear else w[:, :, None, None]
    return out


def vae_to_diffusers(sd_vae: dict[str, Tensor], vae_config: dict,
                     strict: bool = True) -> dict[str, Tensor]:
    """LDM VAE keys (prefix stripped) → diffusers AutoencoderKL keys; mid-attention 1×1 convs become
    linears."""
    out = _translate(sd_vae, vae_key_pairs(vae_config), f"VAE ({VAE}*)", strict)
    for k, w in out.items():
        if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") and w.ndim > 2:
            out[k] = w.reshape(w.shape[0], w.shape[1])
    return out


# ---------------------------------------------------------------- text encoders
def _clip_names(cfg: dict) -> Iterator[str]:
    """transformers CLIPTextModel keys as saved on disk (with the `text_model.` prefix),
    position_ids excluded."""
    yield "text_model.embeddings.token_embedding.weight"
    yield "text_model.embeddings.position_embedding.weight"
    for i in range(cfg["num_hidden_layers"]):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            yield from (f"text_model.encoder.layers.{i}.{n}.{p}" for p in ("weight", "bias"))
    yield from ("text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias")


def clip_to_diffusers(sd_clip: dict[str, Tensor], text_config: dict,
                      strict: bool = True) -> dict[str, Tensor]:
    """SD1 `cond_stage_model.transformer.*` (HF CLIP keys, with or without `text_model.`) →
    CLIPTextModel keys."""
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd_clip.items()}
    return _translate(sd, ((k, k) for k in _clip_names(text_config)),
                      f"CLIP text encoder ({CLIP}*)", strict,
                      ignore=lambda k: k.endswith("position_ids"))


def openclip_to_diffusers(sd_clip: dict[str, Tensor], text_config: dict,
                          strict: bool = True, projection: bool = False) -> dict[str, Tensor]:
    """An OpenCLIP text tower (prefix stripped) → CLIPTextModel keys, in_proj split into q, k, v.
    SD 2.x (`cond_stage_model.model.`): resblocks with index ≥ num_hidden_layers are dropped (SD2
    conditions on the penultimate of 24 layers, so diffusers keeps 23), as are text_projection and
    logit_scale. With `projection` (SDXL's bigG, text_encoder_2): every layer is kept and
    `text_projection` (applied as x @ P) becomes the Linear weight Pᵀ of
    CLIPTextModelWithProjection."""
    n, t = text_config["num_hidden_layers"], "text_model."
    ren = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
           "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    pairs = [("token_embedding.weight", t + "embeddings.token_embedding.weight"),
             ("positional_embedding", t + "embeddings.position_embedding.weight"),
             *weight_bias("ln_final", t + "final_layer_norm")]
    if projection:
        pairs.append(("text_projection", "text_projection.weight"))
    for i in range(n):
        for a, b in ren.items():
            pairs += weight_bias(f"transformer.resblocks.{i}.{a}", f"{t}encoder.layers.{i}.{b}")
    fused = [f"transformer.resblocks.{i}.attn.in_proj_{p}"
             for i in range(n) for p in ("weight", "bias")]
    dropped = lambda k: (k in ("logit_scale", "attn_mask")
                         or (k == "text_projection" and not projection)
                         or (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= n))
    out = _translate(sd_clip, pairs + [(k, k) for k in fused],
                     "OpenCLIP text encoder" + (" bigG" if projection else f" ({OPENCLIP}*)"),
                     strict, ignore=dropped)
    if projection:
        # contiguous as a folder's: the same bits out of the same matmul
        out["text_projection.weight"] = out["text_projection.weight"].T.contiguous()
    for k in fused:  # in_proj rows are [q; k; v]
        i, p = k.split(".")[2], k.rsplit("_", 1)[1]
        for name, w in zip("qkv", out.pop(k).chunk(3, dim=0)):
            out[f"{t}encoder.layers.{i}.self_attn.{name}_proj.{p}"] = w
    return out


# ---------------------------------------------------------------- configs
_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
          "steps_offset": 1, "trained_betas": None, "timestep_spacing": "leading"}


def preset(version: str, prediction_type: str = "epsilon") -> dict:
    """The diffusers config.json dicts of a family's reference model: SD 1.5 (`"sd1"`), SD 2.x
    (`"sd2"`: 2-base for epsilon, 2.1-768 for v_prediction, which also upcasts attention and works
    at 768 px), SDXL 1.0 base and refiner (`"sdxl"`, `"sdxl_refiner"`) and the SD x4 upscaler
    (`"x4"`, with its low_res_scheduler and max_noise_level)."""
    v2, v768 = version in ("sd2", "x4"), prediction_type == "v_prediction"
    unet = {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20] if v2 else 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "class_embed_type": None, "cross_attention_dim": 1024 if v2 else 768,
            "down_block_types": list(_DOWN), "downsample_padding": 1, "dual_cross_attention": False,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
            "only_cross_attention": False, "out_channels": 4,
            "projection_class_embeddings_input_dim": None, "sample_size": 96 if v768 else 64,
            "transformer_layers_per_block": 1, "up_block_types": list(_UP),
            "upcast_attention": v2 and v768, "use_linear_projection": v2}
    vae = {"_class_name": "AutoencoderKL", "act_fn": "silu",
           "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
           "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
           "sample_size": 768 if v768 else 512, "scaling_factor": 0.18215,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    # eos_token_id 2 is what the hub configs say; it selects the legacy argmax(input_ids) pooling.
    text = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
            "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu" if v2 else "quick_gelu",
            "hidden_size": 1024 if v2 else 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 4096 if v2 else 3072,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 16 if v2 else 12, "num_hidden_layers": 23 if v2 else 12,
            "pad_token_id": 1, "projection_dim": 512 if v2 else 768, "vocab_size": 49408}
    sched = ({"_class_name": "DDIMScheduler"} if v768
             else {"_class_name": "PNDMScheduler", "skip_prk_steps": True})
    sched.update(_BETAS, prediction_type=prediction_type)
    out = {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}
    if version == "x4":  # v-prediction on its own betas; heads are 8, not width / 64
        unet.update(attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], in_channels=7,
                    down_block_types=["DownBlock2D"] + _DOWN[:3], num_class_embeds=1000,
                    up_block_types=_UP[1:] + ["UpBlock2D"], sample_size=128,
                    only_cross_attention=[True, True, True, False], upcast_attention=False)
        vae.update(block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3,
                   up_block_types=["UpDecoderBlock2D"] * 3, sample_size=256, scaling_factor=0.08333)
        low = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}
        sched.update(low, _class_name="DDIMScheduler", prediction_type="v_prediction")
        out.update(low_res_scheduler={"_class_name": "DDPMScheduler", **_BETAS, **low},
                   max_noise_level=350)
    if version in ("sdxl", "sdxl_refiner"):
        refiner = version == "sdxl_refiner"
        ch = [384, 768, 1536, 1536] if refiner else [320, 640, 1280]
        unet.update(attention_head_dim=[c // 64 for c in ch], block_out_channels=ch,
                    cross_attention_dim=1280 if refiner else 2048,
                    down_block_types=["DownBlock2D", *_DOWN[:2], *["DownBlock2D"] * refiner],
                    up_block_types=[*["UpBlock2D"] * refiner, *_UP[1:3], "UpBlock2D"],
                    transformer_layers_per_block=4 if refiner else [1, 2, 10], sample_size=128,
                    use_linear_projection=True, upcast_attention=False,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2560 if refiner else 2816)
        vae.update(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        sched.pop("skip_prk_steps", None)
        sched.update(_class_name="DDIMScheduler")
        out["text_encoder_2"] = {**text, "architectures": ["CLIPTextModelWithProjection"],
                                 "hidden_act": "gelu", "hidden_size": 1280,
                                 "intermediate_size": 5120, "num_attention_heads": 20,
                                 "num_hidden_layers": 32, "projection_dim": 1280}
        if refiner:
            del out["text_encoder"]
        else:
            text["projection_dim"] = 768
        out["force_zeros_for_empty_prompt"] = not refiner
    return out


def _infer_unet(u: dict, c: dict, heads_of_64: bool = True):
    c["in_channels"], c["out_channels"] = (u["input_blocks.0.0.weight"].shape[1],
                                           u["out.2.weight"].shape[0])
    # levels: [out channels, resnets, has attention, transformer depth]
    levels, i, cur = [], 1, None
    while f"input_blocks.{i}.0.op.weight" in u or f"input_blocks.{i}.0.out_layers.3.weight" in u:
        if cur is None:
            cur = [0, 0, False, None]
            levels.append(cur)
        if f"input_blocks.{i}.0.op.weight" in u:
            cur = None
        else:
            cur[0], cur[1] = u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0], cur[1] + 1
            if f"input_blocks.{i}.1.norm.weight" in u:
                cur[2] = True
                cur[3] = len({k.split(".")[4] for k in u
                              if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
        i += 1
    L = levels[0][1]
    c["block_out_channels"], c["layers_per_block"] = [lv[0] for lv in levels], L
    c["down_block_types"] = ["CrossAttnDownBlock2D" if lv[2] else "DownBlock2D" for lv in levels]
    c["up_block_types"] = ["CrossAttnUpBlock2D" if f"output_blocks.{k * (L + 1)}.1.norm.weight" in u
                           else "UpBlock2D" for k in range(len(levels))]
    depth = {lv[3] for lv in levels if lv[2]}  # levels without attention do not care
    c["transformer_layers_per_block"] = (depth.pop() if len(depth) == 1
                                         else [lv[3] or 1 for lv in levels])
    proj = next((w for k, w in u.items() if k.endswith("proj_in.weight")), None)
    if proj is not None:
        c["use_linear_projection"] = proj.ndim == 2
    ctx = next((w for k, w in u.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx is not None:
        c["cross_attention_dim"] = ctx.shape[1]
    if heads_of_64 and c["use_linear_projection"] and \
            all(ch % 64 == 0 for ch in c["block_out_channels"]):
        # diffusers' name for heads
        c["attention_head_dim"] = [ch // 64 for ch in c["block_out_channels"]]
    # self-attention replaced by a second cross-attention (the x4 upscaler) where attn1 reads the
    # context; levels without attention keep the preset's value
    preset_only = c.get("only_cross_attention", False)
    same = isinstance(preset_only, (list, tuple)) and len(preset_only) == len(levels)
    only = list(preset_only) if same else [preset_only is True] * len(levels)
    for i, lv in enumerate(levels):
        if lv[2]:
            k = u[f"input_blocks.{1 + i * (L + 1)}.1.transformer_blocks.0.attn1.to_k.weight"]
            only[i] = k.shape[1] != lv[0]
    one = len(set(only)) == 1 and isinstance(preset_only, bool)
    c["only_cross_attention"] = only[0] if one else only
    if "label_emb.0.0.weight" in u:
        if c.get("addition_embed_type") != "text_time":
            c["class_embed_type"] = "projection"
        c["projection_class_embeddings_input_dim"] = u["label_emb.0.0.weight"].shape[1]
    if "label_emb.weight" in u:
        c["num_class_embeds"] = u["label_emb.weight"].shape[0]


def _infer_vae(v: dict, c: dict):
    n = len({k.split(".")[2] for k in v if k.startswith("encoder.down.")})
    c["block_out_channels"] = [v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                               for i in range(n)]
    c["layers_per_block"] = len({k.split(".")[4] for k in v
                                 if k.startswith("encoder.down.0.block.")})
    c["in_channels"], c["out_channels"] = (v["encoder.conv_in.weight"].shape[1],
                                           v["decoder.conv_out.weight"].shape[0])
    c["latent_channels"] = v["decoder.conv_in.weight"].shape[1]
    c["down_block_types"], c["up_block_types"] = (["DownEncoderBlock2D"] * n,
                                                  ["UpDecoderBlock2D"] * n)


def _infer_text(t: dict, c: dict, openclip: bool, projection: bool = False):
    if openclip:  # SD 2.x does not use the last resblock (penultimate-layer conditioning)
        tok, pos, fc1 = (t[k] for k in ("token_embedding.weight", "positional_embedding",
                                        "transformer.resblocks.0.mlp.c_fc.weight"))
        layers = len({k.split(".")[2] for k in t if k.startswith("transformer.resblocks.")})
        layers -= not projection
        if projection:
            c["projection_dim"] = t["text_projection"].shape[1]
    else:
        t = {k.removeprefix("text_model."): w for k, w in t.items()}
        tok, pos, fc1 = (t[k] for k in ("embeddings.token_embedding.weight",
                                        "embeddings.position_embedding.weight",
                                        "encoder.layers.0.mlp.fc1.weight"))
        layers = len({k.split(".")[2] for k in t if k.startswith("encoder.layers.")})
    c.update(vocab_size=tok.shape[0], hidden_size=tok.shape[1],
             max_position_embeddings=pos.shape[0], intermediate_size=fc1.shape[0],
             num_hidden_layers=layers)
    if tok.shape[1] % 64 == 0:
        c["num_attention_heads"] = tok.shape[1] // 64


def infer_configs(sd: dict[str, Tensor], prediction_type: str | None = None) -> dict:
    """The diffusers configs of a single-file checkpoint ({"unet", "vae", "text_encoder",
    "text_encoder_2", "scheduler", ...} as its family has them, engine.ldm.preset), starting from
    its `family`'s reference model: block channels, layers per block, attention placement and
    depth, in/out channels, the context width and the text-tower sizes are read from tensor shapes,
    so smaller files of the same layout map too. Head counts cannot be read from shapes (the
    family's rule is used). The prediction type is not in the weights: it defaults to "epsilon",
    except for the x4 upscaler (v); pass `prediction_type="v_prediction"` for the SD 2.x 768-v
    models."""
    parts = split_components(sd)
    fam = family(parts)
    default = "v_prediction" if fam == "x4" else "epsilon"
    cfg = copy.deepcopy(preset(fam, prediction_type or default))
    if parts["unet"]:
        _infer_unet(parts["unet"], cfg["unet"], heads_of_64=fam != "x4")
    if parts["vae"]:
        _infer_vae(parts["vae"], cfg["vae"])
        if "scale_factor" in sd:
            cfg["vae"]["scaling_factor"] = float(sd["scale_factor"])
    if "text_encoder" in cfg and (parts["openclip"] or parts["clip"]):
        # e.g. SD1-sized OpenCLIP
        if bool(parts["openclip"]) != (cfg["text_encoder"]["hidden_act"] == "gelu"):
            cfg["text_encoder"] = preset("sd1" if parts["clip"] else "sd2")["text_encoder"]
        _infer_text(parts["openclip"] or parts["clip"], cfg["text_encoder"],
                    bool(parts["openclip"]))
    if parts["openclip_2"]:
        _infer_text(parts["openclip_2"], cfg["text_encoder_2"], True, projection=True)
        u = cfg["unet"]  # the added input: pooled text, then 6 (base) or 5 (refiner) embedded ids
        u["addition_time_embed_dim"] = ((u["projection_class_embeddings_input_dim"]
                                         - cfg["text_encoder_2"]["projection_dim"])
                                        // (5 if fam == "sdxl_refiner" else 6))
    return cfg


def convert(sd: dict[str, Tensor], configs: dict | None = None, *,
            prediction_type: str | None = None, ema: bool = False,
            strict: bool = True) -> dict[str, dict[str, Tensor]]:
    """A single-file LDM checkpoint → {"unet", "vae", "text_encoder", "text_encoder_2"}
    diffusers-named state dicts (components absent from the file are absent here). `configs`
    entries given take precedence over inferred ones. Tensors are shared with `sd` (views), not
    copied."""
    configs = dict(configs or {})
    parts = split_components(sd, ema)
    wanted = ["unet", "vae"] + ["text_encoder"] * bool(parts["clip"] or parts["openclip"]) \
        + ["text_encoder_2"] * bool(parts["openclip_2"])
    if any(n not in configs for n in wanted):
        configs = {**infer_configs(sd, prediction_type), **configs}
    out = {}
    if parts["unet"]:
        out["unet"] = unet_to_diffusers(parts["unet"], configs["unet"], strict)
    if parts["vae"]:
        out["vae"] = vae_to_diffusers(parts["vae"], configs["vae"], strict)
    if parts["openclip"]:
        out["text_encoder"] = openclip_to_diffusers(parts["openclip"], configs["text_encoder"],
                                                    strict)
    elif parts["clip"]:
        out["text_encoder"] = clip_to_diffusers(parts["clip"], configs["text_encoder"], strict)
    if parts["openclip_2"]:
        out["text_encoder_2"] = openclip_to_diffusers(parts["openclip_2"],
                                                      configs["text_encoder_2"], strict, True)
    return out
