"""Prompt syntax → conditioning as a function of t (multiresolution textual inversion,
Daras & Dimakis 2022).

A prompt is text with pseudo-word references:

| written | mode | row of concept C used at the step whose time bin is r |
|---|---|---|
| `<C>` | native | S[r] (an imported pseudo-word: its vectors, always) |
| `<C\\|i\\|>` or `C*\\|t\\|` | fixed | S[i] |
| `<C(i)>` or `C*(t)` | semi | S[r] while r > i, else a zero input vector |
| the same, semi='remove' | semi | S[r] while r ≥ i, else no token |
| `<C[i]>` or `C*[t]` | fully | S[i] while r ≤ i, else S[r] |

i is a bin 0..K−1; the paper's t ∈ [0, 1] is bin ⌊t·K⌋ (S*(0.8) is bin 8 of 10). r = ⌊t·K/T⌋ for a
step at timestep t of a T-step model. `S*` names the concept S, or the only loaded concept when none
is called S.
A backslash keeps the text as written: `\\<b>` is the text "<b>" and `S\\*\\(t\\)` the text "S*(t)".

Around the references, AUTOMATIC1111's syntax: emphasis `(word)`, `(word:1.3)`, `[word]`, BREAK,
`<lora:NAME:SCALE>` (engine.lora), and prompts of any length in 75-token chunks (`Encoder`).
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


# AUTOMATIC1111's emphasis (modules/prompt_parser.py): (x) ×1.1, [x] ÷1.1, (x:w) ×w, nested;
# \( \) \[ \] \\ are the characters, a lone backslash is dropped; BREAK ends a 75-token chunk
_EMPHASIS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]"
                       r"|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = -1.0  # the weight that marks a BREAK
UP = 1.1


def emphasis(text: str) -> list[tuple[str, float]]:
    """AUTOMATIC1111's parse_prompt_attention: the text's pieces with their weights, neighbours of
    equal weight joined; BREAK is ("BREAK", -1)."""
    res, round_, square = [], [], []

    def scale(start, w):
        for p in range(start, len(res)):
            res[p][1] *= w

    for m in _EMPHASIS.finditer(text):
        piece, weight = m[0], m[1]
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_.append(len(res))
        elif piece == "[":
            square.append(len(res))
        elif weight is not None and round_:
            try:
                scale(round_.pop(), float(weight))
            except ValueError:
                raise PromptError(f"{piece!r}: {weight!r} is not a weight; write (text:1.3)") \
                    from None
        elif piece == ")" and round_:
            scale(round_.pop(), UP)
        elif piece == "]" and square:
            scale(square.pop(), 1 / UP)
        else:
            for i, part in enumerate(_BREAK_WORD.split(piece)):
                if i:
                    res.append(["BREAK", BREAK])
                res.append([part, 1.0])
    for start in round_:
        scale(start, UP)
    for start in square:
        scale(start, 1 / UP)
    out = []
    for piece, w in res or [["", 1.0]]:
        if out and out[-1][1] == w:
            out[-1][0] += piece
        else:
            out.append([piece, w])
    return [(p, w) for p, w in out]


_MARK = 0xE000  # private-use characters stand for pseudo-words while emphasis is parsed


def marked(segments: list[str | Ref]) -> tuple[str, dict[str, Ref]]:
    """The text with each reference replaced by a private-use character, so that emphasis is
    parsed around the references, and {character: reference}."""
    refs, out = {}, []
    for seg in segments:
        if isinstance(seg, Ref):
            refs[chr(_MARK + len(refs))] = seg
            seg = chr(_MARK + len(refs) - 1)
        out.append(seg)
    return "".join(out), refs


def plain(text: str) -> str:
    """A prompt's words: without emphasis brackets, weights, BREAK or <lora:…> tags (pseudo-words
    stay as written), for a CLIP score of the text."""
    text, refs = marked(parse(strip_loras(text)))
    words = "".join(" " if w == BREAK else p for p, w in emphasis(text))
    return " ".join("".join(str(refs[c]) if c in refs else c for c in words).split())


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's emphasis on text-encoder outputs z (N, L, D): each token's row times its
    weight (N, L), then each sequence scaled back to its mean."""
    if bool((weights == 1).all()):
        return z
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z)[..., None]
    new = z.mean(dim=(1, 2), keepdim=True)
    return z * torch.where(new == 0, 1.0, mean / new)


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
    if ref.mode == "semi" and semi == "remove":
        # the reference's DreamBooth pipeline: <S|r|> once i/K ≤ t/T, that is once r ≥ i
        return r if r >= i else DROP
    if r > i:
        return r
    return i if ref.mode == "fully" else ZERO


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
    lora_tags(texts)
    for text in texts:
        text, refs = marked(parse(strip_loras(text)))
        for ref in refs.values():
            concept(ref, concepts)
        emphasis(text)


