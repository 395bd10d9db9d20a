"""The procedural world: deterministic, resolution-independent, captions and masks that match the scene."""
import math

import numpy as np
import pytest

from engine import world


def test_scenes_and_renders_are_deterministic():
    a, b = world.scenes(7, 20), world.scenes(7, 20)
    assert a == b and a != world.scenes(8, 20)
    for s in a[:5]:
        assert np.array_equal(world.render(s, 64), world.render(s, 64))


def test_vocabulary_is_covered():
    ss = world.scenes(0, 2000)
    objs = [o for s in ss for o in s.objects]
    assert {o.shape for o in objs} == set(world.SHAPES) and len(world.SHAPES) >= 5
    assert {o.colour for o in objs} == set(world.COLOURS) and len(world.COLOURS) >= 8
    assert {s.background for s in ss} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in ss} == {1, 2}
    assert all(s.bg_colour not in {o.colour for o in s.objects} for s in ss)


def test_caption_names_every_attribute():
    s = world.Scene((world.Obj("star", "red", "large", "on the left"),), "striped", "blue")
    assert s.caption() == "a large red star on the left, on a striped blue background"


@pytest.mark.parametrize("seed", range(6))
def test_resolutions_agree(seed):
    """A 256² render box-filtered to 64² is the 64² render up to anti-aliasing differences at edges."""
    s = world.scenes(seed, 1)[0]
    big = world.render(s, 256).reshape(64, 4, 64, 4, 3).mean((1, 3))
    small = world.render(s, 64)
    assert np.abs(big - small).mean() < 0.02
    assert 0 <= small.min() and small.max() <= 1


@pytest.mark.parametrize("window", [(0, 0, 64), (40, 8, 24), (100, 72, 28)])
def test_a_window_is_that_square_of_the_whole_render(window):
    x, y, side = window
    for s in world.scenes(11, 10):  # every background style and shape among them
        assert np.array_equal(world.render(s, 128, window), world.render(s, 128)[y:y + side, x:x + side])
    with pytest.raises(ValueError, match="inside a 128² render"):
        world.render(s, 128, (x + 128 - side + 1, y, side))


def test_masks_cover_the_shape_area():
    o = world.Obj("circle", "red", "large", "in the center")
    s = world.Scene((o,), "plain", "white")
    m = world.masks(s, 256)
    r = world.SIZES["large"]
    assert m.shape == (1, 256, 256)
    assert abs(m.sum() / 256**2 - math.pi * r * r) < 0.002
    pixels = world.render(s, 256)[m[0] > 0.99]
    assert np.allclose(pixels, np.array(world.COLOURS["red"]) / 255, atol=1e-6)


def test_later_objects_occlude_earlier_masks():
    s = world.Scene((world.Obj("square", "red", "large", "on the left", dx=0.1),
                     world.Obj("circle", "blue", "large", "on the right", dx=-0.1)), "plain", "white")
    m = world.masks(s, 128)
    assert m[0].sum() > 0 and m[1].sum() > 0 and (m.sum(0) <= 1 + 1e-6).all()


def test_replace_changes_one_attribute_only():
    s = world.scenes(3, 1)[0]
    t = s.replace(0, colour="green" if s.objects[0].colour != "green" else "red")
    assert t.objects[0].shape == s.objects[0].shape and t.objects[1:] == s.objects[1:]
    assert t.background == s.background and t.caption() != s.caption()
    changed = np.abs(world.render(t, 64) - world.render(s, 64)).max(-1) > 1e-6
    assert np.array_equal(changed, world.masks(s, 64)[0] > 0)  # the edit touches exactly the object's pixels
    assert s.replace(None, bg_colour="gray").bg_colour == "gray"


def test_stripes_paint_two_colours_inside_the_shape_only():
    plain = world.Scene((world.Obj("star", "red", "large", "in the center"),), "plain", "white")
    striped = plain.replace(0, stripes="yellow")
    a, b = world.render(plain, 128), world.render(striped, 128)
    cover = world.masks(plain, 128)[0]
    inside, outside = cover > 0.999, cover == 0
    assert np.array_equal(a[outside], b[outside])
    colours = {tuple(np.round(p * 255).astype(int)) for p in b[inside]}
    assert {world.COLOURS["red"], world.COLOURS["yellow"]} <= colours
    assert 0.3 < (np.abs(b[inside] - np.array(world.COLOURS["yellow"]) / 255).sum(-1) < 0.01).mean() < 0.7
    assert striped.caption() == plain.caption()  # no caption names the stripes


