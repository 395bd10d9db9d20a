"""CLIP BPE tokenizer on `tokenizers`, built from vocab.json + merges.txt exactly the way
transformers 5's `CLIPTokenizer` builds its backend, so token ids match the ones diffusers pipelines
feed the text encoder."""
import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
         r"""[^\s\p{L}\p{N}]+""")
# Registration order matters: re-adding a token's content overwrites its flags, so the last one
# wins.
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _added(value: str | dict | AddedToken, special: bool = True) -> AddedToken:
    """A special token as a config file writes it: a bare string (never normalized) or an AddedToken
    dict."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    special = value.get("special", special)
    flags = {k: value.get(k, False) for k in ("lstrip", "rstrip", "single_word")}
    return AddedToken(value["content"], special=special,
                      normalized=value.get("normalized", not special), **flags)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_vocab(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of a tokenizer folder: vocab.json + merges.txt, or tokenizer.json alone
    (as transformers 5 saves it)."""
    saved = _read_json(path / "tokenizer.json")
    if saved and not (path / "vocab.json").is_file():
        return saved["model"]["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                         for m in saved["model"]["merges"]]
    for name in ("vocab.json", "merges.txt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: a CLIP tokenizer folder "
                                    "needs vocab.json and merges.txt")
    try:
        return BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
    # tokenizers' parse errors are bare Exceptions
    except Exception as e:
        raise ValueError(f"cannot read {path}/vocab.json + merges.txt: {e}") from None


class Tokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77,
                 added_tokens: list[AddedToken] = (), **specials: str | dict | AddedToken):
        """specials: bos_token/eos_token/unk_token/pad_token (CLIP's defaults; SD 2.x pads with
        "!")."""
        specials = {k: _added(specials.get(k, DEFAULTS[k])) for k in SPECIALS}
        try:
            bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                      fuse_unk=False, unk_token=specials["unk_token"].content)
        # tokenizers raises a bare Exception for merges naming unknown tokens
        except Exception as e:
            raise ValueError(f"invalid CLIP vocabulary/merges: {e}") from None
        self.backend = Backend(bpe)
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.backend.decoder = decoders.ByteLevel()
        for t in added_tokens:
            (self.backend.add_special_tokens if t.special else self.backend.add_tokens)([t])
        self.backend.add_special_tokens([specials[k] for k in SPECIALS])
        self.bos_id, self.eos_id, self.pad_id = (self.backend.token_to_id(specials[k].content)
                                                 for k in ("bos_token", "eos_token", "pad_token"))
        self.max_length = max_length

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer folder: vocab.json + merges.txt (or, as transformers 5 saves it,
        tokenizer.json alone), optional tokenizer_config.json / special_tokens_map.json, read with
        transformers' precedence."""
        path = Path(path)
        config, saved = (_read_json(path / "tokenizer_config.json"),
                         _read_json(path / "tokenizer.json"))
        vocab, merges = read_vocab(path)
        specials = {k: config[k] for k in SPECIALS if config.get(k) is not None}
        decoder = config.get("added_tokens_decoder")
        # transformers' legacy path: special_tokens_map.json wins, tokenizer.json lists added tokens
        if decoder is None:
            specials |= {k: v for k, v in _read_json(path / "special_tokens_map.json").items()
                         if k in SPECIALS and v}
            decoder = {t["id"]: t for t in saved.get("added_tokens", [])}
        added = [_added(t, special=False)
                 for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
        by_content = {t.content: t for t in added}
        specials = {k: by_content.get(v if isinstance(v, str) else v["content"], v)
                    for k, v in specials.items()}
        max_length = config.get("model_max_length", 77)
        return cls(vocab, merges, max_length=max_length if max_length < 1e9 else 77,
                   added_tokens=added, **specials)

    def __len__(self) -> int:
        """Vocabulary size including added tokens (the text encoder's embedding table needs this
        many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def ids(self, text: str) -> list[int]:
        """The tokens of text, without bos / eos."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """bos, tokens, eos; no padding, no truncation."""
        return [self.bos_id, *self.ids(text), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True).replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """(B, max_length) ids padded with pad_id; longer prompts keep bos + the first tokens + eos
        and warn."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            ids = [self.bos_id, *enc.ids, self.eos_id]
            if len(ids) > self.max_length:
                cut = ids[self.max_length - 1 : -1]
                warnings.warn(f"prompt {i} is {len(ids)} tokens, {len(cut)} over "
                              f"max_length={self.max_length}; "
                              f"cut: {self.decode(cut)!r}", stacklevel=2)
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def pad_embeds(self, embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(n, D) token vectors → (max_length, D): the vectors of bos, them, eos and pads looked up
        in `table` (a prompt whose pseudo-words are vectors, not ids); longer prompts keep the first
        ones and warn."""
        room = self.max_length - 2
        if embeds.shape[0] > room:
            warnings.warn(f"prompt is {embeds.shape[0] + 2} tokens, {embeds.shape[0] - room} over "
                          f"max_length={self.max_length}; its end is cut", stacklevel=3)
        ids = lambda *i: table[torch.tensor(i, dtype=torch.long, device=table.device)]  # noqa: E731
        fill = ids(self.pad_id).expand(max(room - embeds.shape[0], 0), -1)
        return torch.cat([ids(self.bos_id), embeds[:room].to(table), ids(self.eos_id), fill])

    def pad_ids(self, n: int) -> torch.LongTensor:
        """(max_length,) ids laid out as `pad_embeds` lays out n vectors, the vectors' own places
        0: where the eos token lands, for pooling."""
        room = self.max_length - 2
        out = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        out[0], out[1:1 + min(n, room)], out[1 + min(n, room)] = self.bos_id, 0, self.eos_id
        return out

    def add_tokens(self, words: list[str]) -> list[int]:
        """Whole-word pseudo-tokens (textual inversion), never split; returns their ids (existing
        ones reused)."""
        # as transformers: normalized, so they match after lowercasing
        self.backend.add_tokens(list(words))
        ids = [self.backend.token_to_id(w) for w in words]
        if None in ids:
            raise ValueError(f"cannot add {words[ids.index(None)]!r} as a token")
        return ids
