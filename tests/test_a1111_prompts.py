"""AUTOMATIC1111's prompt syntax: emphasis, BREAK and 75-token chunks, against embeddings computed here from
transformers' CLIPTextModel (and, for SDXL, CLIPTextModelWithProjection) with the rule written out again."""
import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import engine
from engine import prompt as pr
from engine.prompt import Concept, PromptError

TOL = 1e-4  # the engine's text encoders match transformers to this (tests/test_clip.py)
LONG = " ".join(["a red star and a blue star"] * 8)  # over 75 tokens with the tests' character-level vocabulary


@pytest.mark.parametrize("text,want", [
    ("a (red) star", [("a ", 1.0), ("red", 1.1), (" star", 1.0)]),
    ("a ((red:1.5)) [[star]]", [("a ", 1.0), ("red", 1.5 * 1.1), (" ", 1.0), ("star", 1 / 1.1 ** 2)]),
    (r"\(red\) \[x\] a\\b \<c>", [(r"(red) [x] a\b <c>", 1.0)]),
    ("(open and [unclosed", [("open and ", 1.1), ("unclosed", 1.1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("ratio 1:2 (x:0.5)", [("ratio 1:2 ", 1.0), ("x", 0.5)]),
])
def test_emphasis_is_parsed_as_automatic1111_parses_it(text, want):
    got = pr.emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


def test_a_bad_weight_is_a_clear_error():
    with pytest.raises(PromptError, match=r"'1\.2\.3' is not a weight"):
        pr.emphasis("(a:1.2.3)")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD 1 folder, its text encoder's final layer norm shifted: a random tiny CLIP's outputs average
    about 0, which makes A1111's mean restoring (a ratio of two means) ill-conditioned; real CLIP's do not."""
    from safetensors.torch import load_file, save_file

    from conftest import make_pipeline

    folder = tmp_path_factory.mktemp("sd1_shifted")
    make_pipeline("sd1", folder)
    path = folder / "text_encoder" / "model.safetensors"
    sd = load_file(path)
    key = next(k for k in sd if k.endswith("final_layer_norm.bias"))
    sd[key] = sd[key] + 0.5
    save_file(sd, str(path))
    return folder


def _reference(folder, sub="text_encoder", cls=CLIPTextModel):
    tok = CLIPTokenizer.from_pretrained(folder / sub.replace("text_encoder", "tokenizer"))
    return tok, cls.from_pretrained(folder / sub).eval()


def _chunks(tok, pieces):
    """(ids per chunk, weights per chunk): the pieces' tokens in chunks of 75, each as bos + tokens + eos + pad."""
    ids = [(t, w) for text, w in pieces for t in tok(text, add_special_tokens=False).input_ids]
    out = []
    for i in range(0, max(len(ids), 1), 75):
        part = ids[i:i + 75]
        row = [tok.bos_token_id] + [t for t, _ in part] + [tok.eos_token_id]
        weights = [1.0] + [w for _, w in part] + [1.0] * (77 - 1 - len(part))
        out.append((row + [tok.pad_token_id] * (77 - len(row)), weights))
    return out


def _emphasized(z, weights):
    w = torch.tensor(weights)[None, :, None]
    return z * w * (z.mean() / (z * w).mean())


def _expected_sd(tok, te, pieces, chunks=None):
    rows = _chunks(tok, pieces)
    rows += [(_chunks(tok, [("", 1.0)])[0])] * ((chunks or len(rows)) - len(rows))
    with torch.no_grad():
        return torch.cat([_emphasized(te(torch.tensor([ids])).last_hidden_state, w) for ids, w in rows], 1)


@pytest.mark.parametrize("text,pieces", [
    ("a (red:1.4) star on [white]", [("a ", 1.0), ("red", 1.4), (" star on ", 1.0), ("white", 1 / 1.1)]),
    (LONG, [(LONG, 1.0)]),
    (f"(({LONG})) BREAK st", None),
])
def test_sd_embeddings_match_transformers(sd1, text, pieces):
    folder = sd1
    tok, te = _reference(folder)
    got = engine.load(folder).model.encode_prompt([text])
    if pieces is None:  # BREAK: two encodings side by side
        want = torch.cat([_expected_sd(tok, te, [(LONG, 1.21)]), _expected_sd(tok, te, [("st", 1.0)])], 1)
    else:
        want = _expected_sd(tok, te, pieces)
    assert got.shape[1] == want.shape[1] and got.shape[1] % 77 == 0
    assert (got - want).abs().max().item() <= TOL


def test_a_short_negative_is_padded_to_the_prompts_chunks(sd1):
    folder = sd1
    tok, te = _reference(folder)
    got = engine.load(folder).model.encode_prompt([LONG], ["blurry"], guided=True)
    n = len(_chunks(tok, [(LONG, 1.0)]))
    assert n >= 2 and got.shape[1] == 77 * n
    assert (got[:1] - _expected_sd(tok, te, [("blurry", 1.0)], chunks=n)).abs().max().item() <= TOL
    assert (got[1:] - _expected_sd(tok, te, [(LONG, 1.0)])).abs().max().item() <= TOL


def test_sdxl_embeddings_match_transformers(tiny):
    """Both encoders' penultimate states, each emphasized, side by side; the pooled text embedding is the first
    chunk's, without emphasis."""
    folder, _ = tiny("sdxl")
    text = f"a (red:1.3) star, {LONG}"
    pieces = [("a ", 1.0), ("red", 1.3), (f" star, {LONG}", 1.0)]
    hidden, pooled = [], None
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        tok, te = _reference(folder, sub, cls)
        rows = _chunks(tok, pieces)
        with torch.no_grad():
            outs = [te(torch.tensor([ids]), output_hidden_states=True) for ids, _ in rows]
        hidden.append(torch.cat([_emphasized(o.hidden_states[-2], w) for o, (_, w) in zip(outs, rows)], 1))
        pooled = outs[0].text_embeds if cls is CLIPTextModelWithProjection else pooled
    got = engine.load(folder).model.encode_prompt([text])
    z = torch.cat(hidden, -1)
    assert got.shape[1] == z.shape[1] + 1 and z.shape[1] == 77 * 2
    assert (got[:, :-1] - z).abs().max().item() <= TOL
    assert (got[0, -1, :pooled.shape[-1]] - pooled[0]).abs().max().item() <= TOL


def test_emphasis_weights_pseudo_word_vectors(sd1):
    folder = sd1
    tok, te = _reference(folder)
    pipe = engine.load(folder)
    rows = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    pipe.model.concepts["C"] = Concept("C", rows)
    got = pipe.model.encode_prompt(["a (<C|2|>:1.5) star"])
    spare = tok.convert_tokens_to_ids("z</w>")  # the reference: row 2 in the place of a token the prompt lacks
    with torch.no_grad():
        te.get_input_embeddings().weight[spare] = rows[2]
    ids, weights = _chunks(tok, [("a ", 1.0), ("z", 1.5), (" star", 1.0)])[0]
    assert ids.count(spare) == 1
    with torch.no_grad():
        want = _emphasized(te(torch.tensor([ids])).last_hidden_state, weights)
    assert (got - want).abs().max().item() <= TOL


def test_long_prompts_generate_and_plain_short_ones_are_unchanged(tiny):
    folder, _ = tiny("sd1")
    pipe = engine.load(folder)
    run = dict(steps=3, guidance=7.5, seed=2, output="pt", progress=False)
    long = pipe.generate(LONG, **run)
    cut = pipe.generate(LONG[:40], **run)  # one chunk's worth
    assert torch.isfinite(long).all() and not torch.equal(long, cut)
    m = pipe.model  # a plain prompt of one chunk: bit for bit the token ids' encoding
    assert torch.equal(m.encode_prompt(["a red star"]), m.text_encoder(m.tokenizer(["a red star"])))


def test_cli_bad_emphasis_fails_before_loading(tiny, tmp_path, cli_error):
    folder, _ = tiny("sd1")
    cli_error(["generate", "--model", str(folder), "--prompt", "a (red:1.2.3) star", "--out", str(tmp_path / "o.png")],
              "is not a weight")


def test_clip_scores_read_a_prompts_words():
    assert pr.plain("a large (blue:1.2) star BREAK on [white] <lora:x:0.5>") == "a large blue star on white"
    assert pr.plain(r"<C(3)> and S*(0.5) ((big))dog \(x\)") == "<C(3)> and S*(0.5) bigdog (x)"
