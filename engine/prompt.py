"""Prompt syntax → conditioning as a function of t (multiresolution textual inversion,
Daras & Dimakis 2022).

A prompt is text with pseudo-word references:

| written | mode | row of concept C used at the step whose time bin is r |
|---|---|---|
| `<C>` | native | S[r] (an imported pseudo-word: its vectors, always) |
| `<C\\|i\\|>` or `C*\\|t\\|` | fixed | S[i] |
| `<C(i)>` or `C*(t)` | semi | none (a zero input vector, or no token) while r ≤ i, else S[r] |
| `<C[i]>` or `C*[t]` | fully | S[i] while r ≤ i, else S[r] |

i is a bin 0..K−1; the paper's t ∈ [0, 1] is bin ⌊t·K⌋ (S*(0.8) is bin 8 of 10). r = ⌊t·K/T⌋ for a
step at timestep t of a T-step model. `S*` names the concept S, or the only loaded concept when none
is called S.
A backslash keeps the text as written: `\\<b>` is the text "<b>" and `S\\*(t)` the text "S*(t)".
"""
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import sdxl

NAME = r"[\w.\-]+"
CLOSE = {"|": "|", "(": ")", "[": "]"}
MODES = {"|": "fixed", "(": "semi", "[": "fully"}
SEMI = ("zero", "remove")
_START = re.compile(rf"<{NAME}[|(\[>]|{NAME}\*[|(\[]")
_ANGLE = re.compile(rf"<(?P<name>{NAME})(?:(?P<open>[|(\[])(?P<arg>[^<>|()\[\]\s]*)"
                    r"(?P<close>[|)\]]))?>")
_PAPER = re.compile(rf"(?P<name>{NAME})\*(?P<open>[|(\[])(?P<arg>[^<>|()\[\]\s]*)(?P<close>[|)\]])")
_INT, _UNIT = re.compile(r"\d+"), re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
HELP = "write <C>, <C|i|>, <C(i)> or <C[i]> with a bin i, or C*|t|, C*(t), C*[t] with t in [0, 1]"


class PromptError(ValueError):
    """A prompt that cannot be encoded; the message names the token and the fix."""


@dataclass(frozen=True)
class Ref:
    """A pseudo-word in a prompt. Exactly one of index / t is set when mode is."""
    name: str
    mode: str | None = None      # None (native), "fixed", "semi", "fully"
    index: int | None = None     # bin, in the <C|i|> forms
    t: float | None = None       # in [0, 1], in the paper's C*|t| forms
    raw: str = field(default="", compare=False)  # as written, so that format(parse(text)) == text

    def __str__(self) -> str:
        if self.raw:
            return self.raw
        if self.mode is None:
            return f"<{self.name}>"
        o = next(k for k, m in MODES.items() if m == self.mode)
        return (f"<{self.name}{o}{self.index}{CLOSE[o]}>" if self.t is None
                else f"{self.name}*{o}{self.t!r}{CLOSE[o]}")

    def bin(self, k: int) -> int:
        """The bin i of a fixed / semi / fully reference to a concept with k bins."""
        i = self.index if self.t is None else min(int(self.t * k + 1e-9), k - 1)
        if not 0 <= i < k:
            raise PromptError(f"{self}: bin {i} is out of range; {self.name} has bins 0..{k - 1}")
        return i


def _bad(text: str, start: int, why: str) -> PromptError:
    end = re.compile(r"[\s>]|$").search(text, start + 1).end()
    return PromptError(f"malformed pseudo-word {text[start:end].rstrip()!r}: {why}; {HELP}")


def parse(text: str) -> list[str | Ref]:
    """Text and pseudo-word references, in order; ''.join(map(str, parse(text))) == text."""
    out, pos = [], 0
    for m in _START.finditer(text):
        if m.start() < pos or text[m.start() - 1:m.start()] == "\\":  # escaped: text
            continue
        full = (_ANGLE if text[m.start()] == "<" else _PAPER).match(text, m.start())
        if full is None:
            raise _bad(text, m.start(), "unclosed or with a space inside")
        o, arg = full["open"], full["arg"]
        if o is not None and full["close"] != CLOSE[o]:
            raise _bad(text, m.start(), f"opened with {o!r} but closed with {full['close']!r}")
        paper = text[m.start()] != "<"
        if o is not None and not (_UNIT if paper else _INT).fullmatch(arg or ""):
            raise _bad(text, m.start(), f"{arg!r} is not "
                       + ("a number t in [0, 1]" if paper else "a whole bin number"))
        t = float(arg) if paper else None
        if t is not None and t > 1:
            raise _bad(text, m.start(), f"t = {arg} is above 1")
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(Ref(full["name"], MODES.get(o),
                       None if paper or o is None else int(arg), t, full[0]))
        pos = full.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


