"""Single-file SD checkpoints in the LDM key layout load to the same models as their diffusers folders."""
import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.checkpoints import LoadError, read_json
from test_ldm import clip_to_openclip, unet_to_ldm, vae_to_ldm


def write_single_file(folder, path, kind):
    """The tiny diffusers folder re-written as one LDM-layout .safetensors (test-side inverse mapping): SD 1.x
    with HF CLIP keys, SD 2.x with an OpenCLIP tower, SDXL in its "conditioner" layout (the refiner keeps its
    one bigG tower at embedders.0)."""
    from engine.checkpoints import read_state_dict, weight_files

    def text(name):
        sd = read_state_dict(weight_files(folder / name))
        return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}

    unet = read_state_dict(weight_files(folder / "unet"))
    vae = read_state_dict(weight_files(folder / "vae"))
    sd = {**unet_to_ldm(unet, read_json(folder / "unet" / "config.json")),
          **vae_to_ldm(vae, read_json(folder / "vae" / "config.json"))}
    if kind in ("sd1", "sd1_inpaint"):
        sd.update({"cond_stage_model.transformer." + k: v for k, v in text("text_encoder").items()})
    elif kind == "sdxl":
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in text("text_encoder").items()})
        sd.update(clip_to_openclip(text("text_encoder_2"), "conditioner.embedders.1.model."))
        sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)  # unused by the engine
    elif kind == "sdxl_refiner":
        sd.update(clip_to_openclip(text("text_encoder_2"), "conditioner.embedders.0.model."))
    else:
        sd.update(clip_to_openclip(text("text_encoder")))
    sd["model_ema.decay"] = torch.tensor(0.999)  # extra LDM keys are ignored
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1_inpaint"])
def test_single_file_matches_folder(tiny, tmp_path, kind):
    folder, _ = tiny(kind)
    single = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind)
    a = engine.load(folder)
    b = engine.load(single, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a.model, name).state_dict(), getattr(b.model, name).state_dict()
        assert sorted(sa) == sorted(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert b.model.is_inpainting == (kind == "sd1_inpaint")
    if kind == "sd1_inpaint":
        mask = torch.zeros(64, 64)
        mask[16:48, 8:40] = 1
        run = lambda p: p.inpaint(torch.zeros(1, 3, 64, 64), mask, "a red star", steps=4, seed=1, output="pt",  # noqa: E731
                                  progress=False)
    else:
        run = lambda p: p.generate("a red star", steps=4, seed=1, height=64, width=64, output="pt",  # noqa: E731
                                   progress=False)
    assert torch.equal(run(a), run(b))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_with_a_tokenizer_folder_alone_pads_as_its_family(tiny, tmp_path, kind):
    """A config folder without a tokenizer (these tiny configs cannot all be read from shapes): the vocabulary
    comes from --tokenizer, the pad token from the family (SD 2.x pads with "!"), the images are the folder's."""
    import shutil

    folder, _ = tiny(kind)
    single = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind)
    configs = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("tokenizer"))
    a, b = engine.load(folder), engine.load(single, config=configs, tokenizer=folder / "tokenizer")
    assert b.model.tokenizer.pad_id == a.model.tokenizer.pad_id
    assert torch.equal(b.model.tokenizer(["a red star"]), a.model.tokenizer(["a red star"]))
    run = lambda p: p.generate("a red star", steps=4, seed=1, height=64, width=64, output="pt", progress=False)
    assert torch.equal(run(a), run(b))


def test_single_file_without_any_tokenizer_names_where_to_get_one(tiny, tmp_path, monkeypatch):
    from engine import clip_vocab

    folder, _ = tiny("sd1")
    single = write_single_file(folder, tmp_path / "sd1.safetensors", "sd1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(clip_vocab, "open_clip_bpe", lambda: None)
    with pytest.raises(LoadError, match="no CLIP tokenizer found") as e:
        engine.load(single)
    assert all(w in str(e.value) for w in ("--tokenizer", "Hugging Face cache", "open-clip-torch"))


def test_x4_single_file_loads_as_an_upscaler(tiny, tmp_path):
    """The x4 upscaler's file: recognised by its noise-level classes and 7 input channels; with its folder's
    configs it is the folder's model, low_res_scheduler and max_noise_level included."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from engine import ldm

    folder, _ = tiny("x4")
    single = write_single_file(folder, tmp_path / "x4.safetensors", "x4")
    a, b = engine.load(folder), engine.load(single, config=folder)
    assert b.is_upscaler and b.model.max_noise_level == a.model.max_noise_level == 350
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a.model, name).state_dict(), getattr(b.model, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    low = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    run = lambda p: p.upscale(low, "a red star", steps=3, seed=1, output="pt", progress=False)
    assert torch.equal(run(a), run(b))

    sd = load_file(single)
    got, want = ldm.infer_configs(sd), read_json(folder / "unet" / "config.json")
    assert ldm.family(ldm.split_components(sd)) == "x4"
    assert got["scheduler"]["prediction_type"] == "v_prediction" and got["max_noise_level"] == 350
    assert got["low_res_scheduler"]["beta_schedule"] == "scaled_linear"
    for k in ("in_channels", "block_out_channels", "down_block_types", "num_class_embeds", "cross_attention_dim"):
        assert got["unet"][k] == (list(want[k]) if isinstance(want[k], (list, tuple)) else want[k]), k
    attn = [i for i, t in enumerate(want["down_block_types"]) if t.startswith("CrossAttn")]
    assert [got["unet"]["only_cross_attention"][i] for i in attn] == [want["only_cross_attention"][i] for i in attn]


def test_sd2_single_file_says_which_prediction_type_it_assumed(tiny, tmp_path):
    """Without a scheduler config, an SD 2.x file's ε vs v cannot be read from its weights: the engine says what
    it assumed and how to override it, and says nothing once told. (The folder gives the tiny model's other configs,
    which shapes alone cannot.)"""
    import shutil
    import warnings

    folder, _ = tiny("sd2")
    single = write_single_file(folder, tmp_path / "sd2.safetensors", "sd2")
    configs = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("scheduler"))
    with pytest.warns(UserWarning, match="assumed epsilon.*--prediction-type v_prediction"):
        p = engine.load(single, config=configs)
    assert p.model.scheduler.prediction_type == "epsilon"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = engine.load(single, config=configs, prediction_type="v_prediction")
    assert p.model.scheduler.prediction_type == "v_prediction"


def test_a_safetensors_header_that_does_not_fit_its_data_is_a_load_error(tmp_path):
    import json
    import struct

    header = json.dumps({"model.diffusion_model.x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(LoadError, match="do not fit"):
        engine.load(tmp_path / "bad.safetensors")
    (tmp_path / "list.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(LoadError, match="not a readable .safetensors file"):
        engine.load(tmp_path / "list.safetensors")
