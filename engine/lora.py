"""LoRA files merged into a model's weights.

Formats: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*` / `lora_te2_*`; UNet
names in diffusers' or the original LDM layout; `alpha`; LoCon convolutions) and diffusers / PEFT
(`unet.*`, `text_encoder.*`, `text_encoder_2.*` with `lora_A` / `lora_B`, alphas from the file's
`lora_adapter_metadata`; the older `lora.down` / `*_lora.down` names). Each layer gets

    W ← W + scale · α/r · up @ down

(α = r when the file gives none), merged at load so that sampling costs nothing more. The weights a
LoRA touches are kept as they were, so that unloading restores them bit for bit.
"""
import glob
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import LoadError, read_tensors
from .ldm_keys import unet_key_pairs

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
          "lora_te2_": "text_encoder_2"}
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down",
          "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "down.weight": "down", "up.weight": "up", "lora_B.bias": "bias", "alpha": "alpha"}
_PART = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(map(re.escape, _PARTS)) + ")$")
_OTHER = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
          "lora_mid": "LoCon's Tucker (lora_mid)"}
_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora$")  # diffusers' first LoRA layout


class LoraError(LoadError):
    """A LoRA file that cannot be merged into this model; the message names the keys and the fix."""


@dataclass
class Layer:
    """One layer's update, W += α/r · up @ down (+ bias on the layer's bias)."""
    component: str
    module: str          # the engine module's name in `component`
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None  # None: α = r
    bias: torch.Tensor | None = None

    def delta(self, shape: torch.Size) -> torch.Tensor:
        up, down = self.up.float(), self.down.float()
        rank = down.shape[0]
        d = up.flatten(1) @ down.flatten(1)
        if down.ndim == 4 and down.shape[2:] != (1, 1):  # LoCon: a k×k down, a 1×1 up
            d = d.reshape(up.shape[0], *down.shape[1:])
        return d.reshape(shape) * ((self.alpha if self.alpha is not None else rank) / rank)


@dataclass
class Lora:
    """A parsed LoRA file: its layers, merged at `scale` (named in a prompt: `from_prompt`)."""
    name: str
    layers: list[Layer]
    scale: float = 1.0
    from_prompt: bool = False


def _targets(model) -> dict[str, dict[str, str]]:
    """component -> {name as a file may write it: the engine module's name}, over the Linear and
    Conv2d layers: dotted, underscored (kohya), the LDM names of UNet layers (kohya's SDXL), and
    text-encoder names with or without `text_model.`."""
    out = {}
    for comp in COMPONENTS:
        net = getattr(model, comp, None)
        if net is None:
            continue
        names = {}
        mods = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                   torch.nn.Conv2d))]
        for n in mods:
            for alias in (n, n.removeprefix("text_model.")):
                names[alias] = names[alias.replace(".", "_")] = n
        if comp == "unet":
            try:
                pairs = list(unet_key_pairs(asdict(net.config)))
            except ValueError:  # per-block layer counts: no LDM layout
                pairs = []
            for ldm, ours in pairs:
                if ldm.endswith(".weight") and ours[:-7] in names:
                    names[ldm[:-7]] = names[ldm[:-7].replace(".", "_")] = ours[:-7]
        out[comp] = names
    return out


def _split(key: str) -> tuple[str | None, str, str] | None:
    """A key → (component, module as written, part), None when it is not a LoRA tensor's."""
    m = _PART.match(key)
    if m is None:
        return None
    module, part = m["module"], _PARTS[m["part"]]
    for prefix, comp in _KOHYA.items():
        if module.startswith(prefix):
            return comp, module[len(prefix):], part
    head, _, rest = module.partition(".")
    if head in COMPONENTS and rest:
        rest = _PROCESSOR.sub(lambda p: "." + p[1] + (".0" if p[1] == "to_out" else ""), rest)
        return head, rest.removesuffix(".lora"), part
    return None


