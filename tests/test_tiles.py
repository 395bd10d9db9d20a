"""Tiled denoising: exact where the model is pointwise, seamless coverage, CFG halves kept in order."""
import pytest
import torch

from engine.denoiser import Denoiser, constant
from engine.tiles import Tiled, ramp, starts


class Pointwise(torch.nn.Module):
    """A 'UNet' whose output at a pixel depends only on that pixel, t, the text and the class label."""

    def forward(self, x, t, context, class_labels=None, copies=1):
        text = context.mean((1, 2))[:, None, None, None]
        label = 0 if class_labels is None else class_labels.float()[:, None, None, None]
        return torch.sin(x[:, :4] * 3) + x[:, 4:].sum(1, keepdim=True) * 0.1 + text + 0.01 * label + 1e-3 * t


@pytest.mark.parametrize("size,tile,overlap", [(64, 64, 16), (40, 16, 4), (33, 16, 5)])
def test_starts_cover_with_overlap(size, tile, overlap):
    s = starts(size, tile, overlap)
    assert s[0] == 0 and s[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))


def test_ramp_is_positive_and_flat_inside():
    w = ramp(16, 4)
    assert w.min() > 0 and w[5:11, 5:11].eq(1).all() and w[0, 0] == pytest.approx(1 / 25)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_tiled_equals_untiled_for_a_pointwise_model(guidance):
    g = torch.Generator().manual_seed(0)
    x, concat = torch.randn(2, 4, 40, 28, generator=g), torch.randn(2, 3, 40, 28, generator=g)
    emb = torch.randn(4 if guidance > 1 else 2, 5, 8, generator=g)
    den = Denoiser(Pointwise(), guidance, concat=concat, class_labels=torch.tensor([20, 20]))
    want = den(x, 500, constant(emb))
    got = Tiled(den, tile=16, overlap=4, batch=3)(x, 500, constant(emb))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        Tiled(Denoiser(Pointwise()), tile=16, overlap=16)
