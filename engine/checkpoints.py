"""Folder / single-file checkpoints → configs + state dicts → models (built on `meta`, filled with
assign=True)."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, canonical_keys
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .schedule import SchedulerConfig
from .tokenizer import Tokenizer

PICKLED = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_MODELS = {"unet": (UNet2DConditionModel, UNetConfig), "vae": (AutoencoderKL, VAEConfig),
           "text_encoder": (CLIPTextModel, CLIPTextConfig)}
_CLASSES = {**_MODELS, "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig)}  # SDXL


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and the fix."""


def _refuse_pickle(path: Path):
    raise LoadError(f"{path}: pickled checkpoints ({path.suffix}) can run arbitrary code "
                    "when loaded and are refused; convert it to .safetensors "
                    "(safetensors.torch.save_file) and load that")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} is missing: "
                        "a diffusers folder needs it next to the weights") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON ({e})") from None


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The .safetensors files of one component folder (single, sharded, or an `fp16`-style
    variant)."""
    for stem in _WEIGHT_STEMS:
        name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
        if (folder / name).exists():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise LoadError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    pickled = [p for p in folder.glob("*") if p.suffix in PICKLED]
    if pickled:
        _refuse_pickle(pickled[0])
    want = f" (variant {variant!r})" if variant else ""
    raise LoadError(f"{folder}: no .safetensors weights found{want}; expected "
                    "diffusion_pytorch_model.safetensors or model.safetensors, "
                    "or a *.safetensors.index.json")


def read_state_dict(files: list[Path], device="cpu", dtype=None) -> dict:
    sd = {}
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt", device=str(device))
        # safetensors raises its own error type for a corrupt or non-safetensors file
        except Exception as e:
            raise LoadError(f"{f}: not a readable .safetensors file ({e})") from None
        with fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return sd


def fill(model: torch.nn.Module, sd: dict, where: str) -> torch.nn.Module:
    """load_state_dict(assign=True) after checking names and shapes, reporting every mismatch by
    name."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(sd)) if sd[k].shape != want[k].shape]
    ints = [f"{k} ({str(sd[k].dtype).removeprefix('torch.')})" for k in sorted(set(want) & set(sd))
            if want[k].is_floating_point() and not sd[k].is_floating_point()]
    problems = [f"{len(missing)} missing: {', '.join(missing[:5])}" if missing else "",
                f"{len(unexpected)} unexpected: {', '.join(unexpected[:5])}" if unexpected else "",
                f"{len(shapes)} mis-shaped: {'; '.join(shapes[:3])}" if shapes else "",
                f"{len(ints)} not floating point: {', '.join(ints[:3])}" if ints else ""]
    problems = [p for p in problems if p]
    if problems:
        raise LoadError(f"{where}: weights do not match the config: {' | '.join(problems)}")
    model.load_state_dict(sd, strict=True, assign=True)
    # channels-last conv weights make every activation NHWC: the NCHW ↔ token-sequence permutes
    # around the attention blocks become free views, and oneDNN's convs are 0–10% faster
    # (bench/results/conv_cpu.json)
    return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def build(name: str, config: dict, sd: dict, where: str) -> torch.nn.Module:
    cls, cfg_cls = _CLASSES[name]
    # SD VAEs overflow in fp16; diffusers upcasts them too
    if name == "vae" and config.get("force_upcast", True):
        sd = {k: v.float() if v.dtype == torch.float16 else v for k, v in sd.items()}
    with torch.device("meta"):
        model = cls(cfg_cls.from_dict(config))
    return fill(model, sd, where)


def load_component(folder: Path, name: str, dtype=torch.float32, device="cpu",
                   variant=None) -> torch.nn.Module:
    folder = Path(folder)
    sd = read_state_dict(weight_files(folder, variant), device, dtype)
    if name.startswith("text_encoder"):
        canonical_keys(None, sd, "")
    return build(name, read_json(folder / "config.json"), sd, str(folder))


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    scheduler: SchedulerConfig
    low_res_scheduler: SchedulerConfig | None = None
    max_noise_level: int | None = None


def _scheduler(folder: Path) -> SchedulerConfig:
    return SchedulerConfig.from_dict(read_json(folder / "scheduler_config.json"))


