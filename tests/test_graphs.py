"""Compiled graphs (engine.graphs): the eager model's numbers within rounding, an image the same bytes
whatever else shares its batch, kept on disk for the next process, the weights read at every call,
and the eager model wherever a graph cannot or must not run."""
import json
import time

import pytest
import torch

import engine
from engine import graphs
from engine.models.unet import UNet2DConditionModel, UNetConfig

CHOOSE = graphs.choose  # the `cache` fixture replaces it
CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    cfg = UNetConfig(**CONFIG)
    unet = UNet2DConditionModel(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised outputs would compare zeros
    return unet


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of its own, holding the graphs that the first test compiles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("engine-cache")))
        mp.setenv("ENGINE_COMPILE", "cached")
        mp.setattr(graphs, "choose", lambda *a: "graph")  # the timing is tested on its own below
        graphs.forget()
        yield graphs.cache_dir()
    graphs.forget()


def inputs(images: int, copies: int, seed: int = 0):
    """`images` images' rows, `copies` blocks of them (CFG: 2), at 8² latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 4, 8, 8, generator=g).repeat(copies, 1, 1, 1)
    context = torch.randn(copies * images, 77, 32, generator=g)
    return x, context


def step(unet, x, context, copies):
    with torch.no_grad():
        return unet(x, 500, context, copies=copies)


def refuse_eager(unet, monkeypatch):
    """From now on the eager network fails the test: the graph must have run."""
    monkeypatch.setattr(unet, "body", lambda *a: pytest.fail("the eager network ran"))


def test_graphs_match_the_eager_model_and_are_kept(unet, cache, monkeypatch, capsys):
    x, context = inputs(3, 2)
    monkeypatch.setenv("ENGINE_COMPILE", "off")
    eager = step(unet, x, context, 2)
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    compiled = step(unet, x, context, 2)
    assert "compiling UNet2DConditionModel.body" in capsys.readouterr().err
    assert [p.suffix for p in cache.iterdir()] == [".pt2"]  # one graph: a CFG pair's; no temp file
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(compiled, eager)  # im2col in the graph: other roundings

    graphs.forget()  # a new process: loads the file, compiles nothing
    monkeypatch.setenv("ENGINE_COMPILE", "cached")
    refuse_eager(unet, monkeypatch)
    assert torch.equal(step(unet, x, context, 2), compiled)
    assert "compiling" not in capsys.readouterr().err


@pytest.mark.parametrize("copies", [2, 1], ids=["CFG pairs", "no CFG"])
def test_an_image_is_the_same_bytes_whatever_shares_its_batch(unet, cache, monkeypatch, copies):
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    x, context = inputs(3, copies, seed=1)
    whole = step(unet, x, context, copies)
    refuse_eager(unet, monkeypatch)
    for j in range(3):
        rows = torch.arange(j, 3 * copies, 3)
        alone = step(unet, x[rows], context[rows], copies)
        assert torch.equal(whole[rows], alone), (j, (whole[rows] - alone).abs().max().item())


def test_weights_are_read_at_every_call(unet, cache, monkeypatch):
    """A LoRA merged in place, or any weight changed, after the graph was compiled takes effect."""
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    x, context = inputs(1, 2, seed=2)
    before = step(unet, x, context, 2)
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    try:
        after = step(unet, x, context, 2)
        monkeypatch.setenv("ENGINE_COMPILE", "off")
        eager = step(unet, x, context, 2)
    finally:
        with torch.no_grad():
            unet.conv_out.bias.sub_(1.0)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, eager, rtol=1e-4, atol=1e-5)


def test_no_graph_under_autograd_or_when_off(unet, cache, monkeypatch):
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    x, context = inputs(1, 2, seed=3)
    y = unet(x.requires_grad_(), 500, context, copies=2)  # training: the eager network, differentiable
    assert y.grad_fn is not None
    monkeypatch.setenv("ENGINE_COMPILE", "off")
    with torch.no_grad():
        assert torch.equal(unet(x, 500, context, copies=2), unet(x, 500, context))


def test_a_failed_compile_runs_eagerly_and_leaves_no_file(unet, cache, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    x, context = inputs(1, 2, seed=4)
    x = torch.cat([x, x], dim=-1)  # 8×16 latents: a shape not compiled yet
    files = sorted(cache.iterdir())

    def fail(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch.export, "export", fail)
    y = step(unet, x, context, 2)
    assert "compiling failed (RuntimeError: no compiler here); running eagerly" in capsys.readouterr().err
    monkeypatch.setenv("ENGINE_COMPILE", "off")
    assert torch.equal(y, step(unet, x, context, 2))
    assert sorted(cache.iterdir()) == files

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    graphs.forget()
    monkeypatch.setenv("ENGINE_COMPILE", "on")
    monkeypatch.setattr(torch.export, "export", interrupt)
    with pytest.raises(KeyboardInterrupt):
        step(unet, x, context, 2)
    assert sorted(cache.iterdir()) == files


def test_a_graph_slower_than_the_eager_model_is_not_used(unet, cache, monkeypatch):
    monkeypatch.setattr(graphs, "choose", lambda *a: "eager")
    graphs.forget()
    x, context = inputs(1, 2, seed=5)
    y = step(unet, x, context, 2)
    monkeypatch.setenv("ENGINE_COMPILE", "off")
    assert torch.equal(y, step(unet, x, context, 2))
    graphs.forget()


def test_the_faster_is_chosen_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    assert CHOOSE("a graph", lambda: time.sleep(0.01), lambda: None) == "eager"
    assert CHOOSE("another", lambda: None, lambda: time.sleep(0.01)) == "graph"
    kept = json.loads((tmp_path / "graphs" / "choices.json").read_text())
    assert kept == {"a graph": "eager", "another": "graph"}
    graphs.forget()


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("ENGINE_COMPILE", "always")
    with pytest.raises(ValueError, match=r"ENGINE_COMPILE='always' is not one of \('cached', 'on', 'off'\)"):
        engine.load()
