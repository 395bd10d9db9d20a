"""Folder / single-file checkpoints → configs + state dicts → models (built on `meta`, filled with
assign=True)."""
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels import cpu
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


def read_header(f, path) -> tuple[dict, int]:
    """A .safetensors file's header ({name: {dtype, shape, data_offsets}}, metadata dropped) and
    where its data starts; one line naming the file when it is not one."""
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(f.read(8), "little")
    try:
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise ValueError(f"a header of {n} bytes in a {size}-byte file")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        for k, v in header.items():
            (start, end), shape, dtype = v["data_offsets"], v["shape"], v["dtype"]
            ints = all(isinstance(i, int) and i >= 0 for i in (start, end, *shape))
            if dtype not in _DTYPES or not ints or not start <= end <= size - 8 - n or \
                    math.prod(shape) * _DTYPES[dtype].itemsize != end - start:
                raise ValueError(f"tensor {k!r}: dtype {dtype!r}, shape {shape}, bytes "
                                 f"{start}..{end} do not fit")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{path}: not a readable .safetensors file ({e})") from None
    return header, 8 + n


def check_tensors(path: Path, what: str) -> Path:
    """A .safetensors file of `what` (embeddings, LoRA) checked from its header alone: pickles
    refused, a missing or unreadable file named."""
    if path.suffix in PICKLED:
        raise LoadError(f"{path}: pickled {what} ({path.suffix}) can run arbitrary code when "
                        "loaded and are refused; convert it to .safetensors "
                        "(safetensors.torch.save_file) and load that")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    with open(path, "rb") as f:
        read_header(f, path)
    return path


def read_tensors(path: Path, what: str) -> tuple[dict, dict]:
    """A small .safetensors file's tensors and metadata (embeddings, LoRAs), checked as
    `check_tensors` checks it."""
    from safetensors import safe_open

    check_tensors(path, what)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors' own error type for a corrupt or non-safetensors file
        raise LoadError(f"{path}: not a readable .safetensors file ({e})") from None


def read_state_dict(files: list[Path], device="cpu", dtype=None) -> dict:
    """Every tensor of the files, read one at a time into its own memory and put in its final form
    there: floating point to `dtype` (when given), 4-D (convolution) weights channels-last. Peak
    memory is the loaded weights plus one tensor: no mapping of the file stays resident beside
    them and nothing is converted twice. Models read onto the CPU run there: the allocator is
    tuned for that first (kernels.cpu.retain_freed_memory)."""
    if torch.device(device).type == "cpu":
        cpu.retain_freed_memory()
    sd = {}
    for path in files:
        with open(path, "rb") as f:
            header, base = read_header(f, path)
            for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = v["data_offsets"]
                raw = torch.empty(end - start, dtype=torch.uint8)
                f.seek(base + start)
                if f.readinto(memoryview(raw.numpy())) != end - start:
                    raise LoadError(f"{path}: truncated: tensor {k!r} runs past the end of the "
                                    "file")
                t = raw.view(_DTYPES[v["dtype"]]).reshape(v["shape"])
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                if t.ndim == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                sd[k] = t.to(device)
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
    text_encoder: CLIPTextModel | None  # None: the SDXL refiner, which has text_encoder_2 only
    tokenizer: Tokenizer | None
    scheduler: SchedulerConfig
    low_res_scheduler: SchedulerConfig | None = None
    max_noise_level: int | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL
    tokenizer_2: Tokenizer | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt → zero embeddings


def _scheduler(folder: Path) -> SchedulerConfig:
    return SchedulerConfig.from_dict(read_json(folder / "scheduler_config.json"))


def _listed(index: dict, name: str) -> bool:
    """Whether model_index.json lists the component (the SDXL refiner writes [null, null] for the
    text encoder it does not have)."""
    v = index.get(name)
    return v is not None and not (isinstance(v, list) and v and v[0] is None)


