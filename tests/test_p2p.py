"""Prompt-to-Prompt (engine.p2p) against a transcription of the authors' controller (P2P's
null_text_w_ptp notebook: AttentionReplace, seq_aligner.get_replacement_mapper) driving diffusers'
UNet with the same weights."""
import numpy as np
import pytest
import torch

import engine
from engine import p2p
from engine.prompt import PromptError
from engine.sample import ddim

STEPS, GUIDANCE = 10, 7.5


def replacement_mapper(x: str, y: str, word_ids, max_len=77) -> torch.Tensor:
    """seq_aligner.get_replacement_mapper_, its word → token places from word_ids (one word's
    tokens)."""
    words_x, words_y = x.split(" "), y.split(" ")
    assert len(words_x) == len(words_y)

    def inds(words, k):
        start = 1 + sum(len(word_ids(w)) for w in words[:k])
        return list(range(start, start + len(word_ids(words[k]))))
    replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    src, tgt = [inds(words_x, i) for i in replace], [inds(words_y, i) for i in replace]
    mapper = np.zeros((max_len, max_len))
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            s, t = src[cur], tgt[cur]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                for i_t in t:
                    mapper[s, i_t] = 1 / len(t)
            cur, i, j = cur + 1, i + len(s), j + len(t)
        elif cur < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(mapper).float()


class Replace:
    """AttentionReplace (no local blend) on the conditional half of a [sources; edits] guided
    batch; `step` is set by the sampling loop."""

    def __init__(self, mapper, steps, cross, self_, max_pixels):
        alpha = torch.zeros(steps + 1)
        alpha[: int(cross * (steps + 1))] = 1  # get_time_words_attention_alpha
        self.alpha, self.mapper, self.max_pixels = alpha, mapper[None], max_pixels
        self.self_steps, self.step = int(steps * self_), 0

    def __call__(self, attn, is_cross):
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross)
        return attn

    def forward(self, attn, is_cross):
        if is_cross or self.step < self.self_steps:
            attn = attn.reshape(2, -1, *attn.shape[1:])
            base, rep = attn[0], attn[1:]
            if is_cross:
                a = self.alpha[self.step]
                attn[1:] = torch.einsum("hpw,bwn->bhpn", base, self.mapper) * a + (1 - a) * rep
            elif rep.shape[2] <= self.max_pixels:
                attn[1:] = base.unsqueeze(0).expand(rep.shape[0], *base.shape)
            attn = attn.reshape(-1, *attn.shape[2:])
        return attn


