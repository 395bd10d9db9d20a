"""Bad input → one clear line on stderr, exit code 2, and no output file."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
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


def bad_path(tiny, tmp):
    return ["--model", str(tmp / "nope")], "does not exist"


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


def height_not_multiple_of_8(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--height", "60"], "height=60"


def negative_steps(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--steps", "-3"], "steps=-3"


def guidance_nan(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--guidance", "nan"], "guidance=nan"


def missing_out_folder(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--out", str(tmp / "no" / "such" / "dir.png")], "does not exist"


def single_file_without_tokenizer(tiny, tmp):
    (tmp / "m.safetensors").write_bytes(b"")
    return ["--model", str(tmp / "m.safetensors")], "tokenizer"


def unavailable_device(tiny, tmp):
    if torch.cuda.is_available():
        return ["--model", str(tiny("sd1")[0]), "--device", "warp9"], "not a torch device"
    return ["--model", str(tiny("sd1")[0]), "--device", "cuda"], "no CUDA device"


CASES = [unavailable_device, bad_path, pickled_file, pickled_component, corrupt_safetensors, missing_key, wrong_shape,
         unknown_scheduler_value, unsupported_unet_value, height_not_multiple_of_8, negative_steps, guidance_nan,
         missing_out_folder, single_file_without_tokenizer]


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


def test_img2img_wrong_image_size(tiny, tmp_path, capsys):
    Image.fromarray(np.zeros((60, 64, 3), np.uint8)).save(tmp_path / "in.png")
    out, model = tmp_path / "out.png", str(tiny("sd1")[0])
    capsys.readouterr()
    assert main(["img2img", "--model", model, "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--noise-level", "400"), ("--backproject", "-1")])
def test_upscale_bad_option(tiny, tmp_path, capsys, flag, value):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    out, model = tmp_path / "out.png", str(tiny("x4")[0])
    capsys.readouterr()
    assert main(["upscale", "--model", model, "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--steps", "2", flag, value, "--out", str(out), "--quiet"]) == 2
    assert f"{flag[2:].replace('-', '_')}={value}" in capsys.readouterr().err
    assert not out.exists()


def height_zero(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--height", "0"], "height=0"


def out_is_a_folder(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--out", str(tmp)], "is a folder"


def out_checked_before_the_model(tiny, tmp):
    return ["--model", str(tmp / "nope"), "--out", str(tmp)], "is a folder"


def single_file_matching_nothing(tiny, tmp):
    save_file({"foo.weight": torch.zeros(3)}, tmp / "other.safetensors")
    return ["--model", str(tmp / "other.safetensors"), "--config", str(tiny("sd1")[0])], \
        "no unet / vae / text_encoder weights found"


def integer_weights(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_weights(m / "unet" / "diffusion_pytorch_model.safetensors",
                  lambda sd: sd.update({k: v.to(torch.int32) for k, v in sd.items()}))
    return ["--model", str(m)], "not floating point"


def huge_config_size(tiny, tmp):
    m = _copy(tiny, "sd1", tmp)
    _edit_json(m / "unet" / "config.json", sample_size=10**6)
    return ["--model", str(m)], "over the limit"


def huge_height(tiny, tmp):
    return ["--model", str(tiny("sd1")[0]), "--height", "100000", "--width", "100000"], \
        "over the limit"


MORE = [height_zero, out_is_a_folder, out_checked_before_the_model, single_file_matching_nothing,
        integer_weights, huge_config_size, huge_height]


@pytest.mark.parametrize("case", MORE, ids=[c.__name__ for c in MORE])
def test_generate_more_bad_input(tiny, tmp_path, capsys, case):
    test_generate_bad_input(tiny, tmp_path, capsys, case)


def _huge_png(path, side=30000):
    """A PNG whose header says side × side: refused before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("image,expected", [("missing.png", "no such image file"),
                                            ("huge.png", "over the limit"),
                                            ("folder", "no such image file"),
                                            ("text.png", "not a readable image")])
def test_img2img_input_checked_before_the_model(tiny, tmp_path, capsys, image, expected):
    _huge_png(tmp_path / "huge.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    out = tmp_path / "out.png"
    capsys.readouterr()
    assert main(["img2img", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / image),
                 "--prompt", "x", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not out.exists()


def test_load_takes_one_embeddings_path_as_a_string(tmp_path):
    import engine

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        engine.load(embeddings=str(tmp_path / "nope.safetensors"))


def test_iterinv_edit_inversion_that_is_not_safetensors(tmp_path, capsys):
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "inv.safetensors").write_text("hello")
    capsys.readouterr()
    assert main(["iterinv-edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--edit", "y",
                 "--inversion", str(tmp_path / "inv.safetensors"), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a readable .safetensors file" in err and "\n" not in err
    assert not (tmp_path / "r").exists()
