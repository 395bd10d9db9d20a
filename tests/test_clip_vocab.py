"""CLIP's vocabulary for checkpoints that carry none, read from where users have it; none is shipped here."""
import json
import os
from pathlib import Path

import pytest

from engine import clip_vocab
from engine.embedded import DEFAULT_MODEL

PHOTO = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", the standard CLIP ids
PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4k!!", "naïve café — 東京 at night", "don't   stop"]


def test_byte_symbols_are_gpt2s_bytes_to_unicode():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert clip_vocab.byte_symbols() == list(bytes_to_unicode().values())


@pytest.fixture
def open_clip_bpe():
    path = clip_vocab.open_clip_bpe()
    if path is None:
        assert not os.environ.get("CI"), "CI installs open-clip-torch with --no-deps for this test"
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    return path


def test_open_clip_bpe_file_gives_the_standard_clip_ids_as_transformers_does(open_clip_bpe, tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab.read_bpe(open_clip_bpe)
    assert len(vocab) == 49408 and len(merges) == clip_vocab.N_MERGES
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    for pad in ("<|endoftext|>", "!"):
        ours, where = clip_vocab.clip_tokenizer(pad)
        assert where == str(open_clip_bpe)
        ref = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token=pad)
        assert ours.encode("a photo of a cat") == PHOTO
        want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert ours(PROMPTS).tolist() == want.tolist()


def test_read_bpe_refuses_a_file_that_is_not_clips(tmp_path):
    import gzip

    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merges file"):
        clip_vocab.read_bpe(path)


def _cache_repo(cache, repo, snapshot, sub=""):
    """A hub-cache repo whose snapshot holds the embedded model's tokenizer files (a small CLIP-style BPE)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(snapshot)
    folder = base / "snapshots" / snapshot / sub
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((DEFAULT_MODEL / "tokenizer" / name).read_bytes())
    return folder


def test_the_search_order_is_given_folder_then_hub_cache_then_open_clip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(clip_vocab, "open_clip_bpe", lambda: None)
    with pytest.raises(FileNotFoundError, match="--tokenizer DIR"):
        clip_vocab.clip_tokenizer()
    sd = _cache_repo(tmp_path / "hub", "stabilityai/stable-diffusion-2-1", "abc", "tokenizer")
    assert clip_vocab.clip_tokenizer()[1] == str(sd)
    clip = _cache_repo(tmp_path / "hub", "openai/clip-vit-large-patch14", "def")
    tok, where = clip_vocab.clip_tokenizer("!")
    assert where == str(clip) and tok.pad_id == tok.backend.token_to_id("!")
    tok, where = clip_vocab.clip_tokenizer(folder=DEFAULT_MODEL)  # a model folder: its tokenizer/
    assert where == str(DEFAULT_MODEL / "tokenizer") and tok.encode("a red circle")[0] == tok.bos_id


@pytest.mark.parametrize("env", [{"XDG_CACHE_HOME": "xdg"}, {"XDG_CACHE_HOME": "xdg", "HF_HOME": "home"},
                                 {"HF_HOME": "home", "HUGGINGFACE_HUB_CACHE": "legacy"},
                                 {"HF_HOME": "home", "HUGGINGFACE_HUB_CACHE": "legacy", "HF_HUB_CACHE": "hub"}])
def test_hub_cache_follows_the_environment_as_huggingface_hub_does(tmp_path, monkeypatch, env):
    import subprocess
    import sys

    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(tmp_path / v))
    ref = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert clip_vocab.hub_cache() == Path(ref)
