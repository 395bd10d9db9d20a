"""Multiresolution textual inversion (engine.multires): training, resume, embedding files, CLI."""
import json

import pytest
import safetensors.torch
import torch

import engine
from engine import multires, world
from engine.cli import main
from engine.embedded import DEFAULT_MODEL
from engine.checkpoints import LoadError
from engine.prompt import Concept, Encoder

STARS = [world.Scene((world.Obj("star", "red", "large", "in the center", 0, 0, a, "yellow"),), "plain", c)
         for a, c in ((0.1, "white"), (-0.2, "gray"), (0.3, "black"))]


@pytest.fixture(scope="module")
def pipe():
    return engine.load()


@pytest.fixture(scope="module")
def pixels():
    return torch.from_numpy(world.render_batch(STARS, 64)).float()


def cfg(**kw):
    return multires.TrainConfig(**{"token": "stripy", "init_token": "star", "steps": 6, "batch": 2, "bins": 10,
                                   "checkpoint_every": 2, **kw})


def test_training_moves_only_the_concept_rows(pipe, pixels):
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("text_encoder", pipe.model.text_encoder), ("unet", pipe.model.unet), ("vae", pipe.model.vae))}
    seen = []
    c = multires.train(pipe.model, pixels, cfg(weight_decay=0.5), progress=False, on_step=lambda s, loss: seen.append(loss))
    assert len(seen) == 6 and all(loss > 0 for loss in seen)
    for name, m in (("text_encoder", pipe.model.text_encoder), ("unet", pipe.model.unet), ("vae", pipe.model.vae)):
        assert all(torch.equal(frozen[name][k], v) for k, v in m.state_dict().items()), name  # the table too
    init = pipe.model.text_encoder.text_model.embeddings.token_embedding.weight[pipe.model.tokenizer.ids("star")]
    assert c.embeds.shape == (10, 128) and c.initializer == "star" and c.multires
    assert (c.embeds - init).abs().amax(1).min() > 0  # AdamW moves every row (decay, momentum), as the reference


def test_each_bin_row_learns_only_from_its_own_bin(pipe, pixels):
    """An example's gradient reaches only the row of its time bin, so without weight decay a one-example
    step moves exactly one row (the test above passes on decay alone)."""
    rows = torch.nn.Parameter(torch.randn(10, 128, generator=torch.Generator().manual_seed(0)) * 0.3)
    enc = Encoder(pipe.model.text_pairs, {"stripy": Concept("stripy", rows, True)})
    enc.encode(["a <stripy|3|> star", "<stripy|7|> on white"]).square().sum().backward()
    assert rows.grad[[3, 7]].abs().amax(1).min() > 0
    assert not rows.grad[[0, 1, 2, 4, 5, 6, 8, 9]].any()
    c = multires.train(pipe.model, pixels, cfg(steps=1, batch=1, weight_decay=0.0), progress=False)
    init = pipe.model.text_encoder.text_model.embeddings.token_embedding.weight[pipe.model.tokenizer.ids("star")]
    assert (c.embeds != init).any(1).sum() == 1


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(pipe, pixels, tmp_path):
    whole = multires.train(pipe.model, pixels, cfg(), progress=False)
    ckpt = tmp_path / "run.ckpt.safetensors"

    def kill(step, loss):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        multires.train(pipe.model, pixels, cfg(), checkpoint=ckpt, progress=False, on_step=kill)
    assert ckpt.is_file()  # the step-4 checkpoint: steps 0..3 done
    resumed_steps = []
    resumed = multires.train(pipe.model, pixels, cfg(), tmp_path / "c.safetensors", ckpt, progress=False,
                             on_step=lambda s, loss: resumed_steps.append(s))
    assert resumed_steps == [4, 5]
    assert torch.equal(resumed.embeds, whole.embeds)
    assert not ckpt.exists() and (tmp_path / "c.safetensors").is_file()


