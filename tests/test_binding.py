"""The binding task of `shapes` (num_objects=2/3): per-object labels, distinct colours, clauses in random order, two
held-out levels (descriptions, pairings) and swapped-binding twins; large objects never hide small ones."""

import re

import pytest
import torch

from sorabench.config import ConfigError, compose_config
from sorabench.data.binding import SWAPPABLE, composition_flags, heldout_pairs, triple_ids
from sorabench.data.shapes import ATTRIBUTE_NAMES, RGB, ShapesConfig, ShapesDataset, heldout_triples, make_split, \
    parse_caption, render

SIZES = {"train": 3000, "val": 400, "test": 64, "unseen": 100}


def cfg(k=2, **kw):
    return ShapesConfig(num_objects=k, split_sizes=SIZES, **kw)


def words(caption):
    return sorted(re.findall(r"[a-z]+", caption))


def as_dicts(labels):
    return sorted((dict(zip(ATTRIBUTE_NAMES, obj.tolist())) for obj in labels), key=lambda d: d["colour"])


@pytest.mark.parametrize("k", [2, 3])
def test_every_object_has_its_labels_and_a_clause_in_random_order(k):
    split = make_split(cfg(k), "train")
    assert split.labels.shape == (SIZES["train"], k, 5)
    assert all(len(set(c)) == k for c in split.labels[:, :, 0].tolist())  # distinct colours name the objects
    orders = set()
    for labels, caption in zip(split.labels[:200], split.captions[:200]):
        parsed = parse_caption(caption)
        assert sorted(parsed, key=lambda d: d["colour"]) == as_dicts(labels)  # each clause is one object, whole
        orders.add(tuple(d["colour"] for d in parsed) == tuple(labels[:, 0].tolist()))
    assert orders == {True, False}  # clauses are not always in object order
    item = ShapesDataset(cfg(k), "val")[0]
    assert item["labels"].shape == (k, 5) and {"unseen", "unseen_pair", "twin"} <= set(item)


def test_held_out_descriptions_and_pairings_never_train_and_are_flagged():
    c = cfg()
    held, pairs = heldout_triples(c), heldout_pairs(heldout_triples(c), c.holdout_pair_fraction, c.seed)
    train = make_split(c, "train")
    ids = triple_ids(train.labels, held.shape[1], held.shape[2])
    assert not held.flatten()[ids].any() and not pairs[ids[:, 0], ids[:, 1]].any()
    assert not train.unseen.any() and not train.unseen_pair.any()
    val = make_split(c, "val")
    description, pairing = composition_flags(val.labels, held, pairs)
    assert torch.equal(description, val.unseen) and torch.equal(pairing, val.unseen_pair)
    assert 0.1 < val.unseen.float().mean() < 0.45 and 0.1 < val.unseen_pair.float().mean() < 0.45
    # an unseen pairing is made of descriptions every one of which the training split shows
    seen_ids = set(ids.flatten().tolist())
    vids = triple_ids(val.labels, held.shape[1], held.shape[2])
    assert all(i in seen_ids for i in vids[val.unseen_pair].flatten().tolist())
    unseen = make_split(c, "unseen")
    held_out = unseen.unseen | unseen.unseen_pair
    assert held_out[::2].all() and held_out.float().mean() > 0.6  # base clips all; a twin keeps its own flags


def test_twins_exchange_one_attribute_with_the_same_words():
    val = make_split(cfg(), "val")
    assert torch.equal(val.twin[val.twin], torch.arange(len(val.twin)))  # paired both ways
    for i in range(0, 60, 2):
        a, b = val.labels[i], val.labels[i + 1]
        diff = [attr for attr in range(5) if not torch.equal(a[:, attr], b[:, attr])]
        assert len(diff) == 1 and diff[0] in SWAPPABLE  # colour names the object; one attribute moved
        attr = diff[0]
        assert a[0, attr] == b[1, attr] and a[1, attr] == b[0, attr] and a[0, attr] != a[1, attr]
        assert words(val.captions[i]) == words(val.captions[i + 1])  # the same words
        assert val.captions[i] != val.captions[i + 1]  # bound otherwise