def test_phrasings_name_what_they_say_they_name():
    ss = world.scenes(3, 300)
    for i, s in enumerate(ss):
        p = world.phrase(s, np.random.default_rng(i))
        text = p.text.lower()
        for o, size, pos in zip(s.objects, p.sizes, p.positions):
            assert any(w in text.split() for w in world.COLOUR_WORDS.get(o.colour, (o.colour,)))
            assert any(w in text for w in world.SHAPE_WORDS[o.shape])
            words = text.replace(",", " ").replace(".", " ").split()
            if size or len(s.objects) == 1:  # with two objects, the other one's size may be named
                assert size == any(w in words for w in world.SIZE_WORDS[o.size])
            assert pos == any(w in text for w in world.POSITION_WORDS[o.position])
        words = text.replace(",", " ").replace(".", " ").split()
        # the background's colour is never an object's, so its word appears only when it is named
        assert p.bg_colour == any(w in words for w in world.COLOUR_WORDS.get(s.bg_colour, (s.bg_colour,)))
        assert p.background == any(w in words for w in world.BACKGROUND_WORDS[s.background])


def test_phrasing_draws_do_not_depend_on_the_scene():
    """The same generator state words a scene with one attribute changed the same way (hard negatives)."""
    for i, s in enumerate(world.scenes(4, 100)):
        o = s.objects[0]
        colour = next(c for c in world.COLOURS if c not in (o.colour, s.bg_colour))
        a = world.phrase(s, np.random.default_rng(i))
        b = world.phrase(s.replace(0, colour=colour), np.random.default_rng(i))
        assert (a.sizes, a.positions, a.bg_colour, a.background) == (b.sizes, b.positions, b.bg_colour, b.background)
        assert len(a.text.split()) == len(b.text.split())
        assert a.text != b.text


def test_phrasings_use_every_word():
    texts = " ".join(c for cs in world.phrasings(world.scenes(5, 3000), 5, 3) for c in cs).lower()
    tables = (world.SIZE_WORDS, world.SHAPE_WORDS, world.COLOUR_WORDS, world.POSITION_WORDS, world.BACKGROUND_WORDS)
    missing = [w for t in tables for ws in t.values() for w in ws if w not in texts]
    assert not missing
    assert world.phrasings(world.scenes(5, 3), 5, 3) == world.phrasings(world.scenes(5, 3), 5, 3)
    assert all(cs[0] == s.caption() for cs, s in zip(world.phrasings(world.scenes(5, 3), 5, 3), world.scenes(5, 3)))


def test_stripes_are_neither_the_object_nor_the_background_colour():
    ss = world.striped(world.scenes(14, 200), 14, 0.5)
    assert [s.caption() for s in ss] == [s.caption() for s in world.scenes(14, 200)]
    objs = [(o, s) for s in ss for o in s.objects]
    share = np.mean([o.stripes is not None for o, _ in objs])
    assert 0.4 < share < 0.6
    assert all(o.stripes not in (o.colour, s.bg_colour) for o, s in objs if o.stripes)
    plain = world.scenes(14, 5)
    assert world.striped(plain, 14, 0.0) == plain


def test_a_stripes_word_names_striped_objects_only_and_changes_nothing_else():
    ss = world.striped(world.scenes(15, 100), 15, 0.5)
    plain, named = world.phrasings(ss, 15, 3), world.phrasings(ss, 15, 3, "<w>")
    for s, ps, ns in zip(ss, plain, named):
        marks = [f" with {o.stripes} <w>" for o in s.objects if o.stripes]
        for p, n in zip(ps, ns):
            assert n.count("<w>") == len(marks)
            for m in marks:
                assert m in n
                n = n.replace(m, "", 1)
            assert n == p
