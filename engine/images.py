"""Image files ↔ tensors in [-1, 1], the way diffusers' VaeImageProcessor converts them; atomic,
byte-reproducible writes that an interrupt takes back; back-projection of an upscale onto its
input."""
import json
import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
import torch.nn.functional as F
from PIL import Image


MAX_PIXELS = 8192 * 8192  # larger images are refused before they are decoded
LOSSY = (".jpg", ".jpeg", ".webp")


class TooLarge(ValueError):
    """An image over the pixel limit, refused before it is decoded."""


def load(path) -> Image.Image:
    """An image file as RGB; refused before decoding above MAX_PIXELS."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; pass an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    return decode(path, path).convert("RGB")


def decode(source, name, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image of a file or file object, decoded; TooLarge above max_pixels (before decoding),
    ValueError when it is not a readable image."""
    def too_large(size=""):
        return TooLarge(f"{name}: the image is {size}over the limit of {max_pixels // 10**6} megapixels; "
                        "downscale it first")
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise too_large(f"{w}×{h}, ")
            im.load()
            return im.copy()
    except Image.DecompressionBombError:  # Pillow refuses far larger images itself
        raise too_large() from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from None


def check_size(height, width, names=("height", "width")):
    """Requested output sides in pixels (None: the model's own), or a one-line error: positive whole
    numbers, within MAX_PIXELS together. The model checks its VAE factor."""
    for name, v in zip(names, (height, width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}={v!r}: need a positive whole number of pixels")
    if height is not None and width is not None and height * width > MAX_PIXELS:
        raise ValueError(f"{height}×{width} is over the limit of {MAX_PIXELS // 10**6} megapixels; "
                         f"pass a smaller {' / '.join(dict.fromkeys(names))}")


def to_tensor(images) -> torch.Tensor:
    """PIL image(s) → (B, 3, H, W) float32 in [-1, 1]."""
    images = images if isinstance(images, (list, tuple)) else [images]
    arr = np.stack([np.array(im.convert("RGB")).astype(np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] → PIL images (clamped, ×255, rounded)."""
    arr = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def check_backproject(iterations) -> int:
    """`iterations` of back_project as given by a caller, or a one-line error; call it before long
    work."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"backproject={iterations!r}: need a whole number of iterations ≥ 0, "
                         "e.g. 3")
    return iterations


BACKPROJECT = 3  # the iterations the cascade's ×4 stages run (blend, demo): 3 is plenty


def back_project(y: torch.Tensor, low: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative back-projection (Irani & Peleg, 1991): y ← y + bicubic(low − area_downsample(y)),
    so that the f × f area means of the upscale y (B, C, f·h, f·w) converge to the low-res image
    (B, C, h, w) it came from, while its detail above that scale is kept."""
    f = y.shape[-1] // low.shape[-1]
    if (y.shape[:2] != low.shape[:2] or f < 1
            or y.shape[-2:] != (f * low.shape[-2], f * low.shape[-1])):
        raise ValueError(f"back-projection: {tuple(y.shape)} is not an integer upscale of "
                         f"{tuple(low.shape)}")
    for _ in range(iterations):
        y = y + F.interpolate(low - F.avg_pool2d(y, f), scale_factor=f, mode="bicubic",
                              align_corners=False)
    return y


def check_target(path, folder: bool = False) -> Path:
    """An output path we may write, a file (or with folder=True a folder of outputs), or a one-line
    error; call it before long work."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output folder {path.parent} does not exist")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder; --out names the folder the results "
                         "go to")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; --out names the file to write")
    where = path if path.is_dir() else path.parent
    if not os.access(where, os.W_OK):
        raise PermissionError(f"{path}: the folder {where} is not writable; choose another")
    return path


def check_out(path) -> tuple[Path, str]:
    """(path, PIL format) of an image file we may write, or a one-line error; call it before long
    work."""
    path = check_target(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}; use .png or .jpg")
    return path, fmt


# the files and folders made inside `outputs()`, newest last
_MADE: ContextVar[list | None] = ContextVar("made", default=None)


@contextmanager
def outputs():
    """Files first created (write_atomic) and folders made (make_folder) inside this block are
    removed again when it is left by an exception or an interrupt: a command leaves all of its
    outputs or none."""
    made = []
    token = _MADE.set(made)
    try:
        yield made
    except BaseException:
        for p in reversed(made):
            if p.is_dir():
                if not any(p.iterdir()):
                    p.rmdir()
            elif p.exists():
                p.unlink()
        raise
    finally:
        _MADE.reset(token)


def _made(path: Path):
    made = _MADE.get()
    if made is not None:
        made.append(path)


def make_folder(path) -> Path:
    """mkdir -p, each new folder taken back with the command's other outputs (`outputs`)."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"{p}: exists and is not a folder; pass a folder path")
        if not p.exists():
            if not os.access(p.parent, os.W_OK):
                raise PermissionError(f"{p}: the folder {p.parent} is not writable; "
                                      "choose another")
            p.mkdir()
            _made(p)
    return path


def write_atomic(path, write, keep: bool = False) -> Path:
    """Call write(binary file) on a temporary file in path's folder, renamed over `path` only once
    complete. keep: the file survives an interrupt of `outputs()` (a checkpoint to resume from)."""
    path = Path(path)
    new = not path.exists() and not keep
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp creates 0600; give the file the mode a plain open() would
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    if new:
        _made(path)
    return path


@contextmanager
def open_tensors(path):
    """safe_open(path) for reading, with one line naming the file when it is not .safetensors."""
    try:
        f = safe_open(str(path), "pt")
    except Exception as e:  # safetensors' own error type for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    with f:
        yield f


def save_tensors(tensors: dict, path, metadata: dict | None = None, keep: bool = False) -> Path:
    """Tensors (to the CPU, contiguous) and string metadata as one .safetensors file written with
    write_atomic. Its header's keys are sorted (safetensors writes them in hash order), so the same
    tensors and metadata give the same bytes."""
    blob = safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()},
                                  metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned
    out = len(header).to_bytes(8, "little") + header + blob[8 + n:]
    return write_atomic(path, lambda f: f.write(out), keep)


def save(image: Image.Image, path) -> Path:
    """Write an image atomically (never a half-written file)."""
    path, fmt = check_out(path)
    return write_atomic(path, lambda f: image.save(f, format=fmt))


def contact_sheet(items: list[tuple[Image.Image, str]], cell: int = 256,
                  columns: int = 4) -> Image.Image:
    """Images resized to cell × cell (nearest when enlarging, to show pixels as they are) with
    wrapped captions."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(8, int(cell / (font.getlength("x") or 6)))
    lines = [textwrap.wrap(cap, width) for _, cap in items]
    text_h = 12 * max(len(ls) for ls in lines) + 8
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((im, _), ls) in enumerate(zip(items, lines)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        resample = Image.NEAREST if im.width < cell else Image.LANCZOS
        sheet.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        for j, line in enumerate(ls):
            draw.text((x + 4, y + cell + 4 + 12 * j), line, fill="black", font=font)
    return sheet
