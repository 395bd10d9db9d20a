"""Tiny random SD-family models saved with diffusers / transformers `save_pretrained` (the references)."""
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels' tests run on the CPU interpreter; set before `import engine.kernels`
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The three families the engine must load: SD 1.x, SD 2.x, and the x4 upscaler, shrunk.
UNETS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=48,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, upcast_attention=True),
    "x4": dict(block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=16, in_channels=7,
               cross_attention_dim=48, norm_num_groups=8, num_class_embeds=1000,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               only_cross_attention=[True, True, False], attention_head_dim=8, use_linear_projection=True),
    # SDXL: level 0 without attention, two transformer layers at level 1, the text-time embedding
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=64,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8),
    # the refiner: bigG only (context 32 here), aesthetic score in place of the target size
    "sdxl_refiner": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=2,
                         attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                         addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=32 + 5 * 8),
}
TEXT = {
    "sd1": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
    "x4": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
    "sdxl": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 hidden_act="quick_gelu"),
}
TEXT_2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
              projection_dim=32)  # SDXL's OpenCLIP bigG, shrunk
VAES = {
    "sd1": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "sd2": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "x4": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
               scaling_factor=0.08333, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3),
}
VAES["sdxl"] = VAES["sdxl_refiner"] = {**VAES["sd1"], "scaling_factor": 0.13025}
# SD inpainting: the latent, the mask and the masked image's latent in
UNETS["sd1_inpaint"], TEXT["sd1_inpaint"], VAES["sd1_inpaint"] = {**UNETS["sd1"], "in_channels": 9}, TEXT["sd1"], VAES["sd1"]
SCHEDULERS = {
    "sd1": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"),
    "sd2": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
    "x4": dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
}
SCHEDULERS["sdxl"] = SCHEDULERS["sdxl_refiner"] = {**SCHEDULERS["sd1"], "timestep_spacing": "leading"}
SCHEDULERS["sd1_inpaint"] = SCHEDULERS["sd1"]


def write_vocab(folder, pad="<|endoftext|>"):
    """A character-level CLIP vocabulary (printable ASCII, with and without </w>) plus a few merges."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.printable.strip()))
    vocab = {}
    for c in chars + [c + "</w>" for c in chars] + ["re", "red</w>", "st", "star</w>", "<|startoftext|>",
                                                      "<|endoftext|>"]:
        vocab.setdefault(c, len(vocab))
    merges = ["#version: 0.2", "r e", "re d</w>", "s t", "st a", "sta r</w>"]
    vocab["sta"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def _perturb(model, scale=0.02):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _text_encoder(cls, tok, **cfg):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=len(tok.get_vocab()), max_position_embeddings=77,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **cfg)).eval()


def make_pipeline(kind: str, folder):
    """Save a tiny diffusers pipeline of the given family into `folder` and return the diffusers object."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed({"sd1": 1, "sd2": 2, "x4": 3, "sdxl": 4, "sdxl_refiner": 5, "sd1_inpaint": 6}[kind])
    unet = _perturb(UNet2DConditionModel(**UNETS[kind]).eval())
    vae = _perturb(AutoencoderKL(latent_channels=4, **VAES[kind]).eval())
    vocab = Path(tempfile.mkdtemp())
    tok = write_vocab(vocab, pad="<|endoftext|>" if kind in ("sd1", "sdxl", "sd1_inpaint") else "!")
    sched = DDIMScheduler(**SCHEDULERS[kind])
    tokenizers = {"tokenizer": vocab}
    if kind.startswith("sdxl"):
        vocab_2 = Path(tempfile.mkdtemp())
        tok_2 = write_vocab(vocab_2, pad="!")
        text_2 = _perturb(_text_encoder(CLIPTextModelWithProjection, tok_2, **TEXT_2))
        tokenizers = {"tokenizer_2": vocab_2}
        if kind == "sdxl":
            tokenizers["tokenizer"] = vocab
            text = _perturb(_text_encoder(CLIPTextModel, tok, **TEXT[kind]))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                             tokenizer_2=tok_2, unet=unet, scheduler=sched, add_watermarker=False)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
                                                    tokenizer_2=tok_2, unet=unet, scheduler=sched,
                                                    requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                    add_watermarker=False)
    elif kind == "x4":
        text = _text_encoder(CLIPTextModel, tok, **TEXT[kind])
        low = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
        pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                              low_res_scheduler=low, scheduler=sched, max_noise_level=350)
    else:
        text = _text_encoder(CLIPTextModel, tok, **TEXT[kind])
        cls = StableDiffusionInpaintPipeline if kind == "sd1_inpaint" else StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub, src in tokenizers.items():  # transformers 5 writes only tokenizer.json; hub SD folders have both
        for name in ("vocab.json", "merges.txt"):
            (folder / sub / name).write_bytes((src / name).read_bytes())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Caches of this run only: no graph or measured choice a user made earlier changes what is
    tested."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("engine-cache")))
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """kind -> (folder, diffusers pipeline), built once per test session."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            cache[kind] = (folder, make_pipeline(kind, folder))
        return cache[kind]
    return get


@pytest.fixture
def cli_error(tmp_path, capsys):
    """check(argv, match): the command exits 2 with one `error: …` line containing `match`, and writes nothing
    into tmp_path (no output, no temporary left)."""
    from engine.cli import main

    def check(argv, match):
        before = set(tmp_path.iterdir())
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
        assert set(tmp_path.iterdir()) == before
    return check