Piece = tuple[float, "list[list[int]] | tuple[Ref, Concept]"]


class Encoder:
    """Prompts → text-encoder embeddings, as AUTOMATIC1111 encodes them: emphasis, then the tokens
    in chunks of 75 (BREAK ends one early), each chunk encoded with its own start / end / padding
    and the chunks concatenated along the sequence; prompts of one batch padded to one chunk count
    with empty chunks. Pseudo-words are vectors in place of tokens, re-encoded only when a
    selection changes. `pairs`: (tokenizer, text encoder) of each encoder in order; a concept's
    vectors are the encoders' widths side by side (SDXL: CLIP ViT-L's, then bigG's), and with
    several encoders (or a projected one) the embedding is SDXL's packed one (engine.sdxl), whose
    pooled output is the first chunk's."""

    def __init__(self, pairs: list, concepts: dict[str, Concept], semi: str = "zero",
                 T: int = 1000):
        self.pairs, self.concepts, self.T = list(pairs), concepts, T
        self.semi = check_semi(semi)
        widths = [te.config.hidden_size for _, te in self.pairs]
        self.columns = [slice(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        self.xl = len(self.pairs) > 1 or hasattr(self.pairs[-1][1], "text_projection")

    def resolve(self, text: str) -> list[Piece | None]:
        """The prompt's pieces in order, each (weight, its token ids for every tokenizer) or
        (weight, (reference, concept)), and None for a BREAK; unknown names are an error here."""
        text, refs = marked(parse(text))
        refs = {c: (ref, concept(ref, self.concepts)) for c, ref in refs.items()}
        split = re.compile(f"([{''.join(refs)}])") if refs else None
        out = []
        for piece, w in emphasis(text):
            if w == BREAK:
                out.append(None)
                continue
            for part in split.split(piece) if split else [piece]:
                if part in refs:
                    out.append((w, refs[part]))
                elif part:
                    out.append((w, [tok.ids(part) for tok, _ in self.pairs]))
        return out

    def _chunks(self, resolved, t: int, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoder e's input vectors at timestep t, before bos / eos / padding, in chunks of at most
        75: each (n, D) with its (n,) weights."""
        table = self.pairs[e][1].text_model.embeddings.token_embedding.weight
        room = self.pairs[e][0].max_length - 2
        groups, vectors, weights = [], [], []
        for item in [*resolved, None]:  # None: a BREAK, and the end
            if item is None:
                v = torch.cat(vectors) if vectors else table[:0]
                groups.append((v, torch.cat(weights) if weights else table.new_ones(0)))
                vectors, weights = [], []
                continue
            w, seg = item
            if isinstance(seg, list):
                v = table[torch.tensor(seg[e], dtype=torch.long, device=table.device)]
            else:
                s = selection(*seg, t, self.T, self.semi)
                rows = seg[1].embeds[:, self.columns[e]]
                v = (rows.to(table) if s == ALL else table.new_zeros(1, table.shape[1]) if s == ZERO
                     else table[:0] if s == DROP else rows[s:s + 1].to(table))
            vectors.append(v)
            weights.append(torch.full((v.shape[0],), w, dtype=torch.float32))
        if len(groups) > 1 and groups[-1][0].shape[0] == 0:  # a BREAK at the end adds no chunk
            groups.pop()
        return [(v[i:i + room], w[i:i + room]) for v, w in groups
                for i in range(0, max(len(v), 1), room)]

    def count(self, text: str) -> int:
        """How many 75-token chunks the text encodes to."""
        resolved = self.resolve(text)
        return max(len(self._chunks(resolved, 0, e)) for e in range(len(self.pairs)))

    def token_ids(self, text: str) -> list:
        """What the first text encoder reads, place by place, for a prompt in one chunk: bos, the
        token ids, eos, padding (emphasis moves none of them); a pseudo-word's vectors are
        (its name, k)."""
        tok, ids = self.pairs[0][0], []
        for item in self.resolve(text):
            if item is None:
                raise PromptError(f"{text!r}: BREAK starts a chunk, but here a prompt must be one "
                                  "chunk; remove it")
            if isinstance(item[1], list):
                ids += item[1][0]
                continue
            ref, c = item[1]
            if self.dynamic([[item]]) is not None:
                raise PromptError(f"{text!r}: {ref} changes with t, but here a prompt needs fixed "
                                  f"places for its tokens; write <{ref.name}|i|>")
            s = selection(ref, c, 0, self.T, self.semi)
            n = len(c.embeds) if s == ALL else 0 if s == DROP else 1
            ids += [(str(ref), k) for k in range(n)]
        room = tok.max_length - 2
        if len(ids) > room:
            raise PromptError(f"{text!r} is {len(ids)} tokens; here a prompt must fit one chunk of "
                              f"{room}: shorten it")
        return [tok.bos_id, *ids, tok.eos_id] + [tok.pad_id] * (room - len(ids))

    def _key(self, resolved, t: int) -> tuple:
        return tuple(selection(*seg[1], t, self.T, self.semi)
                     for seg in resolved if seg is not None and isinstance(seg[1], tuple))

    def encode(self, texts: list[str], t: int = 0) -> torch.Tensor:
        """(B, 77·k, D) at timestep t for the k chunks of the longest text (SDXL: one more row,
        engine.sdxl)."""
        return self.encode_resolved([self.resolve(s) for s in texts], t)

    def encode_resolved(self, resolved: list, t: int = 0, chunks: int = 1) -> torch.Tensor:
        """encode's result for resolved texts, with at least `chunks` chunks."""
        per = [[self._chunks(r, t, e) for r in resolved] for e in range(len(self.pairs))]
        k = max([chunks] + [len(c) for enc in per for c in enc])
        hidden, pooled = [], None
        for e, (tok, te) in enumerate(self.pairs):
            table = te.text_model.embeddings.token_embedding.weight
            rows, weights, first = [], [], []
            for cs in per[e]:
                cs = cs + [(table[:0], table.new_ones(0))] * (k - len(cs))
                first.append(len(cs[0][0]))
                for v, w in cs:
                    rows.append(tok.pad_embeds(v, table))
                    weights.append(torch.cat([w.new_ones(1), w, w.new_ones(tok.max_length - 1
                                                                          - len(w))]))
            embeds = torch.stack(rows)
            if self.xl:
                states = te.hidden_states(None, embeds)
                z = states[-2]
                if e == len(self.pairs) - 1:
                    # the pooled output, at the eos of each prompt's first chunk
                    ids = torch.stack([tok.pad_ids(n) for n in first]).to(embeds.device)
                    pooled = te.text_embeds(te.text_model.final_layer_norm(states[-1][::k]), ids)
            else:
                z = te(inputs_embeds=embeds)
            z = emphasize(z, torch.stack(weights))
            hidden.append(z.reshape(len(resolved), k * tok.max_length, -1))
        z = torch.cat(hidden, -1)
        return sdxl.pack(z, pooled) if self.xl else z

    @staticmethod
    def dynamic(resolved: list) -> Ref | None:
        """The first reference of resolved texts that changes with t (native / semi / fully, to a
        multires concept), if any."""
        return next((ref for r in resolved for seg in r
                     if seg is not None and isinstance(seg[1], tuple)
                     for ref, c in [seg[1]] if c.multires and ref.mode != "fixed"), None)

    def cond(self, resolved: list) -> Callable[[int], torch.Tensor]:
        """t → (B, 77·k, D) embeddings of resolved texts; the text encoder runs once per distinct
        selection of rows."""
        cache = {}

        def cond(t):
            key = tuple(self._key(r, int(t)) for r in resolved)
            if key not in cache:
                cache[key] = self.encode_resolved(resolved, int(t))
            return cache[key]
        return cond
