"""Tiled VAE encode/decode whose output equals the untiled one: overlapping tiles, GroupNorm
statistics shared across tiles.

An execution strategy applied to a plain AutoencoderKL (engine.models.vae), which knows nothing of
it. A runtime model calls `encode_latents(vae, x, ...)` / `decode_latents(vae, latents, ...)`: they
tile when the image has more pixels than the budget and no gradient is recorded, else run the VAE
as is. Budget and tile side come from explicit arguments, else ENGINE_VAE_TILE_PIXELS /
ENGINE_VAE_TILE, else the defaults below (`settings`). `encode` / `decode` always tile.

A layer whose input is kept whole and whose working set (WORKING whole outputs) fits BUFFER_BYTES
runs whole, as the plain VAE runs it; only the layers too large for that are tiled. Then the
latent grid is cut into tiles; each tile runs the unmodified blocks on a crop that adds a halo
wider than the receptive radius (real image borders keep their true zero padding), and keeps only
its core. GroupNorm is the one non-local op: a stretch of the network with K norms runs K + 1
passes over the tiles. Pass k normalises norms 0..k-1 with whole-image statistics already gathered,
gathers norm k's input statistics over the tile cores (combined in float64) and stops there; the
last pass writes the output.
A stretch ends at the mid block's attention and after any layer (a resnet, an up / down sampler)
whose whole output fits BUFFER_BYTES, which is kept as the next stretch's input: a resnet then
costs 3 passes, and only layers of very large images, whose outputs do not fit, are recomputed
more. The attention is global: it runs at latent resolution, queries in chunks against the keys
and values of the whole latent. Peak memory is two such kept outputs, a few latent-resolution
tensors and one tile's activations. Inference only: the tiled path runs under torch.no_grad.
"""
import itertools
import math
import os

import torch

from . import kernels
from .models.blocks import GROUP_NORM_HOOK, SpatialSelfAttention
from .models.vae import DownEncoderBlock2D, UpDecoderBlock2D

TILE_PIXELS = 1024 * 1024  # default budget: larger images are tiled (ENGINE_VAE_TILE_PIXELS)
TILE_IMAGE_PX = 512  # default tile side in image px: 512 // downscale latent px (ENGINE_VAE_TILE)
# the largest whole activation the tiled path keeps between stretches (an SD VAE decode to 1024²
# keeps the 512-wide ones, not the 256-wide at full size)
BUFFER_BYTES = 512 << 20
# a layer's working set, in whole outputs (input, normalised input, conv1's output, output): a
# layer whose input is kept and whose working set fits BUFFER_BYTES runs whole, untiled
WORKING = 4


def _read(name, raw, env, default, least):
    """raw, else the environment variable env, else default, as an integer >= least."""
    raw = os.environ.get(env, default) if raw is None else raw
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value < least or isinstance(raw, float) and raw != value:
        raise ValueError(f"VAE tiling: {name} (env {env}) = {raw!r}; need an integer >= {least}")
    return value


