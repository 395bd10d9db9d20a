"""A model that cannot be loaded → one clear line on stderr, exit code 2, and no output file.
Every other bad input is in test_bad_inputs.py."""
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.cli import main


def _copy(tiny, kind, tmp_path):
    folder, _ = tiny(kind)
    return shutil.copytree(folder, tmp_path / f"model_{kind}")


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _edit_weights(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def pickled_file(tiny, tmp):
    (tmp / "model.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    return ["--model", str(tmp / "model.ckpt")], "pickled"


def pickled_component(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    w = m / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(m / "unet" / "diffusion_pytorch_model.bin")
    return ["--model", str(m)], "pickled"


def corrupt_safetensors(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file at all")
    return ["--model", str(m)], "not a readable .safetensors"


def missing_key(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_weights(m / "unet" / "diffusion_pytorch_model.safetensors", lambda sd: sd.pop("conv_in.weight"))
    return ["--model", str(m)], "missing: conv_in.weight"


def wrong_shape(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_weights(m / "vae" / "diffusion_pytorch_model.safetensors",
                  lambda sd: sd.update({"quant_conv.bias": sd["quant_conv.bias"][:3].clone()}))
    return ["--model", str(m)], "mis-shaped: quant_conv.bias"


def unknown_scheduler_value(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_json(m / "scheduler" / "scheduler_config.json", beta_schedule="cosine_wobble")
    return ["--model", str(m)], "beta_schedule"


def unsupported_unet_value(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_json(m / "unet" / "config.json", act_fn="gelu")
    return ["--model", str(m)], "act_fn"


def single_file_without_tokenizer(tiny, tmp):
    (tmp / "m.safetensors").write_bytes(b"")  # unreadable: the tokenizer is checked first
    return ["--model", str(tmp / "m.safetensors"), "--tokenizer", str(tmp / "none")], "not a CLIP tokenizer folder"


def unavailable_device(tiny, tmp):
    if torch.cuda.is_available():
        return ["--model", str(tiny("sd1")[0]), "--device", "warp9"], "not a torch device"
    return ["--model", str(tiny("sd1")[0]), "--device", "cuda"], "no CUDA device"



def single_file_matching_nothing(tiny, tmp):
    save_file({"foo.weight": torch.zeros(3)}, tmp / "other.safetensors")
    return ["--model", str(tmp / "other.safetensors"), "--config", str(tiny("sd1")[0])], \
        "no unet / vae / text encoder weights found"


def integer_weights(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_weights(m / "unet" / "diffusion_pytorch_model.safetensors",
                  lambda sd: sd.update({k: v.to(torch.int32) for k, v in sd.items()}))
    return ["--model", str(m)], "not floating point"


def huge_config_size(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_json(m / "unet" / "config.json", sample_size=10**6)
    return ["--model", str(m)], "over the limit"


CASES = [unavailable_device, pickled_file, pickled_component, corrupt_safetensors, missing_key, wrong_shape,
         unknown_scheduler_value, unsupported_unet_value, single_file_without_tokenizer,
         single_file_matching_nothing, integer_weights, huge_config_size]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_generate_bad_input(tiny, tmp_path, capsys, case):
    args, expected = case(tiny, tmp_path)
    capsys.readouterr()  # drop what building the fixture printed
    out = tmp_path / "out.png"
    argv = ["generate", "--prompt", "a star", "--steps", "2", "--out", str(out), "--quiet"] + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.png*"))  # no temporary left behind
