"""Image metrics: PSNR, and the tiny CLIP score (our text tower + a small image tower trained on the world)."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .load import load_component
from .tokenizer import Tokenizer


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


class ImageEncoder(nn.Module):
    """A small CNN: (B, 3, 64, 64) in [-1, 1] → (B, dim). Other sizes are area-resized to 64² first.

    The head sees the final 4×4 map both flattened (where things are) and averaged (what they are)."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width]
        strides = [2, 1, 2, 1, 2, 1, 2]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=s, padding=1)
                                   for a, b, s in zip(chans, chans[1:], strides))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in chans[1:])
        self.proj = nn.Linear(chans[-1] * 17, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (64, 64):
            x = F.interpolate(x, size=(64, 64), mode="area")
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return self.proj(torch.cat([x.flatten(1), x.mean((2, 3))], 1))


class Scorer(nn.Module):
    """CLIP score of the embedded model: cosine similarity of projected image and pooled text embeddings."""

    def __init__(self, text_encoder, tokenizer: Tokenizer, dim: int, visual: nn.Module | None = None):
        super().__init__()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        width = text_encoder.config.hidden_size
        self.visual = ImageEncoder(dim) if visual is None else visual
        self.text_projection = nn.Linear(width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP starts

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Scorer":
        """A model folder with text_encoder/, tokenizer/ and clip_scorer/ (config.json + model.safetensors)."""
        folder = Path(folder)
        if not (folder / "clip_scorer" / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder}/clip_scorer/model.safetensors not found: only the embedded model "
                                    "(weights/tiny) ships a CLIP scorer")
        cfg = json.loads((folder / "clip_scorer" / "config.json").read_text())
        text = load_component(folder / "text_encoder", "text_encoder")
        s = cls(text, Tokenizer.from_dir(folder / "tokenizer"), cfg["projection_dim"])
        missing = s.load_state_dict(load_file(folder / "clip_scorer" / "model.safetensors"), strict=False).missing_keys
        if any(not k.startswith("text_encoder.") for k in missing):
            raise ValueError(f"{folder}/clip_scorer: missing keys {missing}")
        return s.eval().requires_grad_(False)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(ids)
        return F.normalize(self.text_projection(self.text_encoder.pooled(h, ids)), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)

    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)
        return self.encode_text(ids[:, : int((ids != self.tokenizer.pad_id).sum(1).max()) + 1])

    @torch.no_grad()
    def classify(self, images: torch.Tensor, candidates: list[list[str]]) -> torch.Tensor:
        """For each image, the index of the best-matching caption among its candidates (same count each)."""
        img = self.encode_image(images)
        k = len(candidates[0])
        txt = self.texts([c for cs in candidates for c in cs]).view(len(candidates), k, -1)
        return torch.einsum("bd,bkd->bk", img, txt).argmax(1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-pair cosine similarity × 100 (the usual CLIP-score scale)."""
        return 100 * (self.encode_image(images) * self.texts(texts)).sum(-1)
