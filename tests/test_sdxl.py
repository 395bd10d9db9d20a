"""SDXL parts against diffusers on random weights of small configs."""
import pytest
import torch

from engine.checkpoints import load_component

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4
POOLED = 32
XL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=48,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
               attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
               addition_embed_type="text_time", addition_time_embed_dim=8)
IDS = {"base": 6, "refiner": 5}  # original size, crop corner, then target size (base) or aesthetic score (refiner)


def _random(model, scale=0.02):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.mark.parametrize("kind", IDS)
def test_text_time_unet_matches_diffusers(tmp_path, kind):
    torch.manual_seed(0)
    cfg = {**XL_UNET, "projection_class_embeddings_input_dim": POOLED + IDS[kind] * 8}
    ref = _random(diffusers.UNet2DConditionModel(**cfg))
    ref.save_pretrained(tmp_path)
    ours = load_component(tmp_path, "unet")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    ids = torch.tensor([[1024., 1024., 0., 0., 1024., 1024.][:IDS[kind]], [768., 1344., 16., 32., 6., 0.][:IDS[kind]]])
    with torch.no_grad():
        want = ref(x, 500, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = ours(x, 500, ctx, text_embeds=pooled, time_ids=ids)
    assert (got - want).abs().max() <= ATOL
    assert (ours(x, 500, ctx, text_embeds=pooled, time_ids=ids.flip(0)) - got).abs().max() > 1e-3  # ids matter


def test_text_time_unet_needs_its_added_inputs(tmp_path):
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**XL_UNET, projection_class_embeddings_input_dim=POOLED + 48).save_pretrained(tmp_path)
    ours = load_component(tmp_path, "unet")
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 7, 48)
    with pytest.raises(ValueError, match="pass text_embeds"):
        ours(x, 1, ctx)
    with pytest.raises(ValueError, match="5 per image"):
        ours(x, 1, ctx, text_embeds=torch.zeros(1, POOLED), time_ids=torch.zeros(1, 5))


@pytest.mark.parametrize("eos", [2, 49407])
def test_projected_text_encoder_matches_transformers(tmp_path, eos):
    """SDXL's second encoder: the penultimate hidden state and the projected pooled output."""
    transformers = pytest.importorskip("transformers")
    from engine.models.clip import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               hidden_act="gelu", projection_dim=40, eos_token_id=eos, bos_token_id=49406, pad_token_id=1)
    ref = _random(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)))
    ref.save_pretrained(tmp_path)
    ours = load_component(tmp_path, "text_encoder_2")
    assert isinstance(ours, CLIPTextModelWithProjection) and isinstance(ours.config, CLIPTextConfig)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0], [49406, 2368, 49407, 49407, 49407, 49407, 49407]])
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden = ours.hidden_states(ids)
        last = ours.text_model.final_layer_norm(hidden[-1])
        assert len(hidden) == len(want.hidden_states)
        assert (hidden[-2] - want.hidden_states[-2]).abs().max() <= ATOL
        assert (ours.text_embeds(last, ids) - want.text_embeds).abs().max() <= ATOL


PIXEL_TOL = 2 / 255


