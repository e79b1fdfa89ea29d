"""Memorisation: are generated clips copies of training clips?

With narrow start positions every seen label combination has a handful of train clips a few pixels apart, so a model
could score well by replaying them. For each clip we take the distance to its **nearest train clip with the same
labels** (every attribute of every object; objects compared as a set) and compare generated clips with real clips of
the reported split, which no model saw: the real clips' figure is what "new clip of this description" looks like.

    d(x) = min over train clips t with labels(t) = labels(x) of  sqrt(mean((x - t)^2))    (pixels in [-1, 1])

Logged (`eval/memo_*`): `nn_fake` and `nn_real` (mean d over clips that have a same-label train clip: seen
compositions), `ratio` = nn_fake / nn_real (well below 1: closer to train than new real clips are), `copy_share`
(share of generated clips closer to a train clip than the 5th percentile of the real clips' d; about 0.05 when
generated clips are as new as real ones), and `nn_any_fake` / `nn_any_real` (nearest train clip whatever its labels),
plus the counts. Clips are compared at half resolution (2x2 average pool): copies stay copies, memory stays small.
These numbers describe a run; the report prints them and ranks nothing by them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from sorabench.metrics.registry import EvalSetup, register

COPY_QUANTILE = 0.05  # generated clips below this quantile of the real clips' distances count as copies


def label_keys(labels: torch.Tensor) -> list[tuple]:
    """One hashable key per clip: (A,) labels as a tuple; (K, A) objects as a sorted tuple (the set of objects)."""
    if labels.dim() == 2:
        return [tuple(row.tolist()) for row in labels]
    return [tuple(sorted(tuple(obj.tolist()) for obj in clip)) for clip in labels]


def shrink(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) in [-1, 1] -> (B, C*T*H/2*W/2) float32, 2x2 average-pooled per frame."""
    b, c, t, h, w = video.shape
    frames = video.float().transpose(1, 2).reshape(b * t, c, h, w)
    if h >= 2 and w >= 2:
        frames = F.avg_pool2d(frames, 2)
    return frames.reshape(b, -1)


def nearest(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """RMS distance of each row of x (N, D) to its nearest row of bank (M, D); +inf where bank is empty."""
    if bank.shape[0] == 0:
        return torch.full((x.shape[0],), math.inf)
    d2 = (x.pow(2).sum(1, keepdim=True) - 2 * x @ bank.T + bank.pow(2).sum(1)).clamp_min(0)
    return (d2.min(1).values / x.shape[1]).sqrt()


@register("memorisation")
class Memorisation(Metric):
    higher_is_better = False  # closer to train is more copying; no key is ranked (ranked_keys), so no direction is claimed
    full_state_update = False

    def __init__(self, train_batches, labels: torch.Tensor):
        super().__init__()
        self._train_batches, self.labels = train_batches, labels
        self.bank: torch.Tensor | None = None
        self.groups: dict[tuple, torch.Tensor] = {}
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.add_state("fake_any", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("real_any", default=[], dist_reduce_fx="cat")
        self.seen_fake = self.seen_real = 0

    @classmethod
    def from_setup(cls, setup: EvalSetup):
        train = setup.extra.get("train_batches")
        if train is None or setup.labels is None or setup.labels.numel() == 0:
            return None  # needs the train clips and the prompts' labels (shapes)
        return cls(train, setup.labels)

    def ranked_keys(self, keys):
        return []

    def _index(self):
        """The train clips, shrunk, and per label key the rows that carry it (built once, on first use)."""
        clips, keys = [], []
        for video, labels in self._train_batches():
            clips.append(shrink(video))
            keys += label_keys(labels)
        self.bank = torch.cat(clips)
        rows: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)
        self.groups = {key: torch.tensor(ids) for key, ids in rows.items()}

    def _distances(self, video: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            self._index()
        x = shrink(video)
        keys = label_keys(self.labels[start : start + len(x)])
        same = torch.full((len(x),), math.inf)
        for key in set(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            if key in self.groups:
                same[rows] = nearest(x[rows], self.bank[self.groups[key]])
        return same, nearest(x, self.bank)

    def update(self, video: torch.Tensor, real: bool) -> None:
        start = self.seen_real if real else self.seen_fake
        n = max(0, min(len(video), len(self.labels) - start))  # clips past the prompts' labels are not scored
        if n == 0:
            return
        same, any_ = self._distances(video[:n], start)
        if real:
            self.real.append(same), self.real_any.append(any_)
            self.seen_real += len(video)
        else:
            self.fake.append(same), self.fake_any.append(any_)
            self.seen_fake += len(video)

    def compute(self) -> dict[str, float]:
        def cat(xs):
            return torch.cat(xs) if xs else torch.empty(0)

        fake, real = cat(self.fake), cat(self.real)
        fake, real = fake[torch.isfinite(fake)], real[torch.isfinite(real)]
        nn_fake = float(fake.mean()) if len(fake) else math.nan
        nn_real = float(real.mean()) if len(real) else math.nan
        threshold = float(torch.quantile(real, COPY_QUANTILE)) if len(real) else math.nan
        return {
            "memo_nn_fake": nn_fake, "memo_nn_real": nn_real,
            "memo_ratio": nn_fake / nn_real if nn_real > 0 else math.nan,
            "memo_copy_share": float((fake < threshold).double().mean()) if len(fake) and len(real) else math.nan,
            "memo_nn_any_fake": float(cat(self.fake_any).mean()) if self.fake_any else math.nan,
            "memo_nn_any_real": float(cat(self.real_any).mean()) if self.real_any else math.nan,
            "memo_n_fake": float(len(fake)), "memo_n_real": float(len(real)),
        }
