"""Parity of engine.models.clip with transformers' CLIPTextModel (test-only reference), fp32, max abs diff <= 1e-4.
transformers 5 saves CLIPTextModel without the `text_model.` key prefix; the 4.x layout is tested separately."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.models.clip import CLIPTextConfig, CLIPTextModel

ATOL = 1e-4
VOCAB = 1000


def _reference(tmp_path, hidden_act: str, eos_token_id: int):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, projection_dim=16,
    )
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


def _ours(folder) -> CLIPTextModel:
    cfg = CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True, assign=True)
    return model.eval()


def _prompts(eos: int) -> torch.Tensor:
    """SD-style batch: bos, tokens, eos, then eos padding; eos at different positions per row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 1, (3, 77), generator=g)
    for row, n in enumerate((5, 40, 76)):
        ids[row, 0], ids[row, n:] = VOCAB - 2, eos
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [VOCAB - 1, 2])  # 2 = legacy configs, pooled at argmax(input_ids)
def test_matches_transformers(tmp_path, hidden_act, eos_token_id):
    ref = _reference(tmp_path, hidden_act, eos_token_id)
    ours = _ours(tmp_path)
    ids = _prompts(VOCAB - 1)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        penultimate = ref.final_layer_norm(out.hidden_states[-2])  # transformers 5: no .text_model
        last = ours(ids)
        torch.testing.assert_close(last, out.last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(ids, skip_last_layers=1), penultimate, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.pooled(last, ids), out.pooler_output, atol=ATOL, rtol=0)


def test_inputs_embeds_replace_token_lookup(tmp_path):
    _reference(tmp_path, "quick_gelu", VOCAB - 1)
    ours = _ours(tmp_path)
    ids = _prompts(VOCAB - 1)
    with torch.no_grad():
        embeds = ours.text_model.embeddings.token_embedding(ids)
        torch.testing.assert_close(ours(inputs_embeds=embeds), ours(ids), atol=0, rtol=0)


def test_transformers4_layout_loads(tmp_path):
    """transformers 4.x files (hub SD text encoders): `text_model.` prefix, maybe a position_ids buffer."""
    ref = _reference(tmp_path, "quick_gelu", VOCAB - 1)
    sd = {"text_model." + k: v for k, v in load_file(tmp_path / "model.safetensors").items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, tmp_path / "model.safetensors")
    ids = _prompts(VOCAB - 1)
    with torch.no_grad():
        torch.testing.assert_close(_ours(tmp_path)(ids), ref(ids).last_hidden_state, atol=ATOL, rtol=0)


def test_unsupported_hidden_act_raises():
    d = transformers.CLIPTextConfig(hidden_act="quick_gelu").to_dict() | {"hidden_act": "relu"}
    with pytest.raises(ValueError, match=r"hidden_act='relu'.*\['gelu', 'quick_gelu'\]"):
        CLIPTextConfig.from_dict(d)


def test_bad_skip_and_overlong_input_raise():
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="skip_last_layers"):
        model(torch.zeros(1, 77, dtype=torch.long), skip_last_layers=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("image_size", [32, 48])
def test_full_clip_checkpoint_scores_match_transformers(tmp_path, image_size):
    """A transformers CLIPModel folder (text + ViT image tower + projections) as the CLIP scorer: embeddings and
    scores match CLIPModel fed CLIP's normalisation of the same pixels (images already image_size² here, so our
    crop / resize is the identity)."""
    from conftest import write_vocab
    from engine.metrics import Scorer

    tok = write_vocab(tmp_path)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24)
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = Scorer.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, image_size, image_size, generator=g) * 2 - 1
    texts = ["a red star", "star", "re d st ar red"]
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ours.visual.MEAN, ours.visual.STD))
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(ours.encode_image(x), out.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.texts(texts), out.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.score(x, texts), 100 * (out.image_embeds * out.text_embeds).sum(-1), atol=1e-2, rtol=0)
    assert ours.logit_scale.item() == pytest.approx(ref.logit_scale.item())
    # another size is centre-cropped and resized to image_size first
    assert ours.encode_image(torch.rand(1, 3, 50, 70, generator=g)).shape == (1, 24)
