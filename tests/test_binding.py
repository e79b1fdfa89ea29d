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


@pytest.mark.parametrize("small_first", [True, False])
def test_a_small_object_is_drawn_over_a_large_one(small_first):
    c = cfg(position_range=0.0, num_frames=2)  # both start at the centre and move alike: they overlap
    small, large = [0, 0, 0, 1, 0], [2, 1, 1, 1, 0]  # a small red circle, a large blue square, both moving right
    labels = torch.tensor([[small, large] if small_first else [large, small]])
    video = render(c, labels, torch.Generator().manual_seed(0)).float() / 255
    centre = video[0, :, 0, 16, 16]
    assert torch.allclose(centre, RGB[0], atol=0.02)  # red, whichever object comes first


def test_binding_data_trains_and_its_scoring_is_refused_in_one_line(tmp_path):
    from sorabench.training.commands import train
    from tests.conftest import TINY

    with pytest.raises(ConfigError, match="data.num_objects=2: the binding task's data is built"):
        compose_and_check(tmp_path, "evaluate.enabled=true")
    c = compose_and_check(tmp_path, *TINY, "evaluate.enabled=false", "mlflow.enabled=false")
    result = train(c)
    assert result["ckpt"] and result["metrics"]["val/loss"] > 0
    with pytest.raises(ConfigError, match="data.num_objects=4"):
        ShapesConfig(num_objects=4)


def compose_and_check(tmp_path, *overrides):
    from sorabench.training.commands import validate_train_config

    c = compose_config("train", [f"outputs={tmp_path}", "data.num_objects=2", *overrides], command="train")
    validate_train_config(c)
    return c
