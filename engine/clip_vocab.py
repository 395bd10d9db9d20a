"""CLIP's BPE vocabulary for a checkpoint that carries none (a single file). Every CLIP tokenizer of the SD
family shares it; only the pad token differs by family. Looked for, in this order: a tokenizer folder the
user names, the Hugging Face cache, and the BPE file inside an installed open-clip-torch package (read,
never imported). The engine ships no third-party vocabulary."""
import gzip
import importlib.metadata
import os
from pathlib import Path

from .tokenizer import Tokenizer, read_vocab

BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merges CLIP's SimpleTokenizer uses
HUB_FOLDERS = (("openai/clip-vit-large-patch14", ""), ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
               ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
               ("runwayml/stable-diffusion-v1-5", "tokenizer"), ("stabilityai/stable-diffusion-2-1", "tokenizer"),
               ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"))
WHERE = ("pass --tokenizer DIR (a folder with vocab.json and merges.txt, such as a diffusers model's "
         "tokenizer/), keep openai/clip-vit-large-patch14 in the Hugging Face cache, or run "
         "`pip install --no-deps open-clip-torch`, whose CLIP BPE file the engine reads")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it from the environment."""
    home = os.environ.get("HF_HOME") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or Path(home) / "hub")


def cached_folders() -> list[Path]:
    """Tokenizer folders of CLIP-tokenized repos in the hub cache; a repo's refs/main snapshot first."""
    found = []
    for repo, sub in HUB_FOLDERS:
        base = hub_cache() / ("models--" + repo.replace("/", "--"))
        main = base / "refs" / "main"
        snaps = [base / "snapshots" / main.read_text().strip()] if main.is_file() else []
        snaps += sorted((base / "snapshots").glob("*"))
        found += [s / sub for s in snaps if (s / sub / "merges.txt").is_file()]
    return found


def open_clip_bpe() -> Path | None:
    """The CLIP BPE file of an installed open-clip-torch, found from its metadata alone."""
    try:
        path = Path(importlib.metadata.distribution("open_clip_torch").locate_file(BPE_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def byte_symbols() -> list[str]:
    """The 256 byte symbols in GPT-2's bytes_to_unicode order: printable bytes as themselves, then the
    rest as chr(256 + n)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in kept] + [chr(256 + n) for n in range(256 - len(kept))]


def read_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary built from CLIP's gzipped merges file as CLIP builds it: the byte symbols, the same
    with </w>, one token per merge, then <|startoftext|> and <|endoftext|> (49 408 in all)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merges file ({N_MERGES} merges after a header line)")
    symbols = byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


def find(folder: Path | None = None) -> Path:
    """Where CLIP's vocabulary will come from: `folder` (or its tokenizer/) if given, else the hub cache,
    else open-clip-torch's BPE file. Checked before any weights are read."""
    if folder is not None:
        folder = Path(folder)
        folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        if not ((folder / "merges.txt").is_file() or (folder / "tokenizer.json").is_file()):
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: it needs vocab.json and "
                                    "merges.txt (or tokenizer.json)")
        return folder
    cached = cached_folders()
    if cached:
        return cached[0]
    bpe = open_clip_bpe()
    if bpe is None:
        raise FileNotFoundError(f"no CLIP tokenizer found for a checkpoint that carries none; {WHERE}")
    return bpe


def from_source(where: Path, pad_token: str = "<|endoftext|>") -> Tokenizer:
    """CLIP's tokenizer from what `find` found, padding with `pad_token` ("!" for SD 2.x and SDXL's second
    encoder)."""
    vocab, merges = read_bpe(where) if where.is_file() else read_vocab(where)
    return Tokenizer(vocab, merges, pad_token=pad_token)


def clip_tokenizer(pad_token: str = "<|endoftext|>", folder: Path | None = None) -> tuple[Tokenizer, str]:
    """CLIP's tokenizer padding with `pad_token`, and where its vocabulary came from (`find`)."""
    where = find(folder)
    return from_source(where, pad_token), str(where)