def load_folder(path: Path, dtype=torch.float32, device="cpu", variant=None) -> Components:
    index = read_json(path / "model_index.json")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if name not in index:
            raise LoadError(f"{path / 'model_index.json'} has no {name!r} component; "
                            "this engine needs unet, vae, text_encoder, tokenizer and scheduler")
    models = {n: load_component(path / n, n, dtype, device, variant) for n in _MODELS}
    low_res = _scheduler(path / "low_res_scheduler") if "low_res_scheduler" in index else None
    return Components(**models, tokenizer=Tokenizer.from_dir(path / "tokenizer"),
                      scheduler=_scheduler(path / "scheduler"), low_res_scheduler=low_res,
                      max_noise_level=index.get("max_noise_level"))


def load_single_file(path: Path, dtype=torch.float32, device="cpu", config: Path | None = None,
                     prediction_type: str | None = None, tokenizer: Path | None = None) -> Components:
    """An SD 1.x / 2.x checkpoint in the original LDM key layout. Configs come from `config` (a
    diffusers folder; its weights are not needed) where it has them, else are inferred from tensor
    shapes. Single files carry no tokenizer: it is `config`'s, else CLIP's vocabulary from the
    `tokenizer` folder, the Hugging Face cache or open-clip-torch (engine.clip_vocab), padded as the
    family pads."""
    from . import clip_vocab, ldm

    config = Path(config) if config is not None else None
    given = {n: read_json(config / n / "config.json") for n in _MODELS
             if config is not None and (config / n / "config.json").exists()}
    if config is not None and (config / "scheduler" / "scheduler_config.json").exists():
        given["scheduler"] = read_json(config / "scheduler" / "scheduler_config.json")
    own = config is not None and (config / "tokenizer").is_dir()
    try:
        vocab = None if own else clip_vocab.find(tokenizer)
    except FileNotFoundError as e:
        raise LoadError(f"{path}: {e}") from None
    sd = read_state_dict([path], device, dtype)
    configs = given if len(given) == 4 else {**ldm.infer_configs(sd, prediction_type), **given}
    if prediction_type is not None:
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
    try:
        converted = ldm.convert(sd, configs)
    except KeyError as e:
        raise LoadError(f"{path}: {e.args[0] if e.args else e}") from None
    absent = [n for n in _MODELS if n not in converted]
    if absent:
        raise LoadError(f"{path}: no {' / '.join(absent)} weights found (an SD 1.x/2.x checkpoint "
                        "has model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)")
    if own:
        tok = Tokenizer.from_dir(config / "tokenizer")
    else:
        pad = "!" if configs["text_encoder"]["hidden_act"] == "gelu" else "<|endoftext|>"  # OpenCLIP: SD 2.x
        tok = clip_vocab.from_source(vocab, pad)
    models = {n: build(n, configs[n], converted[n], f"{path} [{n}]") for n in _MODELS}
    return Components(**models, tokenizer=tok, scheduler=SchedulerConfig.from_dict(configs["scheduler"]))


def load(path, dtype=torch.float32, device="cpu", variant=None, config=None,
         prediction_type=None, tokenizer=None) -> Components:
    """A diffusers folder (model_index.json) or a single-file LDM `.safetensors` checkpoint."""
    path = Path(path)
    try:
        device = torch.device(device)
    except RuntimeError:
        raise LoadError(f"device={device!r} is not a torch device; "
                        "use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device={str(device)!r}: this torch has no CUDA device; use --device cpu")
    if check_path(path).is_dir():
        return load_folder(path, dtype, device, variant)
    return load_single_file(path, dtype, device, config, prediction_type, tokenizer)


def check_path(path) -> Path:
    """A model path `load` takes, checked without reading it: a folder with model_index.json or a
    .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist; "
                        "pass a diffusers model folder or a .safetensors file")
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise LoadError(f"{path} has no model_index.json; "
                            "pass the top folder of a diffusers model")
        return path
    if path.suffix in PICKLED:
        _refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoadError(f"{path}: unknown checkpoint type {path.suffix!r}; "
                        "pass a folder or a .safetensors file")
    return path
