"""LoRA files (kohya / A1111 with LoCon, diffusers / PEFT) against diffusers' load_lora_weights + fuse_lora,
exact unload, prompt tags and bad files."""
import json

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.lora import LoraError
from engine.ldm_keys import unet_key_pairs
from engine.prompt import PromptError

PIXEL_TOL = 2 / 255  # the end-to-end bound on [0, 1] pixels
RANK = 4


def _pixels(x):
    return (x / 2 + 0.5).clamp(0, 1)


def _layers(module, wanted) -> dict:
    """name -> layer of `module`'s Linear / Conv2d layers whose name ends in one of `wanted`."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(wanted)}


UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # all of them, as kohya writes


def _pair(layer, g, size=0.6):
    """A LoRA (up, down) pair for a layer: LoCon's k×k down and 1×1 up for a convolution."""
    w = layer.weight
    down = torch.randn(RANK, *w.shape[1:], generator=g) * size / w[0].numel() ** 0.5
    up = torch.randn(w.shape[0], RANK, *(1,) * (w.ndim - 2), generator=g) * size
    return up, down


def kohya_file(ref, path, te_prefixes, ldm_names=False, alpha=2.0, seed=0):
    """A kohya / A1111 file for the diffusers pipeline `ref`: `lora_unet_*` (LDM names when ldm_names, as
    kohya's SDXL files), `lora_te*_*` for each (prefix, text encoder)."""
    g = torch.Generator().manual_seed(seed)
    ldm = {d[:-7]: s[:-7] for s, d in unet_key_pairs(dict(ref.unet.config)) if d.endswith(".weight")}
    towers = [("lora_unet", ref.unet, UNET_LAYERS)] + [(p, getattr(ref, te), TEXT_LAYERS) for p, te in te_prefixes]
    sd = {}
    for prefix, net, wanted in towers:
        for name, layer in _layers(net, wanted).items():
            key = f"{prefix}_{(ldm[name] if ldm_names and net is ref.unet else name).replace('.', '_')}"
            sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = _pair(layer, g)
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_file(ref, path, alpha=8, seed=1):
    """A diffusers / PEFT file (unet.* and text_encoder.* lora_A / lora_B, α in lora_adapter_metadata)."""
    g = torch.Generator().manual_seed(seed)
    sd, meta = {}, {}
    for comp, wanted in (("unet", UNET_LAYERS[:4] + ("proj_in",)), ("text_encoder", TEXT_LAYERS)):
        layers = _layers(getattr(ref, comp), wanted)
        for name, layer in layers.items():
            sd[f"{comp}.{name}.lora_B.weight"], sd[f"{comp}.{name}.lora_A.weight"] = _pair(layer, g)
        # what diffusers' save_lora_weights writes: each component's LoraConfig
        meta.update({f"{comp}.r": RANK, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(layers)})
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def _reference(ref, folder, lora, scale, **call):
    """diffusers' pipeline from the same folder, with the LoRA loaded and fused at `scale`."""
    pipe = type(ref).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    return pipe("a red star", generator=torch.Generator().manual_seed(3), output_type="pt", **call).images


@pytest.mark.parametrize("fmt,scale", [("kohya", 0.7), ("peft", 1.0)])
def test_sd1_lora_matches_diffusers(tiny, tmp_path, fmt, scale):
    folder, ref = tiny("sd1")
    f = tmp_path / "style.safetensors"
    kohya_file(ref, f, [("lora_te", "text_encoder")]) if fmt == "kohya" else peft_file(ref, f)
    call = dict(num_inference_steps=8, guidance_scale=7.5, height=64, width=64)
    want = _reference(ref, folder, f, scale, **call)
    plain = ref("a red star", generator=torch.Generator().manual_seed(3), output_type="pt", **call).images
    assert (want - plain).abs().max() > 0.05  # the LoRA changes the image: the test can fail
    got = engine.load(folder, loras=[(f, scale)]).generate("a red star", steps=8, guidance=7.5, seed=3,
                                                            output="pt", progress=False)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_sdxl_kohya_lora_with_ldm_names_matches_diffusers(tiny, tmp_path):
    folder, ref = tiny("sdxl")
    f = kohya_file(ref, tmp_path / "xl.safetensors", [("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")],
                   ldm_names=True)
    call = dict(num_inference_steps=6, guidance_scale=6.0, height=64, width=64)
    want = _reference(ref, folder, f, 0.8, **call)
    plain = ref("a red star", generator=torch.Generator().manual_seed(3), output_type="pt", **call).images
    assert (want - plain).abs().max() > 0.05
    got = engine.load(folder, loras=[(f, 0.8)]).generate("a red star", steps=6, guidance=6.0, seed=3,
                                                          output="pt", progress=False)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def _weights(pipe):
    m = pipe.model
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(m, c).state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_unload_restores_the_weights_bit_for_bit(tiny, tmp_path, dtype):
    folder, ref = tiny("sd1")
    a = kohya_file(ref, tmp_path / "a.safetensors", [("lora_te", "text_encoder")], seed=3)
    b = peft_file(ref, tmp_path / "b.safetensors", seed=4)
    pipe = engine.load(folder, dtype=dtype)
    before = _weights(pipe)
    pipe.load_lora(a, 0.9)
    only_a = _weights(pipe)
    assert pipe.load_lora(b, -0.5) == "b"
    assert any(not torch.equal(before[k], v) for k, v in _weights(pipe).items())
    assert pipe.unload_lora("b") == ["b"]
    assert all(torch.equal(only_a[k], v) for k, v in _weights(pipe).items())
    assert pipe.unload_lora() == ["a"]
    assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())