def test_a_checkpoint_of_another_run_is_refused(pipe, pixels, tmp_path):
    ckpt = tmp_path / "run.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        multires.train(pipe.model, pixels, cfg(), checkpoint=ckpt, progress=False,
                       on_step=lambda s, loss: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None)
    with pytest.raises(ValueError, match="from another run .* delete it"):
        multires.train(pipe.model, pixels, cfg(lr=1e-2), checkpoint=ckpt, progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(init_token="red star"), "is 2 tokens for this tokenizer; need a single token"),
    (dict(token="<bad>"), "need a bare name"),
    (dict(steps=0), "steps=0"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(templates="poems"), "templates='poems'"),
])
def test_bad_settings_are_clear_errors(pipe, pixels, kw, match):
    with pytest.raises(ValueError, match=match):
        multires.train(pipe.model, pixels, cfg(**kw), progress=False)


def test_files_round_trip_and_export_to_diffusers_format(tmp_path):
    c = Concept("stripy", torch.randn(10, 128), True, "star")
    multires.save_concept(c, tmp_path / "c.safetensors", steps=6)
    (back,) = multires.load_concepts(tmp_path / "c.safetensors")
    assert back.name == "stripy" and back.initializer == "star" and back.multires and torch.equal(back.embeds, c.embeds)
    multires.export_row(c, 3, tmp_path / "learned_embeds.safetensors")
    raw = safetensors.torch.load_file(tmp_path / "learned_embeds.safetensors")
    assert list(raw) == ["<stripy>"] and torch.equal(raw["<stripy>"], c.embeds[3:4])
    (row,) = multires.load_concepts(tmp_path / "learned_embeds.safetensors")
    assert row.name == "stripy" and not row.multires
    safetensors.torch.save_file({"emb_params": torch.randn(2, 128)}, tmp_path / "bad_hands.safetensors")
    (a1111,) = multires.load_concepts(tmp_path / "bad_hands.safetensors")
    assert a1111.name == "bad_hands" and a1111.embeds.shape == (2, 128)


