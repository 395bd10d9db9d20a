"""The pseudo-word prompt syntax (engine.prompt): parsing, the three sampling modes, per-bin encoding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine import prompt as pr
from engine.prompt import Concept, PromptError, Ref

NAMES = st.from_regex(r"[A-Za-z0-9_.\-]{1,8}", fullmatch=True)
PLAIN = st.text(st.characters(blacklist_characters="<>*|()[]", blacklist_categories=("Cs",)), max_size=20)


@given(st.text(max_size=60))
def test_arbitrary_text_round_trips_or_names_the_bad_token(text):
    try:
        segs = pr.parse(text)
    except PromptError as e:
        assert "malformed pseudo-word" in str(e) and "write <C>" in str(e)
        return
    assert pr.format(segs) == text
    assert all(s for s in segs if isinstance(s, str))  # no empty text pieces


@given(PLAIN)
def test_text_without_pseudo_words_is_one_piece(text):
    assert pr.parse(text) == ([text] if text else [])


def refs():
    angle = st.builds(lambda n, m, i: Ref(n, m, i), NAMES, st.sampled_from(["fixed", "semi", "fully"]),
                      st.integers(0, 99))
    paper = st.builds(lambda n, m, t: Ref(n, m, None, t), NAMES, st.sampled_from(["fixed", "semi", "fully"]),
                      st.floats(0, 1, allow_nan=False))
    return st.one_of(angle, paper, st.builds(Ref, NAMES))


@given(st.lists(st.tuples(PLAIN, refs()), max_size=4), PLAIN)
def test_generated_prompts_parse_back_to_their_references(pairs, tail):
    segs = []
    for text, ref in pairs:
        segs += [f"{text} ", ref]  # a space keeps the text from running into C*(t)'s name
    segs.append(" " + tail)
    parsed = pr.parse(pr.format(segs))
    assert [s for s in parsed if isinstance(s, Ref)] == [r for _, r in pairs]
    assert pr.format(parsed) == pr.format(segs)


BAD = st.one_of(
    st.builds(lambda n, a: f"<{n}|{a}|>", NAMES, st.sampled_from(["x", "", "1.5", "-1", "3a"])),
    st.builds(lambda n, oc: f"<{n}{oc[0]}3{oc[1]}>", NAMES, st.sampled_from(["|)", "|]", "(|", "(]", "[|", "[)"])),
    st.builds(lambda n, a: f"{n}*({a})", NAMES, st.sampled_from(["1.5", "a", "", "2", "0.5.1"])),
    st.builds(lambda n: f"<{n}(3", NAMES),
)


@given(PLAIN, BAD)
@settings(max_examples=200)
def test_malformed_tokens_are_an_error_naming_them(text, bad):
    with pytest.raises(PromptError) as e:
        pr.parse(f"{text} {bad} end")
    assert repr(bad) in str(e.value)


def test_the_paper_syntax_maps_t_to_bins():
    s = pr.parse("S*|0| S*(0.8) S*[1] S*(0.35)")
    assert [r.bin(10) for r in s if isinstance(r, Ref)] == [0, 8, 9, 3]
    assert [r.mode for r in s if isinstance(r, Ref)] == ["fixed", "semi", "fully", "semi"]


@pytest.mark.parametrize("mode,i,want", [
    # row used at bins r = 0..9, from the reference's load_learned_concepts schedules
    ("fixed", 3, [3] * 10),
    ("fully", 3, [3, 3, 3, 3, 4, 5, 6, 7, 8, 9]),
    ("semi", 3, [pr.ZERO] * 4 + [4, 5, 6, 7, 8, 9]),
    (None, None, list(range(10))),
])
def test_modes_select_the_rows_of_the_reference(mode, i, want):
    c = Concept("C", torch.zeros(10, 4))
    got = [pr.selection(Ref("C", mode, i), c, t, 1000) for t in range(50, 1000, 100)]
    assert got == want


@pytest.mark.parametrize("n", [0, 3, 9])
def test_semi_remove_follows_the_reference_dreambooth_pipeline(n):
    """DreamBoothMultiResPipeline: <S(n)> becomes <S|r|>, r = int(t/1000·10), if n/10 ≤ t/1000, else it is
    deleted."""
    c = Concept("C", torch.zeros(10, 4))
    for t in range(0, 1000, 7):
        want = int(t / 1000 * 10) if n / 10 <= t / 1000 else pr.DROP
        assert pr.selection(Ref("C", "semi", n), c, t, 1000, semi="remove") == want, t


@pytest.fixture(scope="module")
def pipe():
    p = engine.load()
    g = torch.Generator().manual_seed(0)
    p.model.concepts["C"] = Concept("C", torch.randn(10, 128, generator=g) * 0.3)
    p.model.concepts["plain"] = Concept("plain", torch.randn(2, 128, generator=g) * 0.3, multires=False)
    return p


def test_unknown_and_misused_pseudo_words_are_clear_errors(pipe):
    with pytest.raises(PromptError, match=r"unknown pseudo-word <moon>: loaded: <C>, <plain>; load its file"):
        pipe.model.encode_prompt(["a <moon>"], None, False)
    with pytest.raises(PromptError, match=r"<C\|10\|>: bin 10 is out of range; C has bins 0..9"):
        pipe.model.encode_prompt(["a <C|10|>"], None, False)
    with pytest.raises(PromptError, match="ordinary pseudo-word with no time bins; write <plain>"):
        pipe.model.encode_prompt(["a <plain(3)>"], None, False)
    with pytest.raises(PromptError, match=r"<C\(3\)> changes with t, but this method \(an inversion\) needs"):
        pipe.model.encode_prompt(["a <C(3)>"], None, False)  # a fixed-prompt path (inversion) gets a fixed one only


def test_paper_star_names_the_only_concept():
    p = engine.load()
    p.model.concepts["jane"] = Concept("jane", torch.randn(10, 128))
    assert torch.equal(p.model.encode_prompt(["a S*|0.3|"], None, False), p.model.encode_prompt(["a <jane|3|>"], None, False))


def test_pseudo_word_vectors_replace_their_token(pipe):
    """A pseudo-word whose vector is a word's own embedding encodes exactly as that word."""
    table = pipe.model.text_encoder.text_model.embeddings.token_embedding.weight
    pipe.model.concepts["red"] = Concept("red", table[pipe.model.tokenizer.ids("red")].repeat(10, 1))
    try:
        want = pipe.model.encode_prompt(["a large red star", ""], None, False)
        assert torch.allclose(pipe.model.encode_prompt(["a large <red|4|> star", ""], None, False), want, atol=1e-6)
        cond = pipe.model.prompt_cond(["a large <red> star"], None, False)
        assert torch.allclose(cond(999), want[:1], atol=1e-6)
    finally:
        del pipe.model.concepts["red"]


