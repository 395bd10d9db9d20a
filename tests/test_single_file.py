"""Single-file SD checkpoints in the LDM key layout load to the same models as their diffusers folders."""
import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.checkpoints import LoadError, read_json
from test_ldm import clip_to_openclip, unet_to_ldm, vae_to_ldm


def write_single_file(folder, path, kind):
    """The tiny diffusers folder re-written as one LDM-layout .safetensors (test-side inverse mapping)."""
    from engine.checkpoints import read_state_dict, weight_files

    unet = read_state_dict(weight_files(folder / "unet"))
    vae = read_state_dict(weight_files(folder / "vae"))
    text = read_state_dict(weight_files(folder / "text_encoder"))
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    sd = {**unet_to_ldm(unet, read_json(folder / "unet" / "config.json")),
          **vae_to_ldm(vae, read_json(folder / "vae" / "config.json"))}
    if kind == "sd1":
        sd.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    else:
        sd.update(clip_to_openclip(text))
    sd["model_ema.decay"] = torch.tensor(0.999)  # extra LDM keys are ignored
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_matches_folder(tiny, tmp_path, kind):
    folder, _ = tiny(kind)
    single = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind)
    a = engine.load(folder)
    b = engine.load(single, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a.model, name).state_dict(), getattr(b.model, name).state_dict()
        assert sorted(sa) == sorted(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    run = lambda p: p.generate("a red star", steps=4, seed=1, height=64, width=64, output="pt", progress=False)
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