def _side(vae, tile=None) -> int:
    """Tile side in latent px: tile, else ENGINE_VAE_TILE, else 512 image px."""
    return _read("tile", tile, "ENGINE_VAE_TILE", max(1, TILE_IMAGE_PX // vae.downscale), 1)


def settings(vae, pixels: int | None = None, tile: int | None = None) -> tuple[int, int]:
    """(pixel budget, tile side in latent px). None: ENGINE_VAE_TILE_PIXELS / ENGINE_VAE_TILE, else
    the defaults (1024² pixels; 512 image px, i.e. 512 // vae.downscale latent px)."""
    return _read("pixels", pixels, "ENGINE_VAE_TILE_PIXELS", TILE_PIXELS, 0), _side(vae, tile)


def applies(vae, area: int, pixels: int | None = None, tile: int | None = None) -> bool:
    """Whether an image of `area` pixels (height × width) goes through the tiled path: more pixels
    than the budget and no gradient recorded. Validates both settings either way."""
    budget, _ = settings(vae, pixels, tile)
    return area > budget and not torch.is_grad_enabled()


def encode_moments(vae, x: torch.Tensor, pixels: int | None = None,
                   tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vae.encode(x) → (mean, logvar), tiled when `applies`; one image at a time, so that an
    image's latent does not depend on the batch it is in (a convolution's arithmetic can change
    with the batch size)."""
    if x.shape[0] > 1:
        mean, logvar = zip(*(encode_moments(vae, one, pixels, tile) for one in x.split(1)))
        return torch.cat(mean), torch.cat(logvar)
    kernels.cpu.release_freed_memory()
    if applies(vae, x.shape[-2] * x.shape[-1], pixels, tile):
        return vae.moments(encode(vae, x, _side(vae, tile)))
    return vae.encode(x)


def encode_latents(vae, x: torch.Tensor, sample: bool = False, generator=None,
                   pixels: int | None = None, tile: int | None = None) -> torch.Tensor:
    """vae.encode_latents(x, sample, generator), tiled when `applies`."""
    return vae.latents(*encode_moments(vae, x, pixels, tile), sample, generator)


def decode_latents(vae, latents: torch.Tensor, pixels: int | None = None,
                   tile: int | None = None) -> torch.Tensor:
    """vae.decode_latents(latents), tiled when `applies`; one image at a time, as
    `encode_moments`."""
    if latents.shape[0] > 1:
        return torch.cat([decode_latents(vae, one, pixels, tile) for one in latents.split(1)])
    kernels.cpu.release_freed_memory()
    z = vae.unscale(latents)
    if applies(vae, z.shape[-2] * z.shape[-1] * vae.downscale ** 2, pixels, tile):
        return decode(vae, z, _side(vae, tile))
    return vae.decode(z)


@torch.no_grad()
def decode(vae, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """vae.decode(z), tile by tile. tile: side in latent px; None: ENGINE_VAE_TILE, else the
    default."""
    d = vae.decoder
    ops = [m for m in (vae.post_quant_conv, d.conv_in) if m is not None]
    ops += [*_mid(d.mid_block), *d.up_blocks, lambda h: d.conv_norm_out(h, act="silu"), d.conv_out]
    return _run(ops, z, 1, _side(vae) if tile is None else tile)


@torch.no_grad()
def encode(vae, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """The encoder's output after quant_conv (mean and logvar stacked on channels; vae.moments
    splits them), tile by tile. tile: as in `decode`."""
    e = vae.encoder
    ops = [e.conv_in, *e.down_blocks, *_mid(e.mid_block), lambda h: e.conv_norm_out(h, act="silu"),
           e.conv_out]
    ops += [vae.quant_conv] if vae.quant_conv is not None else []
    return _run(ops, x, vae.downscale, _side(vae) if tile is None else tile)


def runs_whole(size: int) -> bool:
    """Whether a layer whose whole output takes `size` bytes runs whole, as untiled, when its input
    is whole: its working set (WORKING whole outputs) fits BUFFER_BYTES."""
    return WORKING * size <= BUFFER_BYTES


def _mid(block):
    return [block.resnets[0], *block.attentions, block.resnets[1]]


def _layers(ops):
    """The ops with each up / down block as the layers it runs one after another."""
    out = []
    for op in ops:
        if isinstance(op, (UpDecoderBlock2D, DownEncoderBlock2D)):
            out += [*op.resnets, *getattr(op, "upsamplers", ()), *getattr(op, "downsamplers", ())]
        else:
            out.append(op)
    return out


def _shapes(ops, x, fi, p=4):
    """(channels, px per latent px, whether a whole number of px per latent px) of each op's
    output, from a run on p × p latent px plus x's own px beyond whole latent px (an encoder input
    whose sides are not multiples of the factor)."""
    h = x.new_zeros(1, x.shape[1], p * fi + x.shape[2] % fi, p * fi + x.shape[3] % fi)
    out = []
    for op in ops:
        h = op(h)
        s = h.shape[-1] // p
        out.append((h.shape[1], s, h.shape[-2] == h.shape[-1] == p * s))
    return out


def _run(ops, x, fi, tile):
    """Layers whose working set fits BUFFER_BYTES run whole; the other local ops run tile by tile
    in stretches, global attention between them; a stretch also ends after a layer whose whole
    output fits in BUFFER_BYTES, so that each GroupNorm's statistics pass recomputes little. fi:
    input px per latent px."""
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"VAE tiling: tile={tile!r}; need an integer >= 1 (latent pixels)")
    ops = _layers(ops)
    latent_px = x.shape[0] * (x.shape[2] // fi) * (x.shape[3] // fi)
    stretch = []
    for op, (c, s, whole) in zip([*ops, None], [*_shapes(ops, x, fi), (0, 1, True)]):
        size = c * s * s * latent_px * x.element_size()
        if not stretch and op is not None and not isinstance(op, SpatialSelfAttention) and \
                whole and runs_whole(size):
            x, fi = op(x), s  # its input is whole and its working set fits: no tiles needed
            continue
        if op is not None and not isinstance(op, SpatialSelfAttention):
            stretch.append(op)
            if op is ops[-1] or not whole or size > BUFFER_BYTES:
                continue
        if stretch:
            x, stretch = _tiled(lambda h, fs=tuple(stretch): _chain(fs, h), x, fi, tile), []
        fi = s
        if isinstance(op, SpatialSelfAttention):
            x = _attention(op, x, tile)
    return x


def _chain(fs, h):
    for f in fs:
        h = f(h)
    return h


class _Stop(Exception):
    """Ends a statistics pass at the GroupNorm whose statistics it gathers."""


def _moments(x, groups):
    """[count, mean, M2] per (batch, group) in float64: each tile's own, from torch's var_mean;
    _finish combines tiles exactly (Chan et al.), so no sum of squares cancels."""
    r = x.unflatten(1, (groups, -1))
    var, mean = torch.var_mean(r, dim=(2, 3, 4), correction=0)
    n = r[0, 0].numel()
    return torch.stack([torch.full_like(mean, n, dtype=torch.float64), mean.double(),
                        var.double() * n])


def _finish(parts):
    """(mean, variance) per (batch, group) of the moments of several tiles."""
    n, mean, m2 = parts[0]
    for nb, mb, m2b in parts[1:]:
        total, d = n + nb, mb - mean
        mean, m2, n = mean + d * nb / total, m2 + m2b + d * d * n * nb / total, total
    return mean, m2 / n


def _norm(gn, x, mean, var, act):
    """GroupNorm of x with given per-(batch, group) mean and variance: one fused pass per image
    (a batch norm with the group's statistics for each of its channels)."""
    rep = x.shape[1] // gn.num_groups
    mean, var = (m.repeat_interleave(rep, 1).to(x.dtype) for m in (mean, var))
    ys = [torch.nn.functional.batch_norm(x[i:i + 1], mean[i], var[i], gn.weight, gn.bias, False, 0.0, gn.eps)
          for i in range(x.shape[0])]
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    return torch.nn.functional.silu(y, inplace=True) if act == "silu" else y


class _Sync:
    """GroupNorm hook for one crop: norms before `target` use the global statistics; norm `target`
    adds the moments of its input over the tile core to `acc` and stops the pass."""

    def __init__(self, stats, target, acc, core, rhos):
        self.stats, self.target, self.acc, self.core, self.rhos = stats, target, acc, core, rhos
        self.i = 0

    def __call__(self, gn, x, act):
        i, self.i = self.i, self.i + 1
        if i < len(self.stats):
            return _norm(gn, x, *self.stats[i], act)
        assert i == self.target, "GroupNorm calls changed order between passes"
        r = self.rhos[i]
        (y0, y1, ylast), (x0, x1, xlast) = self.core
        self.acc.append(_moments(x[:, :, y0 * r:None if ylast else y1 * r,
                                   x0 * r:None if xlast else x1 * r], gn.num_groups))
        raise _Stop


def _probe(fn, x, fi, p=4):
    """Run fn on a p × p latent-px input; per GroupNorm call: its resolution (px per latent px) and
    the receptive radius (latent px) of the convolutions before it; then the total radius and the
    output px per latent px."""
    rhos, radius, r = [], [], [0.0]

    def conv(m, args):
        if isinstance(m, torch.nn.Conv2d):  # spread of a k×k conv to either side, in input px
            k, pad = m.kernel_size[0], m.padding[0]
            r[0] += max(pad, k - 1 - pad) / (args[0].shape[-1] // p)

    def gn(m, y, act):  # only shapes matter here
        rhos.append(y.shape[-1] // p)
        radius.append(r[0])
        return y

    handle = torch.nn.modules.module.register_module_forward_pre_hook(conv)
    token = GROUP_NORM_HOOK.set(gn)
    try:
        out = fn(x.new_zeros(1, x.shape[1], p * fi, p * fi))
    finally:
        handle.remove()
        GROUP_NORM_HOOK.reset(token)
    return rhos, radius + r, out.shape[-1] // p


def _cuts(n, tile):
    k = -(-n // tile)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def _crop(a, b, n, halo, fi, size):
    """Input slice of the crop around core [a, b) of n latent px; the core in crop coordinates; is
    it the last."""
    lo, hi = max(a - halo, 0), min(b + halo, n)
    return slice(lo * fi, size if hi == n else hi * fi), (a - lo, b - lo, b == n)


def _tiled(fn, x, fi, tile):
    """fn(x) for fn made of local ops, tile by tile, its GroupNorms synchronised across tiles."""
    n = (x.shape[2] // fi, x.shape[3] // fi)
    tiles = list(itertools.product(_cuts(n[0], tile), _cuts(n[1], tile)))
    if len(tiles) == 1:
        return fn(x)
    rhos, radius, fo = _probe(fn, x, fi)
    stats, out = [], None
    for k in range(len(rhos) + 1):
        halo, acc = math.ceil(radius[k]) + 1, []
        for (ya, yb), (xa, xb) in tiles:
            ys, yc = _crop(ya, yb, n[0], halo, fi, x.shape[2])
            xcrop, xc = _crop(xa, xb, n[1], halo, fi, x.shape[3])
            token = GROUP_NORM_HOOK.set(_Sync(stats, k, acc, (yc, xc), rhos))
            try:
                y = fn(x[:, :, ys, xcrop])
            except _Stop:
                continue
            finally:
                GROUP_NORM_HOOK.reset(token)
            if out is None:
                out = y.new_empty(x.shape[0], y.shape[1], n[0] * fo, n[1] * fo)
            core = y[:, :, yc[0] * fo:yc[1] * fo, xc[0] * fo:xc[1] * fo]
            out[:, :, ya * fo:yb * fo, xa * fo:xb * fo] = core
        if k < len(rhos):
            stats.append(_finish(acc))
    return out


def _attention(attn, x, tile):
    """x + attn(x), written into x: queries in chunks of rows against keys and values of every
    pixel."""
    b, c, h, w = x.shape
    step = max(1, 4 * tile * tile // w)
    rows = [slice(i, min(i + step, h)) for i in range(0, h, step)]
    mean, var = _finish([_moments(x[:, :, r], attn.group_norm.num_groups) for r in rows])

    def tokens(r):
        t = _norm(attn.group_norm, x[:, :, r], mean, var, None)
        return t.permute(0, 2, 3, 1).reshape(b, 1, -1, c)

    k, v = x.new_empty(b, 1, h * w, c), x.new_empty(b, 1, h * w, c)
    for r in rows:
        t, span = tokens(r), slice(r.start * w, r.stop * w)
        k[:, :, span], v[:, :, span] = attn.to_k(t), attn.to_v(t)
    for r in rows:
        out = attn.to_out[0](kernels.attention(attn.to_q(tokens(r)), k, v)[:, 0])
        x[:, :, r] += out.reshape(b, -1, w, c).permute(0, 3, 1, 2)
    return x
