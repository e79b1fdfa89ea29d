"""The memorisation metric on clips whose answer is known: copies of train clips, fresh real clips, and noise."""

import math

import torch

from sorabench.data.shapes import ShapesConfig, make_split
from sorabench.metrics.memorisation import Memorisation, label_keys, nearest
from sorabench.metrics.registry import EvalSetup, build_metric

SIZES = {"train": 256, "val": 16, "test": 16, "unseen": 16, "final": 64}


def clips(split):
    return split.videos.float() / 127.5 - 1.0


def scored(train, labels, real, fake):
    def train_batches():
        for i in range(0, len(train.videos), 64):
            yield clips(train)[i : i + 64], train.labels[i : i + 64, 0]

    metric = build_metric("memorisation", EvalSetup({}, labels=labels, extra={"train_batches": train_batches}))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()


def test_copies_of_train_clips_are_flagged_and_fresh_clips_are_not():
    cfg = ShapesConfig(split_sizes=SIZES)
    train, final = make_split(cfg, "train"), make_split(cfg, "final")
    labels, keys = final.labels[:, 0], label_keys(train.labels[:, 0])
    # a perfect memoriser: for each final prompt with a same-label train clip, that train clip itself
    twin = [keys.index(k) if k in keys else None for k in label_keys(labels)]
    keep = torch.tensor([i for i, j in enumerate(twin) if j is not None])
    copies = clips(train)[[twin[i] for i in keep.tolist()]]
    memo = scored(train, labels[keep], real=clips(final)[keep], fake=copies)
    assert memo["memo_nn_fake"] < 1e-3 < memo["memo_nn_real"]
    assert memo["memo_copy_share"] == 1.0 and memo["memo_ratio"] < 0.01
    # generated = fresh clips of the same descriptions (the final split, never in train): as new as real ones
    fresh = scored(train, labels, real=clips(final), fake=clips(final))
    assert math.isclose(fresh["memo_ratio"], 1.0, rel_tol=1e-6)
    assert fresh["memo_copy_share"] < 0.1
    assert 0 < fresh["memo_n_fake"] == fresh["memo_n_real"] < len(labels) + 1


def test_label_keys_treat_objects_as_a_set_and_nearest_is_rms():
    a = torch.tensor([[[1, 2, 0, 3, 1], [4, 0, 1, 2, 0]]])
    b = a.flip(1)  # the same two objects, listed the other way round
    assert label_keys(a) == label_keys(b)
    x, bank = torch.zeros(1, 4), torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(nearest(x, bank), torch.tensor([1.0]))
    assert math.isinf(float(nearest(x, bank[:0])[0]))


def test_not_built_without_train_clips_or_labels():
    assert Memorisation.from_setup(EvalSetup({}, labels=torch.zeros(4, 5, dtype=torch.long))) is None


def test_a_run_logs_memorisation_on_the_final_split(tiny_overrides):
    # Through the real train command: metrics.extra=[memorisation] scores the final split's prompts against train.
    from sorabench.config import compose_config
    from sorabench.training.dit_run import train

    cfg = compose_config("train", [*tiny_overrides, "name=memo", "metrics.extra=[memorisation]",
                                   "metrics.real_split=final"], command="train")
    metrics = train(cfg)["metrics"]
    assert metrics["eval/memo_n_fake"] > 0 and metrics["eval/memo_n_real"] == metrics["eval/memo_n_fake"]
    assert 0 < metrics["eval/memo_nn_real"] and math.isfinite(metrics["eval/memo_ratio"])
