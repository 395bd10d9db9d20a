"""engine.ldm: LDM single-file layout → diffusers names. The LDM dicts are made here by a test-side inverse
(diffusers → LDM), which is first checked against diffusers' own single-file converters; our converter must
then give back exactly the original diffusers state dicts (same keys, equal tensors)."""
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from engine import ldm

# ---------------------------------------------------------------- test-side inverse: diffusers → LDM
_RES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _res(rest):
    head, _, tail = rest.partition(".")
    return dict(_RES)[head] + "." + tail


def unet_to_ldm(sd, cfg):
    L = cfg["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    out = {}
    for k, v in sd.items():
        if (m := re.fullmatch(r"(\w+\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(\w+)", k)):
            new = f"{_FIXED[m[1]]}.{m[2]}"
        elif k == "class_embedding.weight":  # the x4 upscaler's noise-level classes
            new = "label_emb.weight"
        elif (m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "downsamplers":
                new = f"input_blocks.{1 + i * (L + 1) + L}.0.op.{rest.removeprefix('conv.')}"
            else:
                new = f"input_blocks.{1 + i * (L + 1) + j}." + (f"0.{_res(rest)}" if kind == "resnets" else f"1.{rest}")
        elif (m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k)):
            new = f"middle_block.{2 * int(m[2])}.{_res(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
        elif (m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "upsamplers":
                new = f"output_blocks.{i * (L + 1) + L}.{2 if up_attn[i] else 1}.{rest}"
            else:
                new = f"output_blocks.{i * (L + 1) + j}." + (f"0.{_res(rest)}" if kind == "resnets" else f"1.{rest}")
        else:
            raise AssertionError(f"unhandled diffusers key {k}")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd, cfg):
    n = len(cfg["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if (m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k)):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                v = v[:, :, None, None]  # LDM stores these as 1×1 convs
        out["first_stage_model." + new] = v
    return out


def hub_clip(model):
    """transformers 5 dropped the `text_model.` wrapper in CLIPTextModel; files on disk (and our engine) keep it."""
    return {"text_model." + k: v for k, v in model.state_dict().items()}


def clip_to_openclip(sd, prefix="cond_stage_model.model."):
    """transformers CLIP text keys → an OpenCLIP tower; SDXL's bigG also keeps its projection, stored
    (in, out) as OpenCLIP applies it (x @ P)."""
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    for k, v in sd.items():
        if (m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)):
            r = f"transformer.resblocks.{m[1]}"
            if m[2].startswith("self_attn.") and m[2] != "self_attn.out_proj":
                if m[2] == "self_attn.q_proj":
                    qkv = [sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    out[f"{r}.attn.in_proj_{m[3]}"] = torch.cat(qkv)
            else:
                out[f"{r}.{ren[m[2]]}.{m[3]}"] = v
    return {prefix + k: v for k, v in out.items()}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if a[k].device.type != "meta":
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- tiny models
UNETS = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, use_linear_projection=False,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=[2, 4], use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                class_embed_type="projection", projection_class_embeddings_input_dim=8),
    "deep": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, transformer_layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


def tiny_unet(name):
    torch.manual_seed(0)
    cfg = dict(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=32, norm_num_groups=32, **UNETS[name])
    return UNet2DConditionModel(**cfg).eval(), cfg


def tiny_vae(channels, layers):
    torch.manual_seed(0)
    n = len(channels)
    cfg = dict(block_out_channels=channels, layers_per_block=layers, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    return AutoencoderKL(**cfg).eval(), cfg


def tiny_clip(layers=2, act="quick_gelu"):
    torch.manual_seed(0)
    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
               max_position_embeddings=16, hidden_act=act, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval(), cfg


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(UNETS))
def test_unet_matches_diffusers_converter(name):
    model, cfg = tiny_unet(name)
    sd = model.state_dict()
    ldm_sd = unet_to_ldm(sd, cfg)
    assert_same(convert_ldm_unet_checkpoint(dict(ldm_sd), cfg), sd)  # the inverse is right
    ours = ldm.unet_to_diffusers(ldm.split_components(ldm_sd)["unet"], cfg)
    assert_same(ours, sd)
    again = UNet2DConditionModel(**cfg).eval()
    again.load_state_dict(ours, strict=True)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    kw = {"class_labels": torch.randn(1, 8)} if cfg.get("class_embed_type") else {}
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx, **kw).sample, model(x, t, ctx, **kw).sample)