class Processor:
    """P2P's register_attention_control, as a diffusers attention processor."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = self.controller(attn.get_attention_scores(q, k), is_cross)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def sd1(tiny):
    folder, ref = tiny("sd1")
    return engine.load(str(folder)), ref, folder


def tokens(m, *texts):
    return [m.prompt_tokens(t) for t in texts]


@pytest.mark.parametrize("source,edit", [("a big cat", "a big dog"), ("a red cat", "a red dog"),
                                         ("red star", "tan star")])
def test_alignment_is_p2ps_replacement_mapper_for_word_swaps(sd1, source, edit):
    m = sd1[0].model
    tok = m.text_pairs[0][0]
    a, own = p2p.align(*tokens(m, source, edit))
    ref = replacement_mapper(source, edit, tok.ids)
    if len(tok.ids(source)) == len(tok.ids(edit)):
        assert torch.equal(a, ref)
    else:
        # P2P maps the tokens after an unequal swap from the wrong place (mapper[j, j]); up to the
        # swap both agree, and after it ours follows the words
        cut = 1 + len(tok.ids(source.split()[0]))
        assert torch.equal(a[:, :cut], ref[:, :cut])
        n_src, n_edit = len(tok.ids("red")), len(tok.ids("tan"))
        assert torch.equal(a[1:1 + n_src, 1:1 + n_edit], torch.full((n_src, n_edit), 1 / n_edit))
        star = len(tok.ids("star"))
        assert torch.equal(a[1 + n_src:1 + n_src + star, 1 + n_edit:1 + n_edit + star], torch.eye(star))
    assert not own.any()
    torch.testing.assert_close(a.sum(1)[:1 + len(tok.ids(source)) + 1], torch.ones(2 + len(tok.ids(source))))


def test_alignment_keeps_the_edits_own_words_and_drops_removed_ones():
    src, edit = [0, 5, 6, 1, 2, 2, 2], [0, 5, 9, 6, 1, 2, 2]  # 9 inserted, a pad dropped
    a, own = p2p.align(src, edit)
    assert own.tolist() == [False, False, True, False, False, False, False]
    assert a[:, 2].sum() == 0 and a[2, 3] == 1 and a[6].sum() == 0
    a, own = p2p.align([0, 5, 6, 1, 2], [0, 6, 1, 2, 2])  # 5 removed: nobody takes its map
    assert a[1].sum() == 0 and own.tolist() == [False, False, False, False, True]


@pytest.mark.parametrize("max_pixels", [32 ** 2, 16], ids=["all levels", "4x4 level only"])
@pytest.mark.parametrize("cross,self_", [(0.8, 0.5), (0.3, 0.0)])
def test_word_swap_matches_the_authors_controller_on_diffusers_unet(sd1, max_pixels, cross, self_):
    from diffusers import DDIMScheduler

    pipe, ref, _ = sd1
    m = pipe.model
    source, edit = "a big cat", "a big dog"
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    with torch.no_grad():
        ctx = ref.encode_prompt([source, edit], "cpu", 1, True)
        context = torch.cat([ctx[1], ctx[0]])  # [uncond; cond]
        mapper = replacement_mapper(source, edit, m.text_pairs[0][0].ids)
        ctrl = Replace(mapper, STEPS, cross, self_, max_pixels)
        unet, kept = ref.unet, ref.unet.attn_processors
        unet.set_attn_processor(Processor(ctrl))
        sched = DDIMScheduler.from_config(ref.scheduler.config)
        sched.set_timesteps(STEPS)
        x = x_t
        try:
            for i, t in enumerate(sched.timesteps):
                ctrl.step = i
                u, c = unet(torch.cat([x] * 2), t, encoder_hidden_states=context).sample.chunk(2)
                x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
        finally:
            unet.set_attn_processor(kept)

        grid = [int(t) for t in sched.timesteps]
        swap = p2p.swap(*[[t] for t in tokens(m, source, edit)], grid, cross, self_, max_pixels)
        den, cond = m.denoiser(GUIDANCE), m.prompt_cond([source, edit], None, True)
        ours = ddim(p2p.Swapped(den, swap), x_t, cond, m.scheduler, STEPS, progress=False)
        plain = ddim(den, x_t, cond, m.scheduler, STEPS, progress=False)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-4, atol=1e-5)  # the source row is untouched
    assert (ours[1] - plain[1]).abs().max() > 1e-2  # the edit row took the source's maps


@pytest.fixture(scope="module")
def image(sd1):
    with torch.no_grad():
        return sd1[0].generate("a big cat", steps=10, seed=3, progress=False, output="pt")


def test_the_same_prompt_gives_the_null_text_reconstruction_back(sd1, image):
    pipe = sd1[0]
    out, traj = pipe.prompt_to_prompt(image, "a big cat", "a big cat", steps=10, output="pt",
                                      progress=False)
    rec = pipe.reconstruct(traj, "a big cat", output="pt", progress=False)
    torch.testing.assert_close(out, rec, rtol=0, atol=1e-3)  # pixels in [-1, 1]
    assert traj.uncond is not None and traj.guidance == 7.5


def test_no_replaced_steps_is_plain_guided_sampling_from_the_inversion(sd1, image):
    pipe = sd1[0]
    out, traj = pipe.prompt_to_prompt(image, ["a big dog", "a red dog"], "a big cat", steps=10,
                                      cross=0, self_attention=0, null_text=None, output="pt",
                                      progress=False)
    assert out.shape[0] == 2 and traj.uncond is None
    with torch.no_grad():
        m = pipe.model
        den = m.denoiser(7.5)
        z = ddim(den, traj.latents[-1], m.prompt_cond(["a big dog", "a red dog"], None, True),
                 m.scheduler, 10, progress=False)
        torch.testing.assert_close(out, m.decode(z), rtol=1e-4, atol=1e-4)


def test_replaced_steps_round_as_p2p():
    assert p2p.replaced_steps(50, 0.8, 0.5) == (range(40), range(25))  # int(0.8·51), int(0.5·50)
    assert p2p.replaced_steps(10, 1.0, 1.0) == (range(10), range(10))


@pytest.mark.parametrize("kw,match", [
    (dict(cross=1.5), "cross=1.5"), (dict(self_attention=-0.1), "self_attention=-0.1"),
    (dict(prompt="a big BREAK dog"), "BREAK"), (dict(prompt="cat " * 80), "shorten it"),
    (dict(null_text="slow"), "null_text='slow'")])
def test_bad_arguments_are_refused_before_any_work(sd1, image, kw, match):
    args = dict(prompt="a big dog", source="a big cat", steps=10, progress=False) | kw
    with pytest.raises((ValueError, PromptError), match=match):
        sd1[0].prompt_to_prompt(image, **args)


def test_pseudo_words_hold_their_places_and_dynamic_ones_are_refused(sd1):
    from engine.prompt import Concept, Encoder

    m = sd1[0].model
    width = m.text_pairs[0][1].config.hidden_size
    concepts = {"plain": Concept("plain", torch.zeros(2, width), multires=False),
                "C": Concept("C", torch.zeros(10, width))}
    enc = Encoder(m.text_pairs, concepts)
    ids = enc.token_ids("a <plain> cat")
    tok = m.text_pairs[0][0]
    want = [tok.bos_id, *tok.ids("a"), ("<plain>", 0), ("<plain>", 1), *tok.ids("cat"), tok.eos_id]
    assert ids[:len(want)] == want
    assert len(ids) == tok.max_length and len(enc.token_ids("a <C|3|> cat")) == tok.max_length
    with pytest.raises(PromptError, match="changes with t"):
        enc.token_ids("a <C> cat")


def test_cli_writes_the_edit_its_sheet_and_report(sd1, image, tmp_path):
    import json

    from engine import images
    from engine.cli import main

    src = images.save(images.to_pil(image)[0], tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["p2p", "--model", str(sd1[2]), "--image", str(src), "--source", "a big cat",
                 "--prompt", "a big dog", "--steps", "4", "--null-text", "none", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "prompt-to-prompt" and report["null_text"] is None
    assert report["cross"] == 0.8 and report["edits"][0]["prompt"] == "a big dog"
    assert (tmp_path / "out_sheet.png").is_file()


def test_a_mismatched_batch_is_refused_before_the_inversion(sd1, image):
    with pytest.raises(ValueError, match="2 source prompts for 3 edit prompts"):
        sd1[0].prompt_to_prompt(image, ["a", "b", "c"], ["a big cat", "a cat"], steps=10)


def test_one_image_with_a_source_per_edit_is_inverted_under_each(sd1, image):
    out, traj = sd1[0].prompt_to_prompt(image, ["a big dog", "a red cat"], ["a big cat", "a red cat"],
                                        steps=4, null_text=None, output="pt", progress=False)
    assert out.shape[0] == 2 and traj.latents[-1].shape[0] == 2
    assert not torch.equal(traj.latents[-1][0], traj.latents[-1][1])  # two prompts, two inversions
