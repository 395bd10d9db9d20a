"""An image does not depend on what else shares its batch: a batch of prompts with one seed each gives,
bit for bit, the images each prompt gives alone with its seed (what a server's request batching relies on)."""
import pytest
import torch

import engine
from engine.models.unet import UNet2DConditionModel, UNetConfig

PROMPTS = ["a red circle", "blue star, yellow background", "(a big green triangle:1.2) in the middle"]
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def pipe():
    return engine.load()


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_sde"])
def test_generate_batch_equals_alone(pipe, sampler):
    kw = dict(steps=8, guidance=5.0, output="pt", progress=False, sampler=sampler)
    batch = pipe.generate(PROMPTS, seed=SEEDS, **kw)
    for i, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
        alone = pipe.generate(p, seed=s, **kw)[0]
        assert torch.equal(batch[i], alone), (sampler, i, (batch[i] - alone).abs().max().item())
    assert not torch.equal(batch[0], batch[1])


def test_img2img_batch_equals_alone(pipe):
    starts = pipe.generate(PROMPTS[:2], seed=[7, 8], steps=4, guidance=5.0, progress=False)
    kw = dict(strength=0.6, steps=8, guidance=5.0, output="pt", progress=False)
    batch = pipe.img2img(starts, ["a red star", "a blue ring"], seed=[1, 2], **kw)
    for i, (im, p, s) in enumerate(zip(starts, ["a red star", "a blue ring"], [1, 2])):
        assert torch.equal(batch[i], pipe.img2img(im, p, seed=s, **kw)[0]), i


def test_seed_list_must_match_prompts(pipe):
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        pipe.generate(PROMPTS, seed=[1, 2], steps=2, progress=False)


CONFIGS = {
    # wide enough at 8² latents for the im2col convolution (engine.kernels.conv.im2col_applies)
    "sd_wide": dict(block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=32,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "x4": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, in_channels=7,
               norm_num_groups=8, num_class_embeds=1000, attention_head_dim=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4,
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """The arithmetic (and where a library's changes with the batch size) depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_a_batch_of_8_equals_alone(pipe, threads):
    kw = dict(steps=4, guidance=5.0, output="pt", progress=False)
    batch = pipe.generate(["a red circle"] * 8, seed=list(range(8)), **kw)
    for i in (0, 7):
        assert torch.equal(batch[i], pipe.generate("a red circle", seed=i, **kw)[0]), i


@pytest.mark.parametrize("kind", CONFIGS)
def test_unet_rows_do_not_depend_on_the_batch(kind, threads):
    """A CFG pair alone (batch 2) and the same pair inside a batch of 16 give the same rows."""
    torch.manual_seed(0)
    cfg = UNetConfig(**CONFIGS[kind])
    unet = UNet2DConditionModel(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised outputs would compare zeros
    b = 16
    x = torch.randn(b, cfg.in_channels, 8, 8)
    kw = dict(context=torch.randn(b, 77, 32))
    if kind == "x4":
        kw["class_labels"] = torch.tensor(20)
    if kind == "sdxl":  # rows differ: the pooled text embedding is each prompt's own
        kw.update(text_embeds=torch.randn(b, 16), time_ids=torch.tensor([64., 64, 0, 0, 64, 64]).repeat(b, 1))
    with torch.no_grad():
        whole = unet(x, 500, **kw)
        pair = unet(x[2:4], 500, **{k: v[2:4] if torch.is_tensor(v) and v.dim() else v for k, v in kw.items()})
    assert whole.abs().mean() > 0
    assert torch.equal(whole[2:4], pair), (whole[2:4] - pair).abs().max().item()
