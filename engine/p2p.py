"""Prompt-to-Prompt (Hertz et al. 2022): edit an image by editing its prompt. The source prompt and
the edited one are sampled side by side from the same noise, and on the early steps each edited
row attends where its source row attends:

    cross-attention, the first ⌊cross·(N+1)⌋ steps:    M_edit ← M_source · A
    self-attention, the first ⌊self·N⌋ steps, at levels of ≤ max_tokens pixels:    M_edit ← M_source

A (`align`) carries the source's tokens over to the edit's: equal tokens one to one, a swapped word
hands its attention to the word replacing it (shared equally when their token counts differ), and
tokens only the edit has keep their own maps (P2P's AttentionReplace and AttentionRefine in one).
As in the authors' code only the conditional half of a guided batch is edited, and the step counts
round as theirs do. On a real image the noise is its inversion, with null-text embeddings that make
the source row give the image back (P2P's null_text_w_ptp notebook).
"""
import difflib
from dataclasses import dataclass

import torch

from .denoiser import Cond
from .models.blocks import ATTENTION_HOOK


def align(source: list, edit: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A (L, L) with edit map j = Σ_i source map i · A[i, j], and the (L,) mask of edit tokens that
    keep their own map, for two padded token sequences of one length L (Model.prompt_tokens)."""
    if len(source) != len(edit):
        raise ValueError(f"token sequences of {len(source)} and {len(edit)}: "
                         "pad both to one length")
    a, own = torch.zeros(len(source), len(edit)), torch.zeros(len(edit), dtype=torch.bool)
    ops = difflib.SequenceMatcher(None, source, edit, autojunk=False).get_opcodes()
    for op, i0, i1, j0, j1 in ops:
        if op == "equal" or (op == "replace" and i1 - i0 == j1 - j0):
            a[range(i0, i1), range(j0, j1)] = 1.0
        elif op == "replace":
            a[i0:i1, j0:j1] = 1.0 / (j1 - j0)
        elif op == "insert":
            own[j0:j1] = True
    return a, own


def replaced_steps(n: int, cross: float, self_: float) -> tuple[range, range]:
    """Indices of the sampling steps whose cross- and self-attention the edit takes from the source,
    rounded as P2P's code rounds them (its cross-attention table has N + 1 rows)."""
    for name, f in (("cross", cross), ("self_attention", self_)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"{name}={f!r}: need a fraction of the steps in [0, 1]")
    return range(min(int(cross * (n + 1)), n)), range(int(self_ * n))


@dataclass
class Swap:
    """What the edited rows take from the source rows: the token alignments (P, L, L) and
    own-token masks (P, L) of P source–edit pairs, and the timesteps whose cross / self-attention
    they take."""
    maps: torch.Tensor
    own: torch.Tensor
    cross: frozenset
    self_: frozenset
    max_tokens: int = 32 ** 2  # P2P null-text notebook: self-attention of ≤ 32² pixels

    @property
    def pairs(self) -> int:
        return self.maps.shape[0]

    def hook(self, t: int):
        """The attention hook at timestep t (engine.models.blocks.ATTENTION_HOOK). The UNet batch is
        [sources; edits] once, or [unconditional; conditional] halves of that when guided."""
        cross, self_ = int(t) in self.cross, int(t) in self.self_
        p = self.pairs

        def hook(module, q, k, v, out, is_cross):
            if not (cross if is_cross else self_ and q.shape[2] <= self.max_tokens):
                return out
            b = q.shape[0]
            src, edit = slice(b - 2 * p, b - p), slice(b - p, b)
            scale = q.shape[-1] ** -0.5
            maps = (q[src].float() @ k[src].float().transpose(-1, -2) * scale).softmax(-1)
            if is_cross:
                maps = torch.einsum("bhqs,bst->bhqt", maps, self.maps.to(maps))
                if bool(self.own.any()):
                    mine = (q[edit].float() @ k[edit].float().transpose(-1, -2) * scale).softmax(-1)
                    maps = torch.where(self.own.to(maps.device)[:, None, None], mine, maps)
            return torch.cat([out[:b - p], (maps @ v[edit].float()).to(out.dtype)])
        return hook


@dataclass
class Swapped:
    """A denoiser whose UNet calls run with `swap`'s attention hook. Its batch is the P sources,
    then the P edits."""
    denoiser: object
    swap: Swap

    @property
    def guided(self) -> bool:
        return self.denoiser.guided

    def __call__(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        if x.shape[0] != 2 * self.swap.pairs:
            raise ValueError(f"a batch of {x.shape[0]} for {self.swap.pairs} source–edit pairs")
        token = ATTENTION_HOOK.set(self.swap.hook(t))
        try:
            return self.denoiser(x, t, cond)
        finally:
            ATTENTION_HOOK.reset(token)


def swap(sources: list[list], edits: list[list], timesteps: list[int], cross: float = 0.8,
         self_attention: float = 0.5, max_tokens: int = 32 ** 2) -> Swap:
    """The Swap for pairs of padded token sequences, sampled on `timesteps` (the grid, first step
    first)."""
    if len(sources) != len(edits):
        raise ValueError(f"{len(sources)} source prompts for {len(edits)} edits")
    c, s = replaced_steps(len(timesteps), cross, self_attention)
    aligned = [align(a, b) for a, b in zip(sources, edits)]
    return Swap(torch.stack([m for m, _ in aligned]), torch.stack([o for _, o in aligned]),
                frozenset(int(timesteps[i]) for i in c), frozenset(int(timesteps[i]) for i in s),
                max_tokens)
