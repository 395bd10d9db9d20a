"""Image metrics: MSE, PSNR, SSIM (optionally restricted to a mask), and CLIP scores (the embedded
tiny CLIP, or any transformers CLIPModel).

Images are (B, 3, H, W) in [-1, 1]; MSE/PSNR/SSIM are computed on the [0, 1] scale, per image. A
mask is (B or 1, 1, H, W) with 1 on the pixels that count (e.g. outside the edited object)."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .checkpoints import build, fill, load_component, read_json, read_state_dict, weight_files
from .models.clip import CLIPVisionConfig, CLIPVisionModel
from .prompt import plain
from .tokenizer import Tokenizer


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return v.flatten(1).mean(1)
    m = mask.to(v).expand(v.shape[0], 1, *v.shape[2:])
    total = (m.sum((1, 2, 3)) * v.shape[1]).clamp_min(1e-12)
    return (v * m).sum((1, 2, 3)) / total


def _unit(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError("metrics: need two (B, C, H, W) images of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return (a.double().clamp(-1, 1) + 1) / 2, (b.double().clamp(-1, 1) + 1) / 2


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale."""
    a, b = _unit(a, b)
    return _masked_mean((a - b).square(), mask).float()


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale: 10·log10(1 / MSE)."""
    return 10 * torch.log10(1 / mse(a, b, mask).clamp_min(1e-12))


def _gaussian(sigma: float, dtype) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter's radius at truncate=3.5, as skimage uses it
    r = int(3.5 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=dtype)
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, eq. 13) with a Gaussian window, averaged over channels and
    over the pixels whose window lies inside the image (scikit-image's structural_similarity with
    gaussian_weights=True, use_sample_covariance=False, data_range=1)."""
    a, b = _unit(a, b)
    g = _gaussian(sigma, a.dtype)
    r, c = len(g) // 2, a.shape[1]
    if min(a.shape[2:]) <= 2 * r:
        raise ValueError(f"ssim: images of {tuple(a.shape[2:])} are smaller than the "
                         f"{2 * r + 1}-pixel window")
    kh, kw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    blur = lambda x: F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _masked_mean(s, None if mask is None else mask[..., r:-r, r:-r]).float()


class ImageEncoder(nn.Module):
    """A small CNN: (B, 3, 64, 64) in [-1, 1] → (B, dim). Other sizes are area-resized to 64² first.

    The head sees the final 4×4 map both flattened (where things are) and averaged (what they
    are)."""

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


class CLIPImageTower(nn.Module):
    """The image side of a transformers CLIPModel: CLIP's preprocessing (centre square crop, bicubic
    resize to image_size, CLIP mean / std) on tensors in [-1, 1], the ViT, and visual_projection."""
    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, cfg: CLIPVisionConfig, dim: int):
        super().__init__()
        self.vision = CLIPVisionModel(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s, size = min(h, w), self.vision.config.image_size
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if s != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                              align_corners=False)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                     for v in (self.MEAN, self.STD))
        return self.visual_projection(self.vision(((x.clamp(-1, 1) + 1) / 2 - mean) / std))


class Scorer(nn.Module):
    """CLIP score: cosine similarity of projected image and pooled text embeddings. The embedded
    model's tiny CLIP (a small CNN image tower), or any transformers CLIPModel checkpoint (ViT image
    tower)."""

    def __init__(self, text_encoder, tokenizer: Tokenizer, dim: int,
                 visual: nn.Module | None = None):
        super().__init__()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        width = text_encoder.config.hidden_size
        self.visual = ImageEncoder(dim) if visual is None else visual
        self.text_projection = nn.Linear(width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP starts

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Scorer":
        """An engine model folder with clip_scorer/ (the embedded model), or a transformers
        CLIPModel folder (config.json with a vision_config, model.safetensors, the tokenizer
        files)."""
        folder = Path(folder)
        config = folder / "config.json"
        if config.is_file() and "vision_config" in read_json(config):
            return cls._from_clip(folder)
        if not (folder / "clip_scorer" / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder}: no CLIP image tower: need clip_scorer/ "
                                    "(the embedded model weights/tiny) or a transformers CLIPModel "
                                    "folder (config.json with vision_config)")
        cfg = json.loads((folder / "clip_scorer" / "config.json").read_text())
        text = load_component(folder / "text_encoder", "text_encoder")
        s = cls(text, Tokenizer.from_dir(folder / "tokenizer"), cfg["projection_dim"])
        missing = s.load_state_dict(load_file(folder / "clip_scorer" / "model.safetensors"),
                                    strict=False).missing_keys
        if any(not k.startswith("text_encoder.") for k in missing):
            raise ValueError(f"{folder}/clip_scorer: missing keys {missing}")
        return s.eval().requires_grad_(False)

    @classmethod
    def _from_clip(cls, folder: Path) -> "Scorer":
        cfg = read_json(folder / "config.json")
        sd = read_state_dict(weight_files(folder))
        part = lambda prefix, to="": {to + k[len(prefix):]: v  # noqa: E731
                                      for k, v in sd.items() if k.startswith(prefix)}
        text = build("text_encoder", cfg, part("text_model.", "text_model."), str(folder))
        dim = cfg.get("projection_dim", 512)
        with torch.device("meta"):
            tower = CLIPImageTower(CLIPVisionConfig.from_dict(cfg), dim)
        fill(tower, {**part("vision_model.", "vision.vision_model."),
                     **part("visual_projection.", "visual_projection.")}, str(folder))
        s = cls(text, Tokenizer.from_dir(folder), dim, visual=tower)
        fill(s.text_projection, part("text_projection."), str(folder))
        s.logit_scale.data = sd.get("logit_scale", s.logit_scale.data).reshape(())
        return s.eval().requires_grad_(False)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(ids)
        return F.normalize(self.text_projection(self.text_encoder.pooled(h, ids)), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)

    def texts(self, texts: list[str]) -> torch.Tensor:
        """Texts → unit embeddings; prompts are read for their words (prompt.plain)."""
        ids = self.tokenizer([plain(t) for t in texts])
        return self.encode_text(ids[:, : int((ids != self.tokenizer.pad_id).sum(1).max()) + 1])

    @torch.no_grad()
    def classify(self, images: torch.Tensor, candidates: list[list[str]]) -> torch.Tensor:
        """For each image, the index of the best-matching caption among its candidates (same count
        each)."""
        img = self.encode_image(images)
        k = len(candidates[0])
        txt = self.texts([c for cs in candidates for c in cs]).view(len(candidates), k, -1)
        return torch.einsum("bd,bkd->bk", img, txt).argmax(1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-pair cosine similarity × 100 (the usual CLIP-score scale)."""
        return 100 * (self.encode_image(images) * self.texts(texts)).sum(-1)