def _peft_alpha(meta: dict, comp: str, module: str) -> float | None:
    """α of a module from diffusers' lora_adapter_metadata (PEFT's LoraConfig per component)."""
    cfg = {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error:  # not a regular expression: a module name as written
            hit = module.endswith(pattern)
        if hit:
            return float(alpha)
    return None if cfg.get("lora_alpha") is None else float(cfg["lora_alpha"])


def parse(path, model, strict: bool = True) -> tuple[list[Layer], list[str]]:
    """The layers of a LoRA file for `model` (a runtime Model), and the keys it skipped (only when
    not strict: else those are a LoraError naming them)."""
    path = Path(path)
    sd, meta = read_tensors(path, "LoRA")
    raw = meta.get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        meta = {}
    targets = _targets(model)
    groups, bad = {}, []
    for key in sd:
        other = next((kind for mark, kind in _OTHER.items() if mark in key), None)
        split = _split(key) if other is None else None
        if split is None:
            bad.append(f"{key} ({other})" if other else key)
            continue
        comp, module, part = split
        groups.setdefault((comp, module), {})[part] = (key, sd[key])
    layers = []
    for (comp, module), parts in groups.items():
        keys = ", ".join(k for k, _ in parts.values())
        name = targets.get(comp, {}).get(module)
        if name is None or "up" not in parts or "down" not in parts:
            why = (f"this model has no {comp}" if comp not in targets else
                   "no such layer in the model" if name is None else "an up without a down")
            bad.append(f"{keys} ({why})")
            continue
        layer = getattr(model, comp).get_submodule(name)
        up, down = parts["up"][1], parts["down"][1]
        alpha = parts["alpha"][1].item() if "alpha" in parts else _peft_alpha(meta, comp, module)
        if up.shape[1] != down.shape[0] or up.shape[0] * math.prod(down.shape[1:]) != \
                layer.weight.numel():
            bad.append(f"{keys} (up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit "
                       f"the layer's {tuple(layer.weight.shape)})")
            continue
        bias = parts.get("bias", (None, None))[1]
        layers.append(Layer(comp, name, up, down, alpha, bias))
    if bad and strict:
        raise LoraError(f"{path}: {len(bad)} key(s) this engine cannot merge into this model: "
                        f"{'; '.join(bad[:4])}{' …' if len(bad) > 4 else ''} (a LoRA for another "
                        "model family, or an unsupported kind; --lora-strict off skips them)")
    if not layers:
        raise LoraError(f"{path}: no LoRA layer of this model found (expected lora_unet_* / "
                        "lora_te_* keys, or unet.* / text_encoder.* with lora_A / lora_B)")
    return layers, bad


class Merger:
    """The LoRAs merged into a model, in order, and the weights they replaced."""

    def __init__(self, model):
        self.model = model
        self.loaded: list[Lora] = []
        self.originals: dict[tuple[str, str], torch.Tensor] = {}

    def _param(self, comp: str, name: str) -> torch.Tensor:
        return getattr(self.model, comp).get_parameter(name)

    @torch.no_grad()
    def _merge(self, lora: Lora):
        for layer in lora.layers:
            updates = {"weight": layer.delta}
            if layer.bias is not None:
                updates["bias"] = lambda shape, b=layer.bias: b.float().reshape(shape)
            for suffix, delta in updates.items():
                key = (layer.component, f"{layer.module}.{suffix}")
                w = self._param(*key)
                self.originals.setdefault(key, w.detach().clone())
                w.copy_(w.float().add_(delta(w.shape).to(w.device), alpha=lora.scale))

    def add(self, lora: Lora):
        self.loaded.append(lora)
        self._merge(lora)

    @torch.no_grad()
    def remove(self, which) -> list[str]:
        """Undo the LoRAs for which `which(lora)` is true: the weights go back to their originals,
        and the others are merged again. Returns the names undone."""
        gone = [x.name for x in self.loaded if which(x)]
        if not gone:
            return []
        for key, w in self.originals.items():
            self._param(*key).copy_(w)
        self.originals.clear()
        kept, self.loaded = [x for x in self.loaded if not which(x)], []
        for x in kept:
            self.add(x)
        return gone


def find(folder, name: str) -> Path:
    """NAME.safetensors in `folder` or below (a prompt's <lora:NAME:SCALE>)."""
    if folder is None:
        raise LoraError(f"<lora:{name}:…> in a prompt needs a LoRA folder to find {name} in: "
                        "pass --lora-dir DIR (lora_dir= in engine.load)")
    if not Path(folder).is_dir():
        raise LoraError(f"--lora-dir {folder}: no such folder")
    hits = sorted(Path(folder).rglob(glob.escape(name) + ".safetensors"))
    if len(hits) != 1:
        raise LoraError(f"<lora:{name}:…>: {len(hits) or 'no'} files named {name}.safetensors "
                        f"in {folder}{': ' + ', '.join(map(str, hits[:3])) if hits else ''}; "
                        "need exactly one")
    return hits[0]