_LORA = re.compile(r"(?<!\\)<lora:(?P<args>[^<>]*)>")
LORA_HELP = "write <lora:NAME> or <lora:NAME:SCALE>, e.g. <lora:style:0.8>"


def lora_tags(texts: list[str]) -> dict[str, float]:
    """{NAME: SCALE} of the AUTOMATIC1111 LoRA tags <lora:NAME:SCALE> (SCALE 1 when left out) in
    the texts; a tag written twice must give one scale."""
    out = {}
    for text in texts:
        for m in _LORA.finditer(text):
            parts = [p.strip() for p in m["args"].split(":")]
            if len(parts) > 2 or not parts[0]:
                raise PromptError(f"{m[0]!r}: {LORA_HELP}")
            try:
                scale = float(parts[1]) if len(parts) == 2 else 1.0
            except ValueError:
                raise PromptError(f"{m[0]!r}: {parts[1]!r} is not a number; {LORA_HELP}") from None
            if not math.isfinite(scale):
                raise PromptError(f"{m[0]!r}: the scale must be finite; {LORA_HELP}")
            if out.setdefault(parts[0], scale) != scale:
                raise PromptError(f"<lora:{parts[0]}> is given scales {out[parts[0]]:g} and "
                                  f"{scale:g}; write one")
    return out


def strip_loras(text: str) -> str:
    """The text without its <lora:…> tags."""
    return _LORA.sub("", text)


def unescape(text: str) -> str:
    """The text a prompt's plain part stands for: `\\<` is "<" and `\\*` is "*"."""
    return text.replace("\\<", "<").replace("\\*", "*")


def format(segments: list[str | Ref]) -> str:  # noqa: A001 - the inverse of parse
    return "".join(map(str, segments))


@dataclass
class Concept:
    """A pseudo-word's vectors: K time bins of a multiresolution concept (multires), or the n
    consecutive token vectors of an ordinary textual-inversion embedding."""
    name: str
    embeds: torch.Tensor           # (K, D) or (n, D)
    multires: bool = True
    initializer: str = ""
    # several text encoders (SDXL): each one's width, its vectors side by side in that order
    widths: tuple[int, ...] = ()

    @property
    def bins(self) -> int:
        return self.embeds.shape[0] if self.multires else 1


# selections that are not one row: a zero input vector; no token; every vector
ZERO, DROP, ALL = -1, -2, -3


