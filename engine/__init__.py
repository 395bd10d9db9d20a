"""A small from-scratch Stable-Diffusion-family engine.

    import engine
    pipe = engine.load()                                    # the embedded model, weights/tiny
    pipe = engine.load("path/to/diffusers-folder")          # or a single-file LDM .safetensors
    image = pipe.generate("a red star", steps=30, seed=1)[0]
"""
import torch

from .load import LoadError
from .model import Model
from .pipeline import Pipeline

__all__ = ["load", "Model", "Pipeline", "LoadError"]


def load(path=None, dtype=torch.float32, device="cpu", variant=None, config=None,
         prediction_type=None, embeddings=(), semi="zero") -> Pipeline:
    """Load a diffusers folder or a single-file SD 1.x/2.x `.safetensors` checkpoint into a
    Pipeline. No path: the embedded model, weights/tiny (its ×4 upscaler is weights/tiny-x4).
    embeddings: files of pseudo-words for its prompts (Pipeline.load_embeddings); semi: how <C(i)>
    drops the concept ("zero" / "remove")."""
    from .load import DEFAULT_MODEL, load as _load

    path = DEFAULT_MODEL if path is None else path
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16}.get(dtype, dtype)
        if isinstance(dtype, str):
            raise ValueError(f"dtype={dtype!r}: use float32, float16 or bfloat16")
    from .prompt import check_semi

    check_semi(semi)
    pipe = Pipeline(_load(path, dtype, device, variant, config, prediction_type), semi)
    if isinstance(embeddings, (str, bytes)) or hasattr(embeddings, "__fspath__"):
        embeddings = [embeddings]  # one path, not its characters
    pipe.load_embeddings(*(embeddings or ()))
    return pipe
