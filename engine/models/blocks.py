"""Building blocks shared by the UNet and the VAE. Attribute names mirror diffusers' state-dict
keys."""
import math
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


# When set, GroupNorm.forward(x, act) returns GROUP_NORM_HOOK(module, x, act): engine.tiled_vae uses
# it to normalise every tile with statistics of the whole image.
GROUP_NORM_HOOK: ContextVar = ContextVar("GROUP_NORM_HOOK", default=None)
# When set, Attention.forward returns ATTENTION_HOOK(module, q, k, v, out, is_cross), given its own
# result `out` (B, heads, N, D): engine.p2p uses it to edit attention maps.
ATTENTION_HOOK: ContextVar = ContextVar("ATTENTION_HOOK", default=None)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm routed through the kernel dispatch point, with an optional fused SiLU."""

    def forward(self, x, act=None):
        hook = None if torch.compiler.is_compiling() else GROUP_NORM_HOOK.get()
        if hook is not None:
            return hook(self, x, act)
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act)


class Conv2d(nn.Conv2d):
    def forward(self, x, residual=None):
        return kernels.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], residual)


class Linear(nn.Linear):
    def forward(self, x, residual=None):
        return kernels.linear(x, self.weight, self.bias, residual)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos=True, shift=0.0,
                       max_period=10000):
    """Sinusoidal embedding of (fractional) timesteps, DDPM style."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def by_row(f, x: torch.Tensor) -> torch.Tensor:
    """f(x) one row at a time when inferring. A matmul's row can come out differently with another
    number of rows beside it; an image's result must not depend on what else shares its batch.
    Training (a graph being built) takes the batched matmul: per-row calls cost it a tenth of a step."""
    if x.shape[0] == 1 or torch.is_grad_enabled():
        return f(x)
    return torch.cat([f(row) for row in x.split(1)])


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=1e-6, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x, act="silu"))
        if self.time_emb_proj is not None:
            h = h + by_row(self.time_emb_proj, F.silu(temb))[:, :, None, None]
        x = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = self.conv2(self.norm2(h, act="silu"), residual=x)
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            size = (x.shape[2] * 2, x.shape[3] * 2)
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention over token sequences (B, N, C); cross-attention when `context` is
    given."""

    def __init__(self, query_dim, heads, dim_head, context_dim=None, bias=False, upcast=False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x, context=None, residual=None):
        is_cross, context = context is not None, x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in
                   (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = kernels.attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = kernels.attention(q, k, v)
        hook = None if torch.compiler.is_compiling() else ATTENTION_HOOK.get()
        if hook is not None:
            out = hook(self, q, k, v, out, is_cross)
        return self.to_out[0](out.transpose(1, 2).flatten(2), residual)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        """h · GELU(gate), the proj's two halves as two matmuls: GELU goes into the gate's
        epilogue, the product into h's."""
        w, b, inner = self.proj.weight, self.proj.bias, self.proj.out_features // 2
        gate = kernels.linear(x, w[inner:], b[inner:], act="gelu")
        return kernels.linear(x, w[:inner], b[:inner], mul=gate)


# values of a feed-forward hidden layer computed at once on the CPU: 16 MiB in fp32
FF_BLOCK = 2**22


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0),
                                  Linear(dim * mult, dim)])

    def forward(self, x, residual=None):
        """On the CPU in blocks of tokens whose hidden layer stays under FF_BLOCK values: the heap
        keeps blocks that size, where a larger one is mapped afresh at every call (the SD UNet's
        64² level: (2, 4096, 1280), 42 MB in fp32, 10k page faults a call)."""
        n = max(1, FF_BLOCK // (x.shape[0] * self.net[2].in_features))
        if x.device.type != "cpu" or x.shape[1] <= n or torch.compiler.is_compiling():
            return self.net[2](self.net[0](x), residual)
        return torch.cat([self.net[2](self.net[0](x[:, i:i + n]),
                                      None if residual is None else residual[:, i:i + n])
                          for i in range(0, x.shape[1], n)], 1)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim, only_cross_attention=False, upcast=False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, context_dim if only_cross_attention else None,
                               upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """GroupNorm → proj_in → transformer blocks → proj_out, with a residual around it all."""

    def __init__(self, heads, dim_head, in_ch, context_dim, num_layers=1, groups=32,
                 use_linear_projection=False, only_cross_attention=False, upcast=False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, in_ch, 1e-6)
        self.proj_in = Linear(in_ch, inner) if use_linear_projection else Conv2d(in_ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, only_cross_attention, upcast)
            for _ in range(num_layers))
        self.proj_out = (Linear(inner, in_ch) if use_linear_projection
                         else Conv2d(inner, in_ch, 1))

    def forward(self, x, context):
        b, _, h, w = x.shape
        res = x
        x = self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return x + res


class SpatialSelfAttention(nn.Module):
    """The VAE's single-head attention over all pixels (diffusers Attention with group_norm,
    residual)."""

    def __init__(self, ch, groups=32, eps=1e-6):
        super().__init__()
        self.group_norm = GroupNorm(groups, ch, eps)
        self.to_q = Linear(ch, ch)
        self.to_k = Linear(ch, ch)
        self.to_v = Linear(ch, ch)
        self.to_out = nn.ModuleList([Linear(ch, ch), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        out = kernels.attention(self.to_q(t), self.to_k(t), self.to_v(t))
        out = self.to_out[0](out[:, 0])
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2) + x
