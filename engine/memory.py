"""Peak memory of a job, estimated from the model's configs before the job's work starts, against
the memory the machine has free (and the user's `max_memory` cap).

The estimates are activation counts per pixel, fitted to peak resident memory measured on the
embedded model and on SD 1.5 / 2.x-shaped models (bench/results/memory.json: with OVERHEAD, they
stay above the measurement): a UNet call keeps its skip connections plus the largest block's
temporaries (a transformer's feed-forward, ~30 channels' worth), or every block's activations when
a gradient is taken; a VAE decode keeps ~8 of its widest full-resolution channels per pixel.
"""
import re

import torch

from . import tiled_vae

OVERHEAD = 128 * 2**20  # allocator slack and kernel workspaces, beyond the activations
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class OutOfMemory(ValueError):
    """A job that cannot fit in the memory there is; the message names a size that fits."""


def parse_size(v) -> int:
    """Bytes from an int or a string such as 8G, 512M, 8GB, 8GiB, 1.5g."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(v), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"max_memory={v!r}: need a size such as 8G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _per_level(v, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_bytes(cfg, height: int, width: int, batch: int, itemsize: int,
               grad: bool = False) -> int:
    """Peak activation bytes of one UNet call on a (batch, C, height, width) latent."""
    n = len(cfg.block_out_channels)
    layers = _per_level(cfg.layers_per_block, n)
    depth = _per_level(cfg.transformer_layers_per_block, n)
    kept, largest = 0.0, 0.0
    for level, (c, block) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
        px = c * height * width / 4 ** level
        attention = depth[level] if block.startswith("CrossAttn") else 0
        if grad:  # every block of the level, down (layers) and up (layers + 1), is kept
            kept += px * (2 * layers[level] + 1) * (8 + 40 * attention)
        else:
            kept += px * (layers[level] + 1)
            largest = max(largest, px * (30 if attention else 8))
    return int(batch * itemsize * (kept + largest))


def vae_bytes(cfg, height: int, width: int, batch: int, itemsize: int,
              tile: int | None = None) -> int:
    """Peak bytes of a VAE decode (or encode) of `batch` images of height × width pixels; `tile`:
    the tile side in pixels when it runs tiled (engine.tiled_vae). Tiled, the full-resolution
    layers still run whole, as untiled, where tiled_vae.runs_whole; else 2 tiles' area for a
    tile's crop and the allocator's slack over the passes (measured), plus the input and output a
    stretch of tiles keeps whole (each at most BUFFER_BYTES). Then the latent-resolution tensors of
    the mid block's attention and the output."""
    area, kept = height * width, 0
    full = cfg.block_out_channels[0] * area * itemsize
    if tile is not None and not tiled_vae.runs_whole(full):
        area, kept = min(area, 2 * tile * tile), 2 * min(full, tiled_vae.BUFFER_BYTES)
    downscale = 2 ** (len(cfg.block_out_channels) - 1)
    latent = 3 * cfg.block_out_channels[-1] * height * width / downscale ** 2
    return int(batch * (itemsize * (8 * cfg.block_out_channels[0] * area + latent)
                        + 64 * height * width + kept))


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/self/status" if key.startswith("Vm") else "/proc/meminfo") as f:
            found = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _cgroup() -> int | None:
    """What the cgroup (v2) still lets this process allocate."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available(device, max_memory: int | None = None) -> int:
    """Bytes a job on `device` may still allocate: the device's free memory, the cgroup's and the
    address-space limit's room, and what `max_memory` leaves (a cap on the process's resident
    memory; on CUDA, on torch's allocations on the device). Where none of these can be read
    (no /proc), only max_memory limits."""
    device = torch.device(device)
    if device.type == "cuda":  # free on the device, plus what torch holds cached but unused
        used = torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - used
    else:
        used = _meminfo("VmRSS") or 0
        room = [_meminfo("MemAvailable"), _cgroup()]
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_AS)
            if soft != resource.RLIM_INFINITY:
                room.append(soft - (_meminfo("VmSize") or 0))
        except (ImportError, ValueError):
            pass
        free = min([r for r in room if r is not None], default=None)
    if max_memory is not None:
        free = max_memory - used if free is None else min(free, max_memory - used)
    return 2**62 if free is None else max(free, 0)  # nothing known: no limit but max_memory


def check(job: str, need, height: int, width: int, budget: int, multiple: int, fix: str):
    """Raise OutOfMemory when need(height, width) bytes > budget, naming the largest size of the
    same aspect (sides multiples of `multiple`) that fits, and `fix`."""
    if need(height, width) <= budget:
        return

    def scaled(k):  # both sides × k / 1024
        return tuple(s * k // 1024 // multiple * multiple for s in (height, width))

    lo, hi = 0, 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        h, w = scaled(mid)
        lo, hi = (mid, hi) if not (h and w) or need(h, w) <= budget else (lo, mid - 1)
    h, w = scaled(lo)
    fits = f"{h}×{w} fits" if h and w else "no size fits"
    raise OutOfMemory(f"{job} at {height}×{width} needs about {gb(need(height, width))} of memory "
                      f"and {gb(budget)} is free ({fits}); {fix}")