def selection(ref: Ref, c: Concept, t: int, T: int, semi: str = "zero") -> int:
    """The row of c that ref uses at timestep t, or ZERO / DROP (semi mode), or ALL (an ordinary
    pseudo-word)."""
    if not c.multires:
        return ALL
    k = c.bins
    r = min(int(t) * k // T, k - 1)
    if ref.mode is None:
        return r
    i = ref.bin(k)
    if ref.mode == "fixed":
        return i
    if r > i:
        return r
    return i if ref.mode == "fully" else ZERO if semi == "zero" else DROP


def check_semi(semi: str) -> str:
    if semi not in SEMI:
        raise ValueError(f"semi={semi!r}: use 'zero' (a zero input vector, the paper's code) "
                         "or 'remove' (no token)")
    return semi


def concept(ref: Ref, concepts: dict[str, Concept]) -> Concept:
    """The concept `ref` names, checked to take its bin; unknown names are an error here."""
    c = concepts.get(ref.name)
    if c is None and ref.t is not None and len(concepts) == 1:
        c = next(iter(concepts.values()))  # S* of the paper: the one loaded concept
    if c is None:
        known = ", ".join(f"<{n}>" for n in concepts) or "none"
        raise PromptError(f"unknown pseudo-word {ref}: loaded: {known}; load its file "
                          "with --embeddings (Pipeline.load_embeddings), or write "
                          f"\\{ref} for the text itself")
    if ref.mode is not None and not c.multires:
        raise PromptError(f"{ref}: {c.name} is an ordinary pseudo-word with no time bins; "
                          f"write <{c.name}>")
    if ref.mode is not None:
        ref.bin(c.bins)
    return c


def check(texts, concepts: dict[str, Concept]) -> None:
    """The syntax and pseudo-words of prompts, against `concepts`, without a model: a bad prompt
    fails before one loads."""
    for text in texts:
        for seg in parse(text):
            if isinstance(seg, Ref):
                concept(seg, concepts)


class Encoder:
    """Prompts with pseudo-words → text-encoder embeddings, re-encoded only when a selection
    changes. `pairs`: (tokenizer, text encoder) of each encoder in order; a concept's vectors are
    the encoders' widths side by side (SDXL: CLIP ViT-L's, then bigG's), and with several encoders
    (or a projected one) the embedding is SDXL's packed one (engine.sdxl)."""

    def __init__(self, pairs: list, concepts: dict[str, Concept], semi: str = "zero",
                 T: int = 1000):
        self.pairs, self.concepts, self.T = list(pairs), concepts, T
        self.semi = check_semi(semi)
        widths = [te.config.hidden_size for _, te in self.pairs]
        self.columns = [slice(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        self.xl = len(self.pairs) > 1 or hasattr(self.pairs[-1][1], "text_projection")

    def resolve(self, text: str) -> list[list[list[int]] | tuple[Ref, Concept]]:
        """Each text piece's token ids for every tokenizer, and the concept of each reference;
        unknown names are an error here."""
        out = []
        for seg in parse(text):
            if isinstance(seg, str):
                out.append([tok.ids(unescape(seg)) for tok, _ in self.pairs])
                continue
            out.append((seg, concept(seg, self.concepts)))
        return out

    def _vectors(self, resolved, t: int, e: int) -> torch.Tensor:
        """(n, D) input vectors of encoder e at timestep t, before bos / eos / padding."""
        table = self.pairs[e][1].text_model.embeddings.token_embedding.weight
        pieces = []
        for seg in resolved:
            if isinstance(seg, list):
                pieces.append(table[torch.tensor(seg[e], dtype=torch.long, device=table.device)])
                continue
            s = selection(*seg, t, self.T, self.semi)
            vectors = seg[1].embeds[:, self.columns[e]]
            pieces.append(vectors.to(table) if s == ALL
                          else table.new_zeros(1, table.shape[1]) if s == ZERO
                          else table[:0] if s == DROP else vectors[s:s + 1].to(table))
        return torch.cat(pieces) if pieces else table[:0]

    def _key(self, resolved, t: int) -> tuple:
        return tuple(selection(*seg, t, self.T, self.semi)
                     for seg in resolved if isinstance(seg, tuple))

    def encode(self, texts: list[str], t: int = 0) -> torch.Tensor:
        """(B, 77, D) at timestep t (SDXL: (B, 78, D), engine.sdxl)."""
        return self.encode_resolved([self.resolve(s) for s in texts], t)

    def encode_resolved(self, resolved: list, t: int = 0) -> torch.Tensor:
        embeds = []
        for e, (tok, te) in enumerate(self.pairs):
            table = te.text_model.embeddings.token_embedding.weight
            vectors = [self._vectors(r, t, e) for r in resolved]
            embeds.append(torch.stack([tok.pad_embeds(v, table) for v in vectors]))
        if not self.xl:
            return self.pairs[0][1](inputs_embeds=embeds[0])
        # the pooled output is read at the last encoder's eos, placed after its vectors
        ids = torch.stack([self.pairs[-1][0].pad_ids(v.shape[0]) for v in vectors])
        ids = ids.to(embeds[-1].device)
        return sdxl.encode([te for _, te in self.pairs], [ids] * len(self.pairs), embeds)

    def dynamic(self, texts: list[str]) -> Ref | None:
        """The first reference that changes with t (native / semi / fully, to a multires concept),
        if any."""
        return next((ref for s in texts for seg in self.resolve(s) if isinstance(seg, tuple)
                     for ref, c in [seg] if c.multires and ref.mode != "fixed"), None)

    def cond(self, texts: list[str]) -> Callable[[int], torch.Tensor]:
        """t → (B, 77, D) embeddings; the text encoder runs once per distinct selection of rows."""
        resolved = [self.resolve(s) for s in texts]
        cache = {}

        def cond(t):
            key = tuple(self._key(r, int(t)) for r in resolved)
            if key not in cache:
                cache[key] = self.encode_resolved(resolved, int(t))
            return cache[key]
        return cond