def test_bad_embedding_files_are_clear_errors(pipe, tmp_path):
    torch.save({"<x>": torch.randn(128)}, tmp_path / "x.bin")
    with pytest.raises(LoadError, match="pickled embeddings"):
        multires.load_concepts(tmp_path / "x.bin")
    safetensors.torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(LoadError, match="2048-d vectors but this model's text encoder is 128-d"):
        pipe.load_embeddings(tmp_path / "xl.safetensors")
    safetensors.torch.save_file({"<big>": torch.randn(1, 768)}, tmp_path / "big.safetensors")
    with pytest.raises(LoadError, match="768-d vectors but this model's text encoder is 128-d"):
        pipe.load_embeddings(tmp_path / "big.safetensors")
    safetensors.torch.save_file({"<nan>": torch.full((1, 128), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(LoadError, match="NaN"):
        pipe.load_embeddings(tmp_path / "nan.safetensors")
    with pytest.raises(FileNotFoundError):
        multires.load_concepts(tmp_path / "missing.safetensors")


def test_imported_embeddings_encode_as_diffusers_load_textual_inversion(pipe, tmp_path):
    """Parity: a diffusers learned_embeds file (1 vector) and an A1111 one (3 vectors) give the prompt
    embeddings diffusers' StableDiffusionPipeline.load_textual_inversion gives, on the embedded model."""
    from diffusers import StableDiffusionPipeline

    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"<toy>": torch.randn(1, 128, generator=g) * 0.3}, tmp_path / "toy.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(3, 128, generator=g) * 0.3}, tmp_path / "wide.safetensors")
    ref = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    ref.load_textual_inversion(str(tmp_path / "toy.safetensors"))
    ref.load_textual_inversion(str(tmp_path / "wide.safetensors"), token="<wide>")
    ours = engine.load(embeddings=[tmp_path / "toy.safetensors", tmp_path / "wide.safetensors"])
    for prompt in ("a large <toy> in the center", "a <wide> on the left and a <toy>, on a plain white background"):
        want = ref.encode_prompt(prompt, "cpu", 1, False)[0]
        assert torch.allclose(ours.model.encode_prompt([prompt], None, False), want, atol=1e-5), prompt


def test_cli_trains_exports_and_samples_with_every_mode(tmp_path, cli_error):
    from engine import images

    folder = tmp_path / "concept"
    folder.mkdir()
    for k, im in enumerate(images.to_pil(torch.from_numpy(world.render_batch(STARS, 64)))):
        im.save(folder / f"{k}.png")
    out = tmp_path / "stripy.safetensors"
    assert main(["train-ti", "--images", str(folder), "--token", "stripy", "--init-token", "star", "--steps", "3",
                 "--batch", "2", "--out", str(out), "--quiet"]) == 0
    meta = safetensors.safe_open(str(out), "pt").metadata()
    assert meta["bins"] == "10" and json.loads(meta["run"])["steps"] == 3
    for prompt in ("a large <stripy(3)> in the center", "a <stripy[5]> and S*|0.2|", "a large <stripy>"):
        png = tmp_path / "g.png"
        assert main(["generate", "--prompt", prompt, "--embeddings", str(out), "--steps", "4", "--out", str(png),
                     "--quiet"]) == 0 and png.is_file()
        png.unlink()
    row = tmp_path / "learned_embeds.safetensors"
    assert main(["export-ti", "--embeddings", str(out), "--row", "3", "--out", str(row)]) == 0
    assert main(["img2img", "--image", str(folder / "0.png"), "--prompt", "a <stripy>", "--embeddings", str(row),
                 "--steps", "4", "--out", str(tmp_path / "i.png"), "--quiet"]) == 0
    cli_error(["generate", "--prompt", "a <moon>", "--out", str(tmp_path / "m.png")], "unknown pseudo-word <moon>")
    cli_error(["generate", "--prompt", "a <stripy(3]>", "--embeddings", str(out), "--out", str(tmp_path / "m.png")],
              "malformed pseudo-word '<stripy(3]>'")
    cli_error(["train-ti", "--images", str(tmp_path / "i.png"), "--token", "x", "--init-token", "star", "--out",
               str(tmp_path / "x.safetensors")], "no such folder")
    (tmp_path / "empty").mkdir()
    cli_error(["train-ti", "--images", str(tmp_path / "empty"), "--token", "x", "--init-token", "star", "--out",
               str(tmp_path / "x.safetensors")], "no images")


def test_pseudo_words_work_in_direct_inversion_and_blended_edits():
    """A concept whose every row is the embedding of "blue" edits exactly as the word does, in Direct Inversion's
    `edit` and in the multi-stage blended `edit` (both stages of the cascade): the pseudo-word path composes."""
    from engine import blended, metrics
    from engine.embedded import DEFAULT_UPSCALER

    base, sr = engine.load(), engine.load(DEFAULT_UPSCALER)
    for p in (base, sr):
        table = p.model.text_encoder.text_model.embeddings.token_embedding.weight
        p.model.concepts["C"] = Concept("C", table[p.model.tokenizer.ids("blue")].repeat(10, 1))
    sc = world.scenes(907, 1)[0]
    src = torch.from_numpy(world.render_batch([sc], 64)).float()
    word, concept = "a large blue ring at the top, on a plain gray background", "a large <C> ring at the top, on a plain gray background"
    a, _ = base.edit(src, word, steps=6, output="pt", progress=False)
    b, _ = base.edit(src, concept, steps=6, output="pt", progress=False)
    assert torch.allclose(a, b, atol=1e-4)
    editor = blended.MultiStage(base.model, sr.model, metrics.Scorer.from_pretrained(DEFAULT_MODEL))
    src = torch.from_numpy(world.render_batch([sc], 256)).float()
    mask = (world.masks(sc, 256)[0] >= 0.5).astype("float32")
    opts = blended.Options(steps=4, candidates=1, repaint=1, sr_steps=2, stage_steps=10)
    a, b = (editor.edit(src, mask, p, opts, progress=False).image for p in (word, concept))
    assert torch.allclose(a, b, atol=1e-3) and (a - src).abs().amax() > 0.1
