"""Reading images of the world back from their pixels: right on true renders, wrong on changed ones."""
import numpy as np
import pytest

from engine import judge, world


def rates(ss, images, phrases=None, striped=False):
    hits = {}
    for k, (s, im) in enumerate(zip(ss, images)):
        r = judge.read(im, striped)
        for attr, v in judge.named(judge.check(r, s, phrases[k] if phrases else None)).items():
            hits.setdefault(attr, []).extend(v)
    return {a: float(np.mean(v)) for a, v in hits.items()}


@pytest.mark.parametrize("res, n", [(64, 80), (256, 12)])
def test_true_renders_read_back(res, n):
    ss = world.scenes(11, n)
    r = rates(ss, [world.render(s, res) for s in ss])
    assert r["bg_colour"] == 1.0 and r["colour"] == 1.0 and r["position"] == 1.0
    assert r["shape"] >= 0.97 and r["size"] >= 0.97, r  # an object partly hidden by the other may misread


def test_striped_objects_read_back():
    """Read as striped, half the objects of true renders striped: on one-object scenes (two objects that touch
    read as one) the stripes' colour is read on large objects (stripes 4 px wide at 64²) and no stripes on plain
    ones; on small striped ones (2.3 px) it is not bound."""
    ss = [s for s in world.striped(world.scenes(13, 160), 13, 0.5) if len(s.objects) == 1]
    hits = {(size, bool(stripes)): [] for size in world.SIZES for stripes in (0, 1)}
    for s in ss:
        c = judge.check(judge.read(world.render(s, 64), striped=True), s)
        assert set(c) == {"colour", "shape", "size", "position", "stripes", "bg_colour"}
        for o, hit in zip(s.objects, c["stripes"]):
            hits[o.size, o.stripes is not None].append(hit)
    rate = {k: float(np.mean(v)) for k, v in hits.items()}
    assert min(len(v) for v in hits.values()) >= 15, {k: len(v) for k, v in hits.items()}
    assert rate["large", True] >= 0.95 and rate["large", False] >= 0.95 and rate["small", False] >= 0.95, rate
    r = rates(ss, [world.render(s, 64) for s in ss], striped=True)
    assert r["colour"] == 1.0 and r["shape"] >= 0.9, r
    assert "stripes" not in judge.check(judge.read(world.render(ss[0], 64)), ss[0])  # plain reading: no key


def test_changed_scenes_read_as_changed():
    """The render of a scene with one attribute changed fails the original scene's check on that attribute."""
    ss = [s for s in world.scenes(12, 60) if len(s.objects) == 1][:30]
    for attr, values in (("colour", list(world.COLOURS)), ("shape", list(world.SHAPES))):
        wrong = []
        for s in ss:
            o = s.objects[0]
            other = next(v for v in values if v != getattr(o, attr) and v != s.bg_colour)
            wrong.append(world.render(s.replace(0, **{attr: other}), 64))
        assert rates(ss, wrong)[attr] <= 0.05, attr
    moved = [world.render(s.replace(bg_colour=next(c for c in world.BG_COLOURS
                                                   if c not in (s.bg_colour, s.objects[0].colour))), 64) for s in ss]
    assert rates(ss, moved)["bg_colour"] == 0.0


def test_only_named_attributes_are_checked():
    s = world.Scene((world.Obj("star", "red", "large", "on the left"),), "striped", "blue")
    p = world.Phrase("a red star", sizes=(False,), positions=(False,), bg_colour=False, background=False)
    moved = s.replace(0, position="on the right", size="small").replace(bg_colour="white")
    c = judge.check(judge.read(world.render(moved, 64)), s, p)
    assert c == {"colour": [True], "shape": [True], "size": [None], "position": [None], "bg_colour": None}
    assert judge.check(judge.read(world.render(moved, 64)), s)["position"] == [False]


def test_border_measures_a_frame():
    s = world.Scene((world.Obj("circle", "red", "small", "in the center"),), "plain", "blue")
    img = world.render(s, 64)
    assert judge.border(img) == 0.0
    framed = img.copy()
    framed[:2], framed[-2:], framed[:, :2], framed[:, -2:] = 1.0, 1.0, 1.0, 1.0
    assert judge.border(framed) > 0.3
    assert judge.read(framed).bg_colour == "blue"  # a frame does not decide the background


def test_each_found_object_stands_for_one_named_object():
    pair = world.Scene((world.Obj("circle", "red", "large", "on the left"),
                        world.Obj("square", "red", "large", "on the right")), "plain", "white")
    unplaced = world.Phrase("a red circle and a red square", (False, False), (False, False), False, False)
    assert judge.check(judge.read(world.render(pair, 64)), pair, unplaced)["shape"] == [True, True]
    alone = world.Scene(pair.objects[:1], "plain", "white")
    c = judge.check(judge.read(world.render(alone, 64)), pair, unplaced)
    assert sorted(c["colour"]) == [False, True]


def test_a_place_is_the_nearest_world_position():
    s = world.Scene((world.Obj("circle", "red", "small", "in the center", dx=-0.035),), "plain", "white")
    left = s.replace(0, position="on the left", dx=0.0)
    assert judge.check(judge.read(world.render(s, 64)), left)["position"] == [False]
    assert judge.check(judge.read(world.render(s, 64)), s)["position"] == [True]