@pytest.mark.parametrize("channels,layers", [((32, 64), 2), ((32, 32, 64), 1)])
def test_vae_matches_diffusers_converter(channels, layers):
    model, cfg = tiny_vae(channels, layers)
    sd = model.state_dict()
    ldm_sd = vae_to_ldm(sd, cfg)
    assert ldm_sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert_same(convert_ldm_vae_checkpoint(dict(ldm_sd), cfg), sd)
    assert_same(ldm.vae_to_diffusers(ldm.split_components(ldm_sd)["vae"], cfg), sd)


@pytest.mark.parametrize("variant", ["text_model", "bare", "position_ids"])
def test_sd1_clip(variant):
    model, cfg = tiny_clip()
    hub = hub_clip(model)
    ldm_sd = {"cond_stage_model.transformer." + k: v for k, v in hub.items()}
    assert_same(convert_ldm_clip_checkpoint(dict(ldm_sd)), hub)
    if variant == "bare":  # very old checkpoints: no `text_model.` after the prefix
        ldm_sd = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm_sd.items()}
    if variant == "position_ids":
        ldm_sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    assert_same(ldm.convert(ldm_sd, {"unet": None, "vae": None, "text_encoder": cfg})["text_encoder"], hub)


def test_openclip_round_trip():
    model, cfg = tiny_clip(layers=3, act="gelu")
    hub = hub_clip(model)
    extra, _ = tiny_clip(layers=4, act="gelu")  # SD2 files carry one more resblock than diffusers uses
    oc = clip_to_openclip({**hub_clip(extra), **hub})
    assert "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight" in oc
    oc["cond_stage_model.model.text_projection"] = torch.randn(32, 16)
    oc["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    ours = ldm.openclip_to_diffusers(ldm.split_components(oc)["openclip"], cfg)
    assert_same(ours, hub)
    ref = convert_open_clip_checkpoint(model, dict(oc))  # drops text_projection, but of the resblocks only 23
    assert {k for k in ref if k not in hub} == {k for k in ref if ".layers.3." in k} != set()
    assert_same({k: v for k, v in ref.items() if k in hub}, hub)
    again = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    again.load_state_dict({k.removeprefix("text_model."): v for k, v in ours.items()}, strict=True)
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        assert (again(ids).last_hidden_state - model(ids).last_hidden_state).abs().max() <= 1e-5


def tiny_checkpoint():
    unet, ucfg = tiny_unet("sd1")
    vae, vcfg = tiny_vae((32, 64), 2)
    clip, ccfg = tiny_clip()
    sd = {**unet_to_ldm(unet.state_dict(), ucfg), **vae_to_ldm(vae.state_dict(), vcfg),
          **{"cond_stage_model.transformer." + k: v for k, v in hub_clip(clip).items()}}
    ref = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": hub_clip(clip)}
    return sd, {"unet": ucfg, "vae": vcfg, "text_encoder": ccfg}, ref


def test_convert_full_checkpoint_and_ignored_keys():
    sd, cfgs, ref = tiny_checkpoint()
    junk = {"alphas_cumprod": torch.ones(1000), "betas": torch.ones(1000), "model_ema.decay": torch.tensor(0.99),
            "first_stage_model.loss.logvar": torch.zeros(())}
    out = ldm.convert({**sd, **junk}, cfgs)
    assert sorted(out) == ["text_encoder", "unet", "vae"]
    for n in out:
        assert_same(out[n], ref[n])
    assert ldm.split_components({**sd, **junk})["ignored"] == sorted(junk)


def test_convert_ema_weights():
    sd, cfgs, ref = tiny_checkpoint()
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in sd.items()
           if k.startswith("model.diffusion_model.")}
    out = ldm.convert({**sd, **ema}, cfgs, ema=True)["unet"]
    assert_same(out, {k: v + 1 for k, v in ref["unet"].items()})


def test_missing_and_unexpected_keys_are_named():
    sd, cfgs, _ = tiny_checkpoint()
    for prefix, key in [("model.diffusion_model.", "input_blocks.4.1.proj_in.weight"),
                        ("first_stage_model.", "decoder.up.0.block.0.nin_shortcut.bias"),
                        ("cond_stage_model.transformer.", "text_model.encoder.layers.1.mlp.fc2.weight")]:
        bad = dict(sd)
        del bad[prefix + key]
        with pytest.raises(KeyError, match=re.escape(f"({prefix}*): 1 key(s) missing from the checkpoint: {key}")):
            ldm.convert(bad, cfgs)
    with pytest.raises(ValueError, match=re.escape("output_blocks.99.0.weight")):
        ldm.convert({**sd, "model.diffusion_model.output_blocks.99.0.weight": torch.zeros(1)}, cfgs)
    oc = clip_to_openclip(hub_clip(tiny_clip(layers=3, act="gelu")[0]))
    del oc["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(KeyError, match=re.escape("transformer.resblocks.1.attn.in_proj_bias")):
        ldm.openclip_to_diffusers(ldm.split_components(oc)["openclip"], {"num_hidden_layers": 3})


@pytest.mark.parametrize("name", list(UNETS))
def test_infer_small_unet_from_shapes(name):
    model, cfg = tiny_unet(name)
    inferred = ldm.infer_configs(unet_to_ldm(model.state_dict(), cfg))["unet"]
    for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
              "use_linear_projection", "transformer_layers_per_block", "class_embed_type",
              "projection_class_embeddings_input_dim", "in_channels", "out_channels"):
        want = model.config[k]
        assert inferred[k] == (list(want) if isinstance(want, tuple) else want), k