@pytest.mark.parametrize("k", [1, 2])
def test_fixed_attributes_are_constant_and_left_out_of_captions(k):
    from sorabench.metrics.alignment import attribute_accuracy
    from sorabench.metrics.binding import binding_scores

    fixed = {"size": "large", "speed": "slow"}
    split = make_split(cfg(k, fixed=fixed), "val")
    assert split.labels[..., 2].eq(1).all() and split.labels[..., 4].eq(0).all()
    vocabulary = {"small", "little", "tiny", "large", "big", "slowly", "quickly", "slow", "fast", "pace"}
    assert not any(vocabulary & set(words(c)) for c in split.captions)
    assert not any(c.startswith(",") or "  " in c for c in split.captions)  # "{speed}, a ..." loses its comma
    for labels, caption in zip(split.labels[:50], split.captions[:50]):  # every other word is where it was
        parsed = parse_caption(caption)
        kept = [{a: d[a] for a in ("colour", "shape", "direction")} for d in parsed]
        assert sorted(kept, key=lambda d: d["colour"]) == [{a: d[a] for a in kept[0]} for d in as_dicts(labels)]
    if k == 2:  # twins still exchange one attribute, now only shape or direction
        diff = (split.labels[0::2] != split.labels[1::2]).any(1)  # (pairs, 5)
        assert diff[:, [2, 4]].sum() == 0 and (diff.sum(1) == 1).all()
        # chance: a constant attribute is not guessed (1/1), the others still are
        assert binding_scores(split.labels, split.labels)["bind_chance_all"] == pytest.approx((1 / 6 / 3 / 4) ** 2)
    else:
        n = len(split.labels)
        logits = {a: torch.zeros(n, k) for a, k in zip(ATTRIBUTE_NAMES, (6, 3, 2, 4, 2))}
        chance = attribute_accuracy(logits, split.labels[:, 0], split.unseen, ATTRIBUTE_NAMES)["chance_uniform"]
        assert chance["size"] == 1.0 and chance["speed"] == 1.0 and chance["shape"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="data.fixed.shape"):
        cfg(k, fixed={"shape": "circle"})
    with pytest.raises(ConfigError, match="data.fixed.size='huge'"):
        cfg(k, fixed={"size": "huge"})


@pytest.mark.parametrize("small_first", [True, False])
def test_a_small_object_is_drawn_over_a_large_one(small_first):
    c = cfg(position_range=0.0, num_frames=2)  # both start at the centre and move alike: they overlap
    small, large = [0, 0, 0, 1, 0], [2, 1, 1, 1, 0]  # a small red circle, a large blue square, both moving right
    labels = torch.tensor([[small, large] if small_first else [large, small]])
    video = render(c, labels, torch.Generator().manual_seed(0)).float() / 255
    centre = video[0, :, 0, 16, 16]
    assert torch.allclose(centre, RGB[0], atol=0.02)  # red, whichever object comes first


def test_a_binding_run_trains_and_is_scored_object_by_object(tmp_path):
    from sorabench.training.dit_run import train
    from tests.conftest import TINY

    c = compose_and_check(tmp_path, *TINY, "mlflow.enabled=false")
    m = train(c)["metrics"]
    for key in ("eval/bind_all", "eval/bind_object", "eval/bind_shape", "eval/bind_twins", "eval/real_bind_all",
                "eval/noise_bind_all", "eval/ceiling_bind_all", "eval/fvd", "eval/bind_count", "eval/bind_swap",
                "eval/bind_swap_share_chance", "eval/real_bind_count", "eval/ceiling_bind_swap"):
        assert 0 <= m[key] == m[key], key  # present and not NaN
    assert "eval/acc_all" not in m  # single-object alignment does not apply to two-object prompts
    assert m["eval/bind_chance_all"] == pytest.approx((1 / (6 * 3 * 2 * 4 * 2)) ** 2)
    # one evaluator, trained for this data config on the objects' colour layers (ObjectLayers: one object per item)
    evaluator_runs = list((tmp_path / "train_evaluator").iterdir())
    assert len(evaluator_runs) == 1
    with pytest.raises(ConfigError, match="data.num_objects=4"):
        ShapesConfig(num_objects=4)


def test_colour_layers_take_each_object_apart():
    """The binding instrument's first step: the colour layers of a two-object clip are the two objects drawn alone -
    they add up to the clip wherever the objects do not overlap, and each holds nothing of the other's colour."""
    from sorabench.metrics.binding import MIN_COVERAGE, colour_layers

    c = ShapesConfig(num_objects=2)
    labels = torch.tensor([[[0, 0, 1, 0, 0], [2, 1, 1, 3, 1]], [[4, 2, 0, 1, 1], [5, 0, 1, 2, 0]]])
    video = render(c, labels, torch.Generator().manual_seed(0)).float() / 127.5 - 1  # (2, 3, T, H, W) in [-1, 1]
    layers = (colour_layers(video, labels[:, :, 0]) + 1) / 2  # (2, K, 3, T, H, W) in [0, 1]
    x = (video + 1) / 2
    # pixels of one colour (or background); the others are edges where one object is drawn over the other
    hue = torch.nn.functional.cosine_similarity(x[:, None], RGB.view(1, 6, 3, 1, 1, 1), dim=2).amax(1)
    pure = (x.norm(dim=1) < 0.01) | (hue > 0.999)
    assert float(pure.double().mean()) > 0.98
    err = (layers.sum(1) - x).abs().amax(1)  # (2, T, H, W)
    assert float(err[pure].max()) <= MIN_COVERAGE + 0.005  # all but the faintest anti-aliasing fringe
    assert float(layers.amax()) > 0.5  # both objects were found
    for k in range(2):  # the layer of colour k holds only that colour
        rgb = RGB[labels[:, k, 0]].view(2, 3, 1, 1, 1)
        on = layers[:, k].sum(1, keepdim=True) > 0.05
        cosine = torch.nn.functional.cosine_similarity(layers[:, k], rgb.expand_as(layers[:, k]), dim=1)
        assert bool((cosine[on[:, 0]] > 0.99).all())