def _pixels(x):
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("size,negative", [((64, 64), None), ((64, 96), "blurry, st")])
def test_generate_matches_diffusers_sdxl(tiny, size, negative):
    """Two encoders, pooled + size ids, force_zeros_for_empty_prompt (no negative) and a negative prompt."""
    import engine

    folder, ref = tiny("sdxl")
    h, w = size
    want = ref("a red star", negative_prompt=negative, num_inference_steps=8, guidance_scale=6.0, height=h,
               width=w, generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = engine.load(folder).generate("a red star", negative=negative, steps=8, guidance=6.0, seed=3, height=h,
                                       width=w, output="pt", progress=False)
    assert got.shape == want.shape
    assert want.std() > 0.05
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_refiner_img2img_matches_diffusers(tiny):
    """The refiner: bigG alone, the aesthetic score (6 for the prompt, 2.5 for the negative half), encoded ""."""
    import numpy as np
    from PIL import Image

    import engine

    folder, ref = tiny("sdxl_refiner")
    image = Image.fromarray((np.random.RandomState(2).rand(64, 96, 3) * 255).astype(np.uint8))
    want = ref(["a star", "red"], image=image, strength=0.7, num_inference_steps=10, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = engine.load(folder).img2img(image, ["a star", "red"], strength=0.7, steps=10, guidance=5.0, seed=4,
                                      output="pt", progress=False)
    assert (_pixels(got) - want).abs().max().item() <= PIXEL_TOL


def test_sdxl_vae_follows_force_upcast(tiny, tmp_path):
    """In half precision the VAE runs in float32 when its config asks (SDXL's VAE overflows in fp16), else in the
    model's dtype."""
    import json
    import shutil

    import engine
    from engine.checkpoints import read_json

    folder = tiny("sdxl")[0]
    assert read_json(folder / "vae" / "config.json")["force_upcast"] is True
    m = engine.load(folder, dtype=torch.float16).model
    assert m.dtype == torch.float16 and m.vae_dtype == torch.float32
    fixed = shutil.copytree(folder, tmp_path / "fixed")
    cfg = read_json(fixed / "vae" / "config.json")
    (fixed / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    assert engine.load(fixed, dtype=torch.float16).model.vae_dtype == torch.float16


def test_sdxl_folder_components(tiny):
    from engine.checkpoints import load
    from engine.models.clip import CLIPTextModelWithProjection

    base, refiner = load(tiny("sdxl")[0]), load(tiny("sdxl_refiner")[0])
    assert isinstance(base.text_encoder_2, CLIPTextModelWithProjection) and base.tokenizer_2 is not None
    assert base.force_zeros_for_empty_prompt and not refiner.force_zeros_for_empty_prompt
    assert refiner.text_encoder is None and refiner.tokenizer is None


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_sdxl_single_file_matches_folder(tiny, tmp_path, kind):
    """The conditioner layout (CLIP-L at embedders.0.transformer, bigG with its projection at embedders.1.model;
    the refiner's bigG at embedders.0.model) loads to the folder's weights and images. The test-side inverse is
    first checked against diffusers' own converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from safetensors.torch import load_file

    import engine
    from engine.checkpoints import read_json
    from test_single_file import write_single_file

    folder, ref = tiny(kind)
    single = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind)
    sd = load_file(single)
    prefix = "conditioner.embedders.1.model." if kind == "sdxl" else "conditioner.embedders.0.model."
    theirs = convert_open_clip_checkpoint(ref.text_encoder_2, sd, prefix)
    want = ref.text_encoder_2.state_dict()
    assert sorted(theirs) == sorted(k for k in want if not k.endswith("position_ids"))
    assert all(torch.equal(theirs[k], want[k]) for k in theirs)
    theirs = convert_ldm_unet_checkpoint(sd, read_json(folder / "unet" / "config.json"))
    assert all(torch.equal(theirs[k], v) for k, v in ref.unet.state_dict().items())

    a, b = engine.load(folder), engine.load(single, config=folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a.model, name), getattr(b.model, name)
        assert (ma is None) == (mb is None) == (name == "text_encoder" and kind == "sdxl_refiner")
        if ma is not None:
            sa, sb = ma.state_dict(), mb.state_dict()
            assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert b.model.force_zeros == a.model.force_zeros == (kind == "sdxl")
    run = lambda p: p.generate("a red star", steps=3, seed=1, height=64, width=64, output="pt", progress=False)
    assert torch.equal(run(a), run(b))


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_sdxl_single_file_configs_are_read_from_shapes(tiny, tmp_path, kind):
    """With no folder: the family, the text-time embedding and every size the shapes hold (heads do not: the
    family's 64-wide rule applies, which these tiny models do not follow)."""
    from safetensors.torch import load_file

    from engine import ldm
    from engine.checkpoints import read_json
    from test_single_file import write_single_file

    folder, _ = tiny(kind)
    sd = load_file(write_single_file(folder, tmp_path / f"{kind}.safetensors", kind))
    got = ldm.infer_configs(sd)
    assert ldm.family(ldm.split_components(sd)) == kind
    want = read_json(folder / "unet" / "config.json")
    for k in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "in_channels",
              "addition_embed_type", "projection_class_embeddings_input_dim", "addition_time_embed_dim",
              "use_linear_projection"):
        assert list(got["unet"][k]) == list(want[k]) if isinstance(want[k], list) else got["unet"][k] == want[k], k
    per_level = lambda d: [d] * len(want["down_block_types"]) if isinstance(d, int) else list(d)  # noqa: E731
    attn = [i for i, t in enumerate(want["down_block_types"]) if t.startswith("CrossAttn")]
    assert [per_level(got["unet"]["transformer_layers_per_block"])[i] for i in attn] == \
        [per_level(want["transformer_layers_per_block"])[i] for i in attn]
    te2 = read_json(folder / "text_encoder_2" / "config.json")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim"):
        assert got["text_encoder_2"][k] == te2[k], k
    assert ("text_encoder" in got) == (kind == "sdxl")
    assert got["force_zeros_for_empty_prompt"] == (kind == "sdxl")


# ---- the papers on SDXL: the pooled embedding travels with the hidden states through inversion and editing --------

def _photo(h=64, w=64, seed=0):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def test_direct_inversion_on_sdxl_walks_back_at_lambda_one(tiny):
    import engine

    pipe = engine.load(tiny("sdxl")[0])
    x, traj = pipe.edit(_photo(), "a red star", source="a red star", steps=5, guidance=3.0, lam=1.0, output="pt",
                        progress=False)
    assert traj.latents[0].shape == (1, 4, 8, 8)
    assert (x - pipe.model.decode(traj.latents[0])).abs().max() <= 1e-4
    y, _ = pipe.edit(_photo(), ["st", "a red star"], source="a star", steps=5, lam=0.5, output="pt", progress=False)
    assert y.shape == (2, 3, 64, 64) and torch.isfinite(y).all() and (y[0] - y[1]).abs().max() > 1e-3


def test_null_text_inversion_on_sdxl_fits_the_guided_steps(tiny):
    """Null-text inversion optimises the whole packed unconditional embedding (pooled row included): the guided
    step from the inverted latent lands nearer the inversion's next latent than with the plain one."""
    import engine
    from engine import schedule as S
    from engine.denoiser import constant

    pipe = engine.load(tiny("sdxl")[0])
    m = pipe.model
    traj = pipe.invert(_photo(64, 96, 1), "a star", steps=6, null_text="fast", guidance=5.0, progress=False)
    assert len(traj.uncond) == 6 and traj.uncond[0].shape == (1, 78, 64)  # 77 tokens and the pooled row
    emb = m.encode_prompt(["a star"], None, True)
    den = m.denoiser(5.0)
    with torch.no_grad():
        (t, t_prev), x_t = traj.sampling_pairs[0], traj.latents[-1]
        loss = lambda u: (S.ddim_step(m.scheduler, den(x_t, t, constant(torch.cat([u, emb[1:]]))), t, t_prev,  # noqa: E731
                                      x_t)[0] - traj.latents[-2]).square().mean().item()
        assert loss(traj.uncond[0]) < 0.5 * loss(emb[:1])
    assert torch.isfinite(pipe.reconstruct(traj, "a star", output="pt", progress=False)).all()


def test_blend_runs_on_sdxl_and_keeps_the_outside(tiny):
    import engine
    from test_inpaint import blend_128

    res, src, mask = blend_128(engine.load(tiny("sdxl")[0]).model, repaint=1)
    assert [s.shape[-1] for s in res.stages] == [64, 128]
    assert torch.equal(res.image * (1 - mask), src * (1 - mask))
    assert (res.image - src).abs().mul(mask).mean() > 0.02


def test_textual_inversion_on_sdxl_learns_a_vector_per_encoder(tiny, tmp_path):
    import engine
    from engine import multires

    pipe = engine.load(tiny("sdxl")[0])
    m = pipe.model
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = multires.TrainConfig(token="tok", init_token="star", bins=2, steps=4, batch=2, lr=1e-2)
    c = multires.train(m, pixels, cfg, out=tmp_path / "tok.safetensors", progress=False)
    start = [te.text_model.embeddings.token_embedding.weight[tok.ids("star")[0]] for tok, te in m.text_pairs]
    assert c.embeds.shape == (2, 32 + 32)
    for half, s in zip(c.embeds.split(32, 1), start):
        assert (half - s).abs().max() > 1e-4  # both encoders' vectors learned
    assert pipe.load_embeddings(tmp_path / "tok.safetensors") == ["tok"]
    assert pipe.model.concepts["tok"].widths == (32, 32)
    multires.export_row(c, 1, tmp_path / "row.safetensors")  # A1111's SDXL layout
    from safetensors.torch import load_file

    row = load_file(tmp_path / "row.safetensors")
    assert torch.equal(torch.cat([row["clip_l"], row["clip_g"]], 1), c.embeds[1:2])
    x = pipe.generate(["a <tok|1|> st", "a <tok> st"], steps=2, output="pt", progress=False)
    assert torch.isfinite(x).all() and (x[0] - x[1]).abs().max() > 0
    emb = m.encode_prompt(["a <tok|0|> st"])
    assert emb.shape == (1, 78, 64)
    # force_zeros_for_empty_prompt holds with pseudo-words too, fixed or changing with t
    assert (m.encode_prompt(["a <tok|0|> st"], None, True)[0] == 0).all()
    cond = m.prompt_cond(["a <tok> st"], None, True)
    assert all((cond(t)[0] == 0).all() and (cond(t)[1] != 0).any() for t in (999, 10))
    assert (m.prompt_cond(["a <tok> st"], [""], True)(999)[0] != 0).any()


def test_sdxl_embedding_files_load_as_both_encoders_vectors(tiny, tmp_path):
    """An A1111 SDXL embedding ({clip_l, clip_g}) holding the vectors of the token "red" in each encoder encodes as
    the word itself: the pseudo-word path (input vectors, eos found for the pooled output) equals the token path."""
    from safetensors.torch import save_file

    import engine

    pipe = engine.load(tiny("sdxl")[0])
    m = pipe.model
    vectors = {}
    for name, (tok, te) in zip(("clip_l", "clip_g"), m.text_pairs):
        (i,) = tok.ids("red")
        vectors[name] = te.text_model.embeddings.token_embedding.weight[i:i + 1].clone()
    save_file(vectors, str(tmp_path / "look.safetensors"))
    assert pipe.load_embeddings(tmp_path / "look.safetensors") == ["look"]
    for text in ("a <look> star", "<look>"):
        got = m.encode_prompt([text], None, False)
        want = m.encode_prompt([text.replace("<look>", "red")], None, False)
        assert got.shape == (1, 78, 64) and (got - want).abs().max() <= 1e-5, text


@pytest.mark.parametrize("command", ["invert", "edit", "train-ti", "blend"])
def test_papers_commands_run_on_sdxl(tiny, tmp_path, command):
    """Each paper's command end to end on the random SDXL folder."""
    import numpy as np
    from PIL import Image

    from engine.cli import main

    _photo(64, 64, 3).save(tmp_path / "in.png")
    image, out = str(tmp_path / "in.png"), str(tmp_path / "out")
    args = {
        "invert": ["--image", image, "--prompt", "a star", "--steps", "3", "--null-text", "fast",
                   "--out", out + ".safetensors"],
        "edit": ["--image", image, "--prompt", "a red star", "--source", "a star", "--steps", "3",
                 "--out", out + ".png"],
        "train-ti": ["--images", str(tmp_path / "images"), "--token", "tok", "--init-token", "star", "--steps", "2",
                     "--bins", "2", "--batch", "1", "--resolution", "64", "--out", out + ".safetensors"],
        "blend": ["--image", image, "--mask", str(tmp_path / "m.png"), "--prompt", "a red star", "--size", "128",
                  "--steps", "2", "--candidates", "1", "--repaint", "0", "--upscale-with", "bicubic",
                  "--stage-model", "base", "--stage-steps", "4", "--out", out + ".png"],
    }[command]
    (tmp_path / "images").mkdir()
    _photo(64, 64, 4).save(tmp_path / "images" / "a.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main([command, "--model", str(tiny("sdxl")[0]), *args, "--quiet"]) == 0
    assert any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_sdxl_refiner_takes_a_clip_g_embedding_and_a_missing_encoder_is_named(tiny, tmp_path):
    import json
    import shutil

    from safetensors.torch import save_file

    import engine
    from engine.checkpoints import LoadError

    save_file({"clip_g": torch.randn(2, 32)}, str(tmp_path / "look.safetensors"))
    refiner = engine.load(tiny("sdxl_refiner")[0])
    assert refiner.load_embeddings(tmp_path / "look.safetensors") == ["look"]  # named by its file
    assert refiner.model.encode_prompt(["a <look> st"]).shape == (1, 78, 32)
    with pytest.raises(LoadError, match="32-d vectors but this model's text encoders are 32\\+32-d"):
        engine.load(tiny("sdxl")[0]).load_embeddings(tmp_path / "look.safetensors")
    broken = shutil.copytree(tiny("sdxl")[0], tmp_path / "broken")
    index = json.loads((broken / "model_index.json").read_text())
    del index["tokenizer"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="text encoders give 32-wide states but the UNet attends to 64"):
        engine.load(broken)