def test_prompt_tag_merges_for_its_job_only(tiny, tmp_path):
    folder, ref = tiny("sd1")
    (tmp_path / "sub").mkdir()
    f = kohya_file(ref, tmp_path / "sub" / "style.safetensors", [("lora_te", "text_encoder")])
    run = dict(steps=4, guidance=7.5, seed=1, output="pt", progress=False)
    loaded = engine.load(folder, loras=[(f, 0.6)]).generate("a red star", **run)
    pipe = engine.load(folder, lora_dir=tmp_path)
    plain = pipe.generate("a red star", **run)
    tagged = pipe.generate("a red star <lora:style:0.6>", **run)
    assert torch.equal(tagged, loaded)  # the tag is the file at that scale, and is not read as text
    assert torch.equal(pipe.generate("a red star", **run), plain)  # the next job's prompts name none
    with pytest.raises(PromptError, match="scales"):
        pipe.generate(["<lora:style:0.5> a", "<lora:style:0.6> b"], **run)
    with pytest.raises(LoraError, match="no files named nope"):
        pipe.generate("a <lora:nope:1>", **run)
    with pytest.raises(LoraError, match="--lora-dir"):
        engine.load(folder).generate("a <lora:style>", **run)


def test_mismatched_keys_are_named_or_skipped(tiny, tmp_path):
    folder, ref = tiny("sd1")
    _, xl = tiny("sdxl")
    f = kohya_file(xl, tmp_path / "xl.safetensors", [("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")])
    with pytest.raises(LoraError, match=r"key\(s\) this engine cannot merge.*--lora-strict off"):
        engine.load(folder, loras=[f])
    good = kohya_file(ref, tmp_path / "good.safetensors", [])
    sd = {**__import__("safetensors.torch").torch.load_file(good),
          "lora_unet_nowhere.lora_up.weight": torch.zeros(2, RANK),
          "lora_unet_nowhere.lora_down.weight": torch.zeros(RANK, 2),
          "lora_unet_x.hada_w1_a": torch.zeros(2, 2)}
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraError, match="nowhere.*no such layer"):
        engine.load(folder, loras=[tmp_path / "mixed.safetensors"])
    with pytest.warns(UserWarning, match=r"skipped 2 key\(s\).*LoHa"):
        engine.load(folder, loras=[tmp_path / "mixed.safetensors"], lora_strict=False)


def test_cli_lora_flag_and_prompt_tag_give_the_same_image(tiny, tmp_path):
    from engine.cli import main

    folder, ref = tiny("sd1")
    f = kohya_file(ref, tmp_path / "style.safetensors", [("lora_te", "text_encoder")])
    common = ["generate", "--model", str(folder), "--steps", "3", "--quiet", "--height", "32", "--width", "32"]
    assert main(common + ["--prompt", "a red star", "--lora", f"{f}:0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--prompt", "a red star <lora:style:0.5>", "--lora-dir", str(tmp_path),
                          "--out", str(tmp_path / "b.png")]) == 0
    assert main(common + ["--prompt", "a red star", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = ((tmp_path / f"{n}.png").read_bytes() for n in "abc")
    assert a == b != c


@pytest.mark.parametrize("extra,match", [
    (["--lora", "missing.safetensors"], "no such LoRA file"),
    (["--lora", "x.ckpt:0.5"], "pickled LoRA"),
    (["--prompt", "a <lora:nope:1>", "--lora-dir", "."], "no files named nope"),
    (["--prompt", "a <lora:nope:x>"], "is not a number"),
    (["--prompt", "a <lora:nope>"], "--lora-dir"),
])
def test_cli_bad_lora_input_fails_before_loading(tiny, tmp_path, monkeypatch, cli_error, extra, match):
    folder, _ = tiny("sd1")
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "o.png")]
    cli_error(argv + extra, match)
