"""Token-id parity of engine.tokenizer with transformers' CLIPTokenizer (test-only reference) on vocabularies
built here: a BPE trained on a small caption corpus, and a character-level one (no merges)."""
import json
import warnings

import pytest
import torch
import transformers
from tokenizers import Regex, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from engine.tokenizer import Tokenizer

# transformers 5 makes CLIPTokenizerFast an alias of CLIPTokenizer; test both only if they differ.
REFERENCES = list(dict.fromkeys([transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)]))

CAPTIONS = [
    "a photo of a cat sitting on a red sofa", "a painting of a dog in the style of van gogh",
    "an astronaut riding a horse on the moon", "a watercolor landscape with mountains and a lake at sunset",
    "close-up portrait of an old man, highly detailed, 4k", "a bowl of fruit on a wooden table, still life",
    "the city skyline at night with neon lights", "a cute cat toy made of felt", "photograph of the sea",
]
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, 4K, Trending on ArtStation!!!",
    "   leading,   inner and trailing   spaces   ",
    "line one\nline two\r\n\ttabbed\u00a0nbsp",
    "",
    "Crème brûlée à la café, naïve façade, cafe\u0301 (decomposed)",
    "emoji 🐱🚀👩‍🚀 and CJK 東京タワー 한국어 and İSTANBUL ß ﬁ",
    "numbers 1234567890 3.14159 -42 1,000,000 2nd",
    "don't we'll I'm it's they've you'd She'LL",
    "punctuation: ()[]{}<>!?@#$%^&*_+=|\\/~`\"';: -- ... !",
    "<|startoftext|> literal specials <|endoftext|> and <|ENDOFTEXT|>",
    " ".join(["an astronaut riding a horse on the moon"] * 12),  # > 77 tokens
    "supercalifragilistic" * 10,  # a single over-long word
]
D = dict(lstrip=False, rstrip=False, single_word=False)


def _byte_chars() -> list[str]:
    """CLIP's bytes_to_unicode order: printable latin-1 bytes first, then the rest shifted above 255."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]


def _trained_merges() -> list[tuple[str, str]]:
    tok = Backend(BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CAPTIONS * 5, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _write(folder, merges: list[tuple[str, str]], style: str):
    """A tokenizer folder as the hub ships it: CLIP vocab order (bytes, bytes</w>, merges, specials)."""
    folder.mkdir()
    chars = _byte_chars()
    tokens = list(dict.fromkeys([*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges),
                                 "<|startoftext|>", "<|endoftext|>"]))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    if style == "bare":
        return
    special = lambda c: {"content": c, "normalized": True, **D}  # noqa: E731
    pad = {"sd1": "<|endoftext|>", "sd2": "!"}[style]
    config = {"bos_token": {"__type": "AddedToken", **special("<|startoftext|>")}, "do_lower_case": True,
              "eos_token": {"__type": "AddedToken", **special("<|endoftext|>")}, "model_max_length": 77,
              "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
              "unk_token": {"__type": "AddedToken", **special("<|endoftext|>")}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"), "pad_token": pad,
         "unk_token": special("<|endoftext|>")}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for vocab, merges in (("bpe", _trained_merges()), ("chars", [])):
        for style in ("bare", "sd1", "sd2"):
            _write(root / f"{vocab}-{style}", merges, style)
            out[vocab, style] = root / f"{vocab}-{style}"
    return out


def _reference_ids(ref, texts) -> torch.Tensor:
    return ref(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids


CASES = [(v, s) for v in ("bpe", "chars") for s in ("bare", "sd1", "sd2")]


def test_trained_vocabulary_has_merges(folders):
    assert len(_trained_merges()) > 50
    assert len(Tokenizer.from_dir(folders["bpe", "sd1"]).encode("a photo of a cat")) == 7  # every word one token


@pytest.mark.parametrize("ref_cls", REFERENCES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("vocab,style", CASES)
def test_padded_ids_match(folders, vocab, style, ref_cls):
    ref, ours = ref_cls.from_pretrained(folders[vocab, style]), Tokenizer.from_dir(folders[vocab, style])
    assert ours.pad_id == ref.pad_token_id == (0 if style == "sd2" else ref.eos_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = ours(PROMPTS)
    torch.testing.assert_close(ids, _reference_ids(ref, PROMPTS), atol=0, rtol=0)
    assert len(caught) == 2 and all("over max_length=77" in str(w.message) for w in caught)
    for text in PROMPTS[:-2]:
        assert ours.encode(text) == ref(text).input_ids
    assert ours("a cat").shape == (1, 77)


def test_truncation_keeps_bos_eos_and_names_the_cut(folders):
    ours = Tokenizer.from_dir(folders["bpe", "sd1"])
    text = PROMPTS[-2]
    n = len(ours.encode(text))
    with pytest.warns(UserWarning, match=rf"is {n} tokens, {n - 77} over max_length=77"):
        ids = ours(text)[0]
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id and (ids[1:-1] != ours.eos_id).all()


@pytest.mark.parametrize("vocab,style", CASES)
def test_added_pseudo_words(folders, vocab, style):
    ref, ours = transformers.CLIPTokenizer.from_pretrained(folders[vocab, style]), Tokenizer.from_dir(folders[vocab, style])
    words = ["<cat-toy>", "<Dog*>", "sks"]
    assert ref.add_tokens(words) == 3
    ids = ours.add_tokens(words)
    assert ids == ref.convert_tokens_to_ids(words) and len(ours) == len(ref)
    assert ours.add_tokens(["<cat-toy>"]) == ids[:1]  # idempotent
    texts = ["a photo of <cat-toy>", "a<cat-toy>on the sofa!", "A <CAT-TOY>, <dog*> and sks.", "<cat-toy><cat-toy>"]
    torch.testing.assert_close(ours(texts), _reference_ids(ref, texts), atol=0, rtol=0)
    assert ours.encode("a photo of <cat-toy>")[-2] == ids[0]


def test_transformers5_saved_folder(folders, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json only (added tokens inside)."""
    ref = transformers.CLIPTokenizer.from_pretrained(folders["bpe", "sd2"])
    ref.add_tokens(["<cat-toy>"])
    ref.save_pretrained(tmp_path)
    ref, ours = transformers.CLIPTokenizer.from_pretrained(tmp_path), Tokenizer.from_dir(tmp_path)
    texts = [*PROMPTS[:-2], "a <cat-toy>!"]
    torch.testing.assert_close(ours(texts), _reference_ids(ref, texts), atol=0, rtol=0)


def test_missing_files_raise(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text((folders["bpe", "bare"] / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nq zz\n")
    with pytest.raises(ValueError, match="zz"):
        Tokenizer.from_dir(tmp_path)