def load_folder(path: Path, dtype=torch.float32, device="cpu", variant=None) -> Components:
    index = read_json(path / "model_index.json")
    texts = [n for n in ("text_encoder", "text_encoder_2")
             if _listed(index, n) and _listed(index, n.replace("text_encoder", "tokenizer"))]
    for name in ("unet", "vae", "scheduler"):
        if not _listed(index, name):
            raise LoadError(f"{path / 'model_index.json'} has no {name!r} component; "
                            "this engine needs unet, vae, scheduler and a text encoder")
    if not texts:
        raise LoadError(f"{path / 'model_index.json'} lists no text_encoder with its tokenizer; "
                        "this engine needs unet, vae, scheduler and a text encoder")
    models = {n: load_component(path / n, n, dtype, device, variant)
              for n in ("unet", "vae", *texts)}
    tokenizers = {t: Tokenizer.from_dir(path / t)
                  for t in (n.replace("text_encoder", "tokenizer") for n in texts)}
    low_res = _scheduler(path / "low_res_scheduler") if "low_res_scheduler" in index else None
    return Components(**{"text_encoder": None, "tokenizer": None, **models, **tokenizers},
                      scheduler=_scheduler(path / "scheduler"), low_res_scheduler=low_res,
                      max_noise_level=index.get("max_noise_level"),
                      # diffusers' SDXL pipelines default to True; the refiner's index says False
                      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                                  "text_encoder_2" in texts)))


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header alone."""
    with open(path, "rb") as f:
        return list(read_header(f, path)[0])


def load_single_file(path: Path, dtype=torch.float32, device="cpu", config: Path | None = None,
                     prediction_type: str | None = None, tokenizer: Path | None = None) -> Components:
    """A checkpoint in the original LDM key layout (SD 1.x, 2.x, their inpainting models, SDXL base
    and refiner, the x4 upscaler). Configs come from `config` (a diffusers folder; its weights are
    not needed) where it has them, else from the family's reference model with every size read
    from tensor shapes (engine.ldm). Single files carry no tokenizer: it is `config`'s, else CLIP's
    vocabulary from the `tokenizer` folder, the Hugging Face cache or open-clip-torch
    (engine.clip_vocab), padded as the family pads."""
    from . import clip_vocab, ldm

    config = Path(config) if config is not None else None
    given = {n: read_json(config / n / "config.json") for n in _CLASSES
             if config is not None and (config / n / "config.json").exists()}
    for n in ("scheduler", "low_res_scheduler"):
        if config is not None and (config / n / "scheduler_config.json").exists():
            given[n] = read_json(config / n / "scheduler_config.json")
    if config is not None and (config / "model_index.json").exists():
        index = read_json(config / "model_index.json")
        given.update({k: index[k] for k in ("max_noise_level", "force_zeros_for_empty_prompt")
                      if k in index})
    own = {n: config / t
           for n, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
           if config is not None and (config / t).is_dir()}
    try:  # the vocabulary, before the weights are read
        vocab = None if tokenizer is None else clip_vocab.find(tokenizer)
        parts = ldm.split_components(dict.fromkeys(_tensor_names(path)))
        towers = [n for n, has in (("text_encoder", parts["clip"] or parts["openclip"]),
                                   ("text_encoder_2", parts["openclip_2"])) if has]
        if vocab is None and any(n not in own for n in towers):
            vocab = clip_vocab.find()
    except FileNotFoundError as e:
        raise LoadError(f"{path}: {e}") from None
    sd = read_state_dict([path], device, dtype)
    try:
        configs = {**ldm.infer_configs(sd, prediction_type), **given}
        if prediction_type is not None:
            configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
        converted = ldm.convert(sd, configs)
    except KeyError as e:
        raise LoadError(f"{path}: {e.args[0] if e.args else e}") from None
    absent = [n for n in ("unet", "vae") if n not in converted] + ["text encoder"] * (not towers)
    if absent:
        raise LoadError(f"{path}: no {' / '.join(absent)} weights found (a checkpoint has "
                        "model.diffusion_model.*, first_stage_model.*, and cond_stage_model.* or "
                        "conditioner.embedders.*)")
    sd2 = (configs.get("text_encoder", {}).get("hidden_act") == "gelu"  # SD 2.x's OpenCLIP
           and "low_res_scheduler" not in configs and configs["unet"]["in_channels"] == 4)
    if sd2 and "scheduler" not in given and prediction_type is None:
        warnings.warn(f"{path.name}: an SD 2.x checkpoint, whose weights do not say whether it "
                      "predicts ε or v: assumed epsilon (the 512-px base models); for the 768-px "
                      "v models pass --prediction-type v_prediction (prediction_type= in Python)",
                      stacklevel=3)
    models = {n: build(n, configs[n], converted[n], f"{path} [{n}]")
              for n in _CLASSES if n in converted}
    tokenizers = {}
    for n in models:
        if n.startswith("text_encoder"):
            # OpenCLIP towers (SD 2.x, SDXL's second) pad with "!"
            pad = "!" if configs[n]["hidden_act"] == "gelu" else "<|endoftext|>"
            tokenizers[n.replace("text_encoder", "tokenizer")] = (
                Tokenizer.from_dir(own[n]) if n in own else clip_vocab.from_source(vocab, pad))
    low = configs.get("low_res_scheduler")
    zeros = bool(configs.get("force_zeros_for_empty_prompt"))
    return Components(**{"text_encoder": None, "tokenizer": None, **models, **tokenizers},
                      scheduler=SchedulerConfig.from_dict(configs["scheduler"]),
                      low_res_scheduler=None if low is None else SchedulerConfig.from_dict(low),
                      max_noise_level=configs.get("max_noise_level"),
                      force_zeros_for_empty_prompt=zeros)


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