def test_semi_mode_zeroes_or_removes_the_token_below_its_bin(pipe):
    enc = pr.Encoder(pipe.model.text_pairs, pipe.model.concepts)
    removed = pr.Encoder(pipe.model.text_pairs, pipe.model.concepts, semi="remove")
    above, below = 650, 250  # bins 6 and 2 around i = 4
    assert torch.allclose(enc.encode(["a <C(4)> star"], above), enc.encode(["a <C|6|> star"]), atol=1e-6)
    assert torch.allclose(removed.encode(["a <C(4)> star"], below), pipe.model.encode_prompt(["a star"], None, False),
                          atol=1e-6)
    zero = enc.encode(["a <C(4)> star"], below)
    assert not torch.allclose(zero, removed.encode(["a <C(4)> star"], below), atol=1e-3)
    te = pipe.model.text_encoder
    x = te.text_model.embeddings.token_embedding(pipe.model.tokenizer(["a x star"]))
    x[0, 2] = 0  # bos, a, <C>, …
    assert torch.allclose(zero, te(inputs_embeds=x), atol=1e-6)


def test_text_is_encoded_once_per_bin_not_per_step(pipe, monkeypatch):
    calls = []
    forward = pipe.model.text_encoder.forward
    monkeypatch.setattr(pipe.model.text_encoder, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for prompt, n in (("a <C|3|>", 1), ("a <C(5)>", 5), ("a <C>", 10), ("a <C[2]> and <C(8)>", 8)):
        calls.clear()
        pipe.generate(prompt, steps=50, output="pt", progress=False)
        assert len(calls) == n, prompt
    with pytest.raises(PromptError, match="unknown pseudo-word S\\*\\(0.8\\)"):
        pipe.generate("a S*(0.8)", steps=2)  # two concepts loaded: S* is ambiguous, so it must be named


def test_several_concepts_and_resolutions_in_one_prompt(pipe):
    texts = ["<C|0|> beside <C[7]> and <plain>, on a plain white background"]
    cond = pipe.model.prompt_cond(texts, None, False)
    assert not torch.equal(cond(50), cond(950))        # <C[7]>: row 7 below bin 7, row 9 at bin 9
    assert torch.equal(cond(50), cond(750))            # bins 0 and 7: both rows 7


def test_a_backslash_writes_the_text_of_a_pseudo_word():
    assert pr.parse(r"a \<b> star and S\*\(0.3\)") == [r"a \<b> star and S\*\(0.3\)"]
    assert pr.emphasis(r"a \<b> star and S\*\(0.3\)") == [("a <b> star and S*(0.3)", 1.0)]
    p = engine.load()
    with pytest.raises(pr.PromptError, match=r"write \\<b> for the text itself"):
        p.model.encode_prompt(["a <b> star"])
    want = p.model.text_encoder(p.model.tokenizer(["a <b> star"]))
    assert torch.equal(p.model.encode_prompt([r"a \<b> star"]), want)