def test_object_layers_are_each_object_alone_with_its_own_labels():
    from sorabench.metrics.binding import ObjectLayers, colour_layers

    clips = ShapesDataset(cfg(2), "test")
    layers = ObjectLayers(clips)
    assert len(layers) == 2 * len(clips)
    for j in (0, 1, 7, 2 * len(clips) - 1):
        item, clip = layers[j], clips[j // 2]
        assert torch.equal(item["labels"], clip["labels"][j % 2])
        expected = colour_layers(clip["video"][None], clip["labels"][None, :, 0])[0, j % 2]
        assert torch.equal(item["video"], expected)
        # the layer shows only this object's colour: its lit pixels point at that palette colour
        lit = (item["video"] + 1).norm(dim=0) > 0.2
        rgb = RGB[item["labels"][0]].view(3, 1, 1, 1)
        assert bool(lit.any())
        cos = torch.nn.functional.cosine_similarity((item["video"] + 1) / 2, rgb.expand(3, *lit.shape), dim=0)
        assert bool((cos[lit] > 0.99).all())


def compose_and_check(tmp_path, *overrides):
    from sorabench.training.dit_run import validate_train_config

    c = compose_config("train", [f"outputs={tmp_path}", "data.num_objects=2", *overrides], command="train")
    validate_train_config(c)
    return c


def test_three_object_captions_need_a_longer_text_encoder():
    from sorabench.training.dit_run import check_caption_lengths

    over = ["data.num_objects=3", "data.split_sizes.train=512"]
    with pytest.raises(ConfigError, match=r"text_encoder.max_length=32 cuts \d+ of 512 training captions"):
        check_caption_lengths(compose_config("train", over))
    check_caption_lengths(compose_config("train", [*over, "text_encoder.max_length=64"]))  # reads every clause
    check_caption_lengths(compose_config("train", ["data.num_objects=2"]))  # 2 objects fit in 32


def test_swap_errors_count_an_attribute_put_on_the_other_object():
    from sorabench.metrics.binding import binding_scores, swap_errors

    # two prompts, two objects each: (colour, shape, size, direction, speed)
    labels = torch.tensor([[[0, 0, 1, 0, 0], [2, 1, 1, 3, 0]],    # shapes differ, sizes equal, directions differ
                           [[4, 2, 0, 1, 1], [5, 2, 1, 2, 1]]])   # shapes equal, sizes differ, directions differ
    read = labels.clone()
    read[0, 0, 1] = 1  # object 0 drawn with object 1's shape: a binding error
    read[0, 1, 3] = 1  # object 1 moving right: wrong, but no other object of the prompt moves right
    read[1, 0, 2] = 1  # object 0 drawn large like object 1: a binding error
    s = swap_errors(read, labels)
    # shape differs between objects only in prompt 0: 2 cases, 1 swap
    assert s["bind_swap_shape"] == 0.5 and s["bind_wrong_shape"] == 0.5
    assert s["bind_swap_size"] == 0.5  # size differs only in prompt 1
    assert s["bind_wrong_direction"] == 0.25 and s["bind_swap_direction"] == 0.0
    assert "bind_swap_colour" not in s and "bind_swap_speed" not in s  # colour names objects; speeds all equal
    assert s["bind_swap"] == pytest.approx(2 / 8) and s["bind_wrong"] == pytest.approx(3 / 8)
    assert s["bind_swap_share"] == pytest.approx(2 / 3)
    # a uniform wrong guess: shape 1 of the 2 other shapes, size 1 of 1, direction 1 of 3
    assert s["bind_swap_share_chance"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert swap_errors(labels, labels)["bind_swap"] == 0.0 and "bind_swap_share" not in swap_errors(labels, labels)
    scores = binding_scores(read, labels, counts=torch.tensor([2, 1]))
    assert scores["bind_count"] == 0.5 and scores["bind_swap_shape"] == 0.5


@pytest.mark.parametrize("k", [2, 3])
def test_count_objects_sees_real_objects_and_not_their_blended_edges(k):
    """Read without the prompt: every clip of a split whose objects all show an interior is counted right; a clip
    with one object less (drawn without it) is counted one less; blank and noise show no object."""
    from sorabench.metrics.binding import count_objects

    c = cfg(k, position_range=1.0)  # objects rarely hide each other (the real counts at 0.25 are in the README)
    split = make_split(c, "val")
    video = split.videos[:200].float() / 127.5 - 1
    counts = count_objects(video)
    assert float((counts == k).double().mean()) >= 0.97 and int(counts.max()) == k  # no stray colour is an object
    fewer = render(c, split.labels[:200, 1:], torch.Generator().manual_seed(0)).float() / 127.5 - 1
    assert float((count_objects(fewer) == k - 1).double().mean()) >= 0.97
    assert count_objects(-torch.ones(2, 3, 8, 32, 32)).tolist() == [0, 0]
    noise = torch.randn(8, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert int(count_objects(noise).max()) == 0
