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
