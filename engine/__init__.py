"""A small from-scratch Stable-Diffusion-family engine.

    import engine
    pipe = engine.load()                                    # the embedded model, weights/tiny
    pipe = engine.load("path/to/diffusers-folder")          # or a single-file LDM .safetensors
    image = pipe.generate("a red star", steps=30, seed=1)[0]
"""
from importlib import import_module

__all__ = ["load", "Model", "Pipeline", "LoadError"]
# imported on first use, so that `import engine` (and the CLI's --help) imports no torch
_LAZY = {"Model": "model", "Pipeline": "pipeline", "LoadError": "checkpoints"}
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path=None, dtype="float32", device="cpu", variant=None, config=None,
         prediction_type=None, tokenizer=None, embeddings=(), semi="zero", max_memory=None,
         loras=(), lora_dir=None, lora_strict=True):
    """Load a diffusers folder or a single-file `.safetensors` checkpoint (SD 1.x / 2.x, SDXL,
    their inpainting models, the x4 upscaler; family and configs read from its tensors) into a
    Pipeline. No path: the embedded model, weights/tiny (its ×4 upscaler is weights/tiny-x4).
    dtype: a torch dtype or its name (float32, float16, bfloat16). config: single files only, a
    diffusers folder whose configs and tokenizer to use instead. prediction_type: override the
    scheduler's (SD 2.x 768-v single files need "v_prediction"). tokenizer: single files only, a
    CLIP tokenizer folder (see engine.clip_vocab for where it is looked for when not given).
    embeddings: files of pseudo-words for its prompts (Pipeline.load_embeddings); semi: how
    <C(i)> drops the concept ("zero" / "remove"). max_memory: bytes (or a size such as "8G") the
    process may use in all; a job whose estimated peak exceeds it, or the memory the machine has
    free, is refused before it starts (engine.memory). loras: LoRA files merged into the weights,
    each a path or (path, scale) (Pipeline.load_lora); lora_dir: where a prompt's
    <lora:NAME:SCALE> finds NAME.safetensors; lora_strict: False skips, with a warning, the keys of
    a LoRA this model cannot take instead of refusing the file."""
    import torch

    from . import graphs
    from .embedded import DEFAULT_MODEL
    from .memory import parse_size
    from .checkpoints import load as load_model
    from .pipeline import Pipeline
    from .prompt import check_semi

    path = DEFAULT_MODEL if path is None else path
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use float32, float16 or bfloat16")
        dtype = getattr(torch, _DTYPES[dtype])
    check_semi(semi)
    graphs.policy()  # a bad ENGINE_COMPILE is refused before any loading
    max_memory = None if max_memory is None else parse_size(max_memory)
    pipe = Pipeline(load_model(path, dtype, device, variant, config, prediction_type, tokenizer), semi)
    if isinstance(embeddings, (str, bytes)) or hasattr(embeddings, "__fspath__"):
        embeddings = [embeddings]  # one path, not its characters
    pipe.load_embeddings(*(embeddings or ()))
    pipe.model.max_memory = max_memory
    pipe.model.lora_dir, pipe.model.lora_strict = lora_dir, bool(lora_strict)
    for item in loras or ():
        path, scale = (item, 1.0) if isinstance(item, (str, bytes)) or \
            hasattr(item, "__fspath__") else item
        pipe.load_lora(path, scale)
    return pipe
