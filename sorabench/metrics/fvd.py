"""FVD as a streaming torchmetrics Metric, FID/KID on frames (registered as `fvd`, `fid`, `kid`), and the cache of
real statistics.

FVD streams, per distribution, the float64 sums Σf and Σf·fᵀ and the count n of the features f of every clip:
constant memory, and sums reduce across processes by addition (DDP). At the end

    μ = Σf / n,    Σ = (Σf·fᵀ − n·μμᵀ) / (n − 1)      (the unbiased sample covariance, as torchmetrics' FID)

and FVD is the Fréchet distance between N(μ_real, Σ_real) and N(μ_gen, Σ_gen).

Every FVD moves with its protocol (feature network, clip counts, frames, stride, resolution, real split, seed), so
real statistics are cached under a key made of exactly those fields (`protocol_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from sorabench.files import atomic_save
from sorabench.metrics.frechet import frechet_distance
from sorabench.metrics.registry import EvalSetup, register


@register("fvd")
class FrechetVideoDistance(Metric):
    """Fréchet video distance with a pluggable clip feature network.

    Args:
        feature: nn.Module mapping clips (B, C, T, H, W) in [-1, 1] to (B, F) features, with an int `num_features`
            (every `sorabench.metrics.features` network has one).
        reset_real_features: as in torchmetrics' FID: when False, `reset()` keeps the real statistics, so they are
            computed (or loaded from the cache) once and reused for every model and seed.

    Use `update(videos, real=True/False)` and `compute()`; not `forward`, which would score one batch alone.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    needs_real = True  # False once the real statistics came from the cache

    @classmethod
    def from_setup(cls, setup: EvalSetup) -> FrechetVideoDistance | None:
        """With the real statistics of this protocol from `metrics.stats_cache_dir` when an earlier evaluation left
        them there (then no real clip is read); else they are computed and written there by `compute`."""
        if setup.video_net is None:
            return None  # images (num_frames: 1): FID/KID only
        metric = cls(setup.video_net)
        cache_dir = setup.config.get("stats_cache_dir")
        cached = load_real_statistics(cache_dir, setup.fields) if cache_dir else None
        if cached is not None:
            metric.set_real_statistics(**cached)
        metric.needs_real = cached is None
        metric.save_real_to = (cache_dir, dict(setup.fields)) if cached is None and cache_dir else None
        return metric

    def __init__(self, feature: nn.Module, reset_real_features: bool = False, **kwargs):
        super().__init__(**kwargs)
        num_features = getattr(feature, "num_features", None)
        if not isinstance(num_features, int):
            raise TypeError("FrechetVideoDistance: the feature network must expose an int `num_features`")
        if getattr(feature, "per_frame", False):
            raise ValueError("FrechetVideoDistance needs one feature row per clip; got a per-frame network")
        self.feature = feature
        self.num_features = num_features
        self.reset_real_features = reset_real_features
        for kind in ("real", "fake"):
            self.add_state(f"{kind}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{kind}_outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{kind}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, real: bool) -> None:
        with torch.no_grad():
            features = self.feature(videos).double()
        if features.shape != (videos.shape[0], self.num_features):
            raise ValueError(
                f"the feature network returned {tuple(features.shape)} for {videos.shape[0]} clips; "
                f"expected ({videos.shape[0]}, {self.num_features})"
            )
        kind = "real" if real else "fake"
        getattr(self, f"{kind}_sum").add_(features.sum(0))
        getattr(self, f"{kind}_outer").add_(features.T @ features)
        getattr(self, f"{kind}_n").add_(features.shape[0])

    def _mean_cov(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = getattr(self, f"{kind}_n")
        if n < 2:
            raise RuntimeError(f"FVD needs at least 2 {kind} clips, got {int(n)}")
        mean = getattr(self, f"{kind}_sum") / n
        cov = (getattr(self, f"{kind}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> torch.Tensor:
        if getattr(self, "save_real_to", None):
            save_real_statistics(*self.save_real_to, self.real_statistics())
            self.save_real_to, self.needs_real = None, False
        mu_real, sigma_real = self._mean_cov("real")
        mu_fake, sigma_fake = self._mean_cov("fake")
        return torch.tensor(frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake), dtype=torch.float64)

    def reset(self) -> None:
        real = self.real_statistics() if not self.reset_real_features else None
        super().reset()
        if real is not None:
            self.set_real_statistics(**real)

    def real_statistics(self) -> dict[str, torch.Tensor]:
        """A copy of the real sums, for the cache: {sum (F,), outer (F, F), n ()}, float64/long on the CPU."""
        return {name: getattr(self, f"real_{name}").cpu().clone() for name in ("sum", "outer", "n")}

    def set_real_statistics(self, sum: torch.Tensor, outer: torch.Tensor, n: torch.Tensor | int) -> None:
        """Replace the real sums with copies of these (e.g. from the cache).

        States are summed across processes, so in a distributed run set them on one rank only.
        """
        d = self.num_features
        if tuple(sum.shape) != (d,) or tuple(outer.shape) != (d, d):
            raise ValueError(f"real statistics of shape {tuple(sum.shape)}, {tuple(outer.shape)} for {d} features")
        # Copies, so that later updates never write into the caller's tensors.
        self.real_sum = sum.to(self.real_sum, copy=True)
        self.real_outer = outer.to(self.real_outer, copy=True)
        self.real_n = torch.as_tensor(n).to(self.real_n, copy=True)


def clips_to_frames(videos: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W) in [-1, 1] -> frames (B·T, C, H, W) in [0, 1], what torchmetrics' FID/KID take."""
    return ((videos.clamp(-1.0, 1.0) + 1.0) / 2.0).transpose(1, 2).flatten(0, 1)


class FrameFeatures(nn.Module):
    """Adapter between torchmetrics' FID/KID and a per-frame feature network.

    torchmetrics with `normalize=True` hands a custom network float frames (N, C, H, W) in [0, 1] unchanged; the
    feature networks take clips in [-1, 1], so each frame becomes a one-frame clip.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if not getattr(net, "per_frame", False):
            raise ValueError("FID/KID need a per-frame feature network (per_frame=True)")
        self.net = net
        self.num_features = net.num_features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net((frames * 2.0 - 1.0).unsqueeze(2))


@register("fid")
class FrameFID(FrechetInceptionDistance):
    """torchmetrics' FID over the frames of clips, with a per-frame feature network: update with clips."""

    def __init__(self, net: nn.Module, reset_real_features: bool = False, **kwargs):
        super().__init__(feature=FrameFeatures(net), normalize=True, reset_real_features=reset_real_features, **kwargs)

    @classmethod
    def from_setup(cls, setup: EvalSetup) -> FrameFID | None:
        return cls(setup.frame_net) if setup.frame_net is not None else None

    def update(self, videos: torch.Tensor, real: bool) -> None:
        super().update(clips_to_frames(videos), real=real)


def kid_subset_size(n_real: int, n_fake: int, default: int = 1000) -> int:
    """KID's subset size: torchmetrics' default (1000), capped by the smaller sample (it refuses larger subsets)."""
    size = min(default, n_real, n_fake)
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {n_real} and {n_fake}")
    return size


@register("kid")
class FrameKID(KernelInceptionDistance):
    """torchmetrics' KID over the frames of clips (update with clips); the counts are frames (clips x frames per
    clip), which cap the subset size. `compute()` -> {kid, kid_std}."""

    def __init__(self, net: nn.Module, n_real_frames: int, n_fake_frames: int, subsets: int = 100,
                 max_subset_size: int = 1000, reset_real_features: bool = False, **kwargs):
        super().__init__(feature=FrameFeatures(net), subsets=subsets,
                         subset_size=kid_subset_size(n_real_frames, n_fake_frames, max_subset_size),
                         normalize=True, reset_real_features=reset_real_features, **kwargs)

    @classmethod
    def from_setup(cls, setup: EvalSetup) -> FrameKID | None:
        if setup.frame_net is None:
            return None
        m, t = setup.config, int(setup.config["num_frames"])
        return cls(setup.frame_net, int(m["n_real"]) * t, int(m["n_samples"]) * t, subsets=int(m["kid_subsets"]),
                   max_subset_size=int(m.get("kid_subset_size", 1000)))

    def update(self, videos: torch.Tensor, real: bool) -> None:
        super().update(clips_to_frames(videos), real=real)

    def compute(self) -> dict[str, torch.Tensor]:
        mean, std = super().compute()
        return {"kid": mean, "kid_std": std}

    @staticmethod
    def ranked_keys(keys: list[str]) -> list[str]:
        return ["kid"]  # its standard deviation over subsets is a spread, not a score


# The fields that define an FVD/FID protocol; `protocol_key` takes exactly these.
PROTOCOL_FIELDS = (
    "feature_net",  # the feature network's id (network and input protocol)
    "feature_sha256",  # its weights
    "n_real",  # clips used for the real statistics
    "n_generated",  # clips generated per model and seed
    "num_frames",
    "frame_stride",
    "clip_start",  # where the frames of a real clip start: first | center | random (generated clips: frame 0)
    "resolution",
    "real_split",  # which data the real statistics come from, e.g. "shapes/test"
    "seed",
)


def _canonical(fields: Mapping) -> str:
    missing = [k for k in PROTOCOL_FIELDS if k not in fields]
    extra = sorted(set(fields) - set(PROTOCOL_FIELDS))
    if missing or extra:
        raise ValueError(f"protocol fields: missing {missing}, unexpected {extra}; expected {list(PROTOCOL_FIELDS)}")
    return json.dumps({k: fields[k] for k in PROTOCOL_FIELDS}, sort_keys=True, separators=(",", ":"))


def protocol_key(fields: Mapping) -> str:
    """A stable hash (20 hex digits) of exactly the PROTOCOL_FIELDS; any change of any field changes it."""
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()[:20]


def save_real_statistics(cache_dir: str | Path, fields: Mapping, stats: Mapping[str, torch.Tensor]) -> Path:
    """Write `stats` ({sum, outer, n}, see `FrechetVideoDistance.real_statistics`) to <cache_dir>/<key>.pt."""
    path = Path(cache_dir) / f"{protocol_key(fields)}.pt"
    payload = {"protocol": _canonical(fields), **{k: stats[k] for k in ("sum", "outer", "n")}}
    atomic_save(payload, path)  # a concurrent reader sees the old file or the new one, never half of one
    return path


def load_real_statistics(cache_dir: str | Path, fields: Mapping) -> dict[str, torch.Tensor] | None:
    """The cached real statistics of this protocol, or None when there are none yet."""
    path = Path(cache_dir) / f"{protocol_key(fields)}.pt"
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["protocol"] != _canonical(fields):
        raise ValueError(f"{path} holds statistics of another protocol: {payload['protocol']}")
    return {k: payload[k] for k in ("sum", "outer", "n")}
