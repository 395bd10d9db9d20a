"""Loader paths beyond the plain folder: shards, variants, dtypes, and what it refuses."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.checkpoints import LoadError, load as load_components


def _copy(tiny, tmp_path, kind="sd1"):
    return shutil.copytree(tiny(kind)[0], tmp_path / kind)


def test_sharded_and_variant_weights_load_identically(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    ref = load_components(tiny("sd1")[0]).unet.state_dict()
    # unet: two shards + index
    sd = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / "unet" / name)
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    got = load_components(folder).unet.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # every component as an fp16 variant, and nothing else
    for comp in ("unet", "vae", "text_encoder"):
        for f in (folder / comp).glob("*.safetensors"):
            stem = f.name.split(".")[0]
            f.rename(f.with_name(f"{stem}.fp16.safetensors"))
        idx = folder / comp / "diffusion_pytorch_model.safetensors.index.json"
        if idx.exists():
            m = json.loads(idx.read_text())
            m["weight_map"] = {k: v.replace(".safetensors", ".fp16.safetensors") for k, v in m["weight_map"].items()}
            (folder / comp / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text(json.dumps(m))
            idx.unlink()
    with pytest.raises(LoadError, match="no .safetensors weights"):
        load_components(folder)
    got = load_components(folder, variant="fp16").unet.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_missing_shard_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LoadError, match="part-1.safetensors"):
        load_components(folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype(tiny, dtype):
    c = load_components(tiny("sd2")[0], dtype=dtype)
    assert next(c.unet.parameters()).dtype == dtype and next(c.text_encoder.parameters()).dtype == dtype
    # SD VAEs overflow in fp16: force_upcast (diffusers' default) keeps the VAE in fp32
    assert next(c.vae.parameters()).dtype == (torch.float32 if dtype == torch.float16 else dtype)


def test_bfloat16_pipeline_runs_close_to_fp32(tiny):
    run = lambda p: p.generate("a star", steps=3, seed=0, height=64, width=64, output="pt", progress=False)
    a = run(engine.load(tiny("sd1")[0]))
    b = run(engine.load(tiny("sd1")[0], dtype="bfloat16")).float()
    assert torch.isfinite(b).all() and (a - b).abs().mean().item() < 0.1


def test_folder_problems_are_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    with pytest.raises(LoadError, match="no model_index.json"):
        engine.load(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    del index["vae"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="no 'vae' component"):
        engine.load(folder)
    with pytest.raises(ValueError, match="dtype"):
        engine.load(tiny("sd1")[0], dtype="float8")
