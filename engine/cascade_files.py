"""The cascade inversion's file records: each SR stage's solved z_T + noise and the whole inversion,
saved to and loaded from one .safetensors file (engine.iterinv)."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import images
from .invert import Trajectory


@dataclass
class SRInversion:
    """One inverted SR stage: the solved top latent and the noise n of its conditioning
    ĉ = q(c, level, n)."""
    z_T: torch.Tensor
    noise: torch.Tensor
    errors: list[torch.Tensor] | None = None
    evals: int = 0
    seconds: float = 0.0


@dataclass
class CascadeInversion:
    """What the cascade inversion of one batch of images keeps: stage 1's trajectory (with null-text
    embeddings when made) and each SR stage's z_T + noise; `images` are the reconstructions, one per
    stage (64², 256², …)."""
    prompt: list[str]
    method: str
    stage1: str
    steps: int
    noise_level: int
    seed: int
    stage1_traj: Trajectory
    stages: list[SRInversion]
    images: list[torch.Tensor]

    def save(self, path):
        """One .safetensors file, written whole: stage1.* (the trajectory) and
        sr{k}.z_T / sr{k}.noise."""
        tr = self.stage1_traj
        t = {"stage1.latents": torch.stack(tr.latents),
             "stage1.timesteps": torch.tensor(tr.timesteps)}
        if tr.uncond is not None:
            t["stage1.uncond"] = torch.stack(tr.uncond)
        for k, st in enumerate(self.stages):
            t[f"sr{k}.z_T"], t[f"sr{k}.noise"] = st.z_T, st.noise
        meta = {"prompt": json.dumps(self.prompt), "method": self.method, "stage1": self.stage1,
                "steps": str(self.steps), "noise_level": str(self.noise_level),
                "seed": str(self.seed), "sizes": json.dumps([im.shape[-1] for im in self.images])}
        return images.save_tensors(t, path, meta)

    @staticmethod
    def load_stages(path) -> tuple[dict, list[SRInversion]]:
        """(metadata, SR stages) of a file written by `save`: what an edit needs."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such inversion file "
                                    "(write one with `python -m engine iterinv`)")
        with images.open_tensors(path) as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            if "sr0.z_T" not in keys or "method" not in meta:
                raise ValueError(f"{path}: not a cascade inversion file "
                                 "(needs sr0.z_T; made by `engine iterinv`)")
            stages = [SRInversion(f.get_tensor(f"sr{k}.z_T"), f.get_tensor(f"sr{k}.noise"))
                      for k in range(len(keys)) if f"sr{k}.z_T" in keys]
        meta = {k: json.loads(v) if k in ("prompt", "sizes") else v for k, v in meta.items()}
        return meta, stages
