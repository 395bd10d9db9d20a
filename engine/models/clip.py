"""CLIP text transformer, and the vision transformer of full CLIP checkpoints (for CLIP scores).
Attribute names mirror the `text_model.*` / `vision_model.*` keys of transformers checkpoints, so a
`model.safetensors` loads with `load_state_dict(sd, strict=True, assign=True)` into a model built on
the meta device (see `canonical_keys` for the two text key layouts accepted)."""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import attention
from .blocks import Linear

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x)
    "gelu": F.gelu,  # OpenCLIP (SD 2.x)
}


def canonical_keys(module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook. transformers 4.x (the hub's SD text encoders) saved `text_model.*`
    keys, before 4.31 plus a `text_model.embeddings.position_ids` buffer; transformers 5 saves the
    same weights without the `text_model.` prefix. Drop the buffer (positions are computed in
    forward); add the prefix where missing (not to SDXL's top-level `text_projection`)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):].removeprefix("text_model.")
        if rest == "embeddings.position_ids":
            del state_dict[key]
        elif not key.startswith((prefix + "text_model.", prefix + "text_projection.")):
            state_dict[prefix + "text_model." + rest] = state_dict.pop(key)


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 2 marks legacy configs: pool at argmax(input_ids) instead of the first eos.
    eos_token_id: int = 49407
    projection_dim: int = 512  # CLIPTextModelWithProjection only

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers config.json (a CLIPTextConfig, or a CLIPConfig's text_config); other
        keys are ignored."""
        cfg = _tower_config(cls, d.get("text_config", d))
        if not isinstance(cfg.eos_token_id, int):
            raise ValueError(f"eos_token_id={cfg.eos_token_id!r} must be a single int")
        return cfg


def _tower_config(cls, d: dict):
    """A config dataclass from the keys of a transformers tower config (others ignored), with the
    shared checks."""
    cfg = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; "
                         f"use one of {sorted(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by "
                         f"num_attention_heads={cfg.num_attention_heads}")
    return cfg


class Attention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, is_causal=self.causal)
                             .transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = Attention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        n, max_n = inputs_embeds.shape[1], self.position_embedding.num_embeddings
        if n > max_n:
            raise ValueError(f"sequence of {n} tokens is longer than "
                             f"max_position_embeddings={max_n}")
        return inputs_embeds + self.position_embedding(torch.arange(n, device=inputs_embeds.device))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        # Bare containers only to reproduce the `text_model.encoder.layers.N` key prefixes.
        self.text_model = nn.Module()
        self.text_model.embeddings = Embeddings(cfg)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(EncoderLayer(cfg)
                                                       for _ in range(cfg.num_hidden_layers))
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_load_state_dict_pre_hook(canonical_keys)

    def forward(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
        skip_last_layers: int = 0
    ) -> torch.Tensor:
        """(B, N) token ids, or (B, N, D) token embeddings that replace their lookup -> (B, N, D)
        last_hidden_state.

        skip_last_layers=k stops k layers early, then applies final_layer_norm (diffusers'
        clip_skip=k)."""
        n = len(self.text_model.encoder.layers)
        if not 0 <= skip_last_layers < n:
            raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, {n})")
        hidden = self.hidden_states(input_ids, inputs_embeds, n - skip_last_layers)
        return self.text_model.final_layer_norm(hidden[-1])

    def hidden_states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      n_layers: int | None = None) -> list[torch.Tensor]:
        """transformers' `hidden_states`: the embeddings' output, then each layer's (of the first
        n_layers), without the final layer norm. SDXL conditions on the penultimate one."""
        tm = self.text_model
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = tm.embeddings.token_embedding(input_ids)
        out = [tm.embeddings(inputs_embeds)]
        for layer in tm.encoder.layers[:n_layers]:
            out.append(layer(out[-1]))
        return out

    def pooled(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) hidden state at each sequence's first eos token (transformers'
        `pooler_output`)."""
        ids = input_ids.to(device=last_hidden_state.device, dtype=torch.int)
        eos = self.config.eos_token_id
        pos = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
        return last_hidden_state[torch.arange(ids.shape[0], device=ids.device), pos]


class CLIPTextModelWithProjection(CLIPTextModel):
    """SDXL's second text encoder (OpenCLIP bigG): the pooled output projected by `text_projection`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__(cfg)
        self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def text_embeds(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim): transformers' `text_embeds`, from the final-normed last hidden state."""
        return self.text_projection(self.pooled(last_hidden_state, input_ids))


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """From a transformers CLIPVisionConfig, or a CLIPConfig's vision_config; other keys are
        ignored."""
        cfg = _tower_config(cls, d.get("vision_config", d))
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} is not a multiple of "
                             f"patch_size={cfg.patch_size}")
        return cfg


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = (self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
             .flatten(2).transpose(1, 2))
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        return x + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """ViT image tower: (B, 3, image_size, image_size) normalised pixels → (B, D) pooled output (the
    class token)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = nn.Module()
        self.vision_model.embeddings = VisionEmbeddings(cfg)
        # sic, as the keys
        self.vision_model.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(EncoderLayer(cfg, causal=False)
                                                         for _ in range(cfg.num_hidden_layers))
        self.vision_model.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x[:, 0])