def test_infer_small_vae_and_text_from_shapes():
    sd, _, _ = tiny_checkpoint()
    inferred = ldm.infer_configs(sd)
    assert inferred["vae"]["block_out_channels"] == [32, 64] and inferred["vae"]["layers_per_block"] == 2
    te = inferred["text_encoder"]
    assert (te["hidden_size"], te["num_hidden_layers"], te["intermediate_size"], te["max_position_embeddings"],
            te["hidden_act"]) == (32, 2, 64, 16, "quick_gelu")
    oc = clip_to_openclip(hub_clip(tiny_clip(layers=3, act="gelu")[0]))
    te = ldm.infer_configs(oc)["text_encoder"]
    assert (te["hidden_size"], te["num_hidden_layers"], te["hidden_act"]) == (32, 2, "gelu")  # last block unused


def test_conv_form_proj_is_reshaped_to_config():
    model, cfg = tiny_unet("sd2")  # linear proj_in/out; store them as 1×1 convs as some files do
    ldm_sd = {k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v
              for k, v in unet_to_ldm(model.state_dict(), cfg).items()}
    assert_same(ldm.convert(ldm_sd, {"unet": cfg})["unet"], model.state_dict())


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})


@pytest.mark.parametrize("version,prediction", [("sd1", None), ("sd2", None), ("sd2", "v_prediction"), ("x4", None),
                                                ("sdxl", None), ("sdxl_refiner", None)])
def test_infer_real_size_on_meta(version, prediction):
    """Every family's reference model, written in its single-file layout on `meta`, is recognised and gets back
    exactly the preset's configs (sizes read from shapes agree with the preset) and its weights' names."""
    from transformers import CLIPTextModelWithProjection

    want = ldm.preset(version, prediction or ("v_prediction" if version == "x4" else "epsilon"))
    unet = _meta(UNet2DConditionModel, want["unet"]).state_dict()
    vae = _meta(AutoencoderKL, want["vae"]).state_dict()
    clip_sd, texts = {}, {}
    with torch.device("meta"):
        if "text_encoder" in want:
            texts["text_encoder"] = hub_clip(CLIPTextModel(CLIPTextConfig(**want["text_encoder"])))
        if version in ("sd2", "x4"):
            full = hub_clip(CLIPTextModel(CLIPTextConfig(**{**want["text_encoder"], "num_hidden_layers": 24})))
            clip_sd = {**clip_to_openclip(full), "cond_stage_model.model.text_projection": torch.empty(1024, 1024),
                       "cond_stage_model.model.logit_scale": torch.empty(())}
        elif version == "sd1":
            clip_sd = {"cond_stage_model.transformer." + k: v for k, v in texts["text_encoder"].items()}
        else:
            big = CLIPTextModelWithProjection(CLIPTextConfig(**want["text_encoder_2"]))
            texts["text_encoder_2"] = {**hub_clip(big.text_model), "text_projection.weight": big.text_projection.weight}
            prefix = "conditioner.embedders.0.model." if version == "sdxl_refiner" else "conditioner.embedders.1.model."
            clip_sd = {**clip_to_openclip(texts["text_encoder_2"], prefix), prefix + "logit_scale": torch.empty(())}
            if version == "sdxl":
                clip_sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in texts["text_encoder"].items()})
    sd = {**unet_to_ldm(unet, want["unet"]), **vae_to_ldm(vae, want["vae"]), **clip_sd}
    assert ldm.family(ldm.split_components(sd)) == version
    got = ldm.infer_configs(sd, prediction_type=prediction)
    assert got == want
    out = ldm.convert(sd, prediction_type=prediction)
    assert_same(out["unet"], unet)
    assert_same(out["vae"], vae)
    assert sorted(out) == sorted(["unet", "vae", *texts])
    for name, text in texts.items():
        assert_same(out[name], text)
