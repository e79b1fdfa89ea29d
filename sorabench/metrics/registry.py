"""Metrics by name: every number `sorabench evaluate` reports is a registered `torchmetrics.Metric`.

A metric takes clips (B, 3, T, H, W) in [-1, 1], already cut to the protocol, with `update(video, real: bool)`: the
real clips of `metrics.real_split` first (only for metrics whose `needs_real` is true), then the generated ones in
the order of their prompts. `compute()` returns a scalar, logged as `eval/<name>`, or a dict of scalars, logged as
`eval/<key>` each. torchmetrics' own `higher_is_better` flag says which way is better; the evaluation writes it
beside the run (tag `eval.higher_is_better.<key>`) and the report ranks by it, so it never guesses from a name.

A metric builds itself from what the evaluation prepared (`EvalSetup`: the metrics config, the feature networks,
the evaluator, the prompts' labels) with a `from_setup(setup)` classmethod, which returns None where it does not
apply (FVD on images, alignment without attribute labels); without one it is built with no arguments.
`metrics.compute` lists the built-ins (fvd, fid, kid, alignment), `metrics.extra` any more: a new metric is one
class with `@register("name")` and one YAML line (`extra: [name]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sorabench.registry import lookup, registrar

if TYPE_CHECKING:  # the report reads the flags without importing torchmetrics
    from torchmetrics import Metric

METRICS: dict[str, type[Metric]] = {}


def _has_flag(name: str, cls: type) -> None:
    if not isinstance(getattr(cls, "higher_is_better", None), bool):
        raise ValueError(f"metric {name!r}: set `higher_is_better = True | False` on {cls.__name__}")


register = registrar(METRICS, "metric", check=_has_flag)  # @register("name"): `metrics.extra: [name]`


def higher_is_better(name: str) -> bool | None:
    """The registered metric's flag; None for a name no metric registered (in this process)."""
    return METRICS[name].higher_is_better if name in METRICS else None


@dataclass
class EvalSetup:
    """What a metric may build itself from (`from_setup`)."""

    config: Mapping                      # conf/metrics: n_real, n_samples, num_frames, kid_subsets, stats_cache_dir...
    video_net: Any = None                # the clip feature network (FVD); None for images
    frame_net: Any = None                # the per-frame feature network (FID/KID); None with `fid: null`
    evaluator: Any = None                # the attribute classifier (`VideoAttributeClassifier`), if any
    fields: dict = field(default_factory=dict)  # the protocol fields: the cache key of real statistics
    labels: Any = None                   # the prompts' attribute labels (N, A), in sampling order, or None
    unseen: Any = None                   # (N,) bool: the prompt's composition was held out of training
    extra: dict = field(default_factory=dict)  # more per-prompt fields: the binding task's `unseen_pair`, ...


def one_process() -> bool:
    """torchmetrics' `distributed_available_fn` for metrics that one process computes alone (rank 0 after a DDP fit,
    while the other ranks wait): no sync across processes."""
    return False


def build_metric(name: str, setup: EvalSetup) -> Metric | None:
    """The registered metric `name` for this evaluation, or None where it does not apply."""
    cls = lookup(METRICS, "metric", name)
    metric = cls.from_setup(setup) if hasattr(cls, "from_setup") else cls()
    if metric is not None:
        metric.distributed_available_fn = one_process
    return metric


def directions(metric, scores: Mapping[str, float]) -> dict[str, bool]:
    """{logged key without `eval/`: higher is better} for the keys a metric ranks by (`ranked_keys(keys)` on the
    metric narrows a dict result to its headline keys, e.g. not KID's standard deviation)."""
    keys = [k.removeprefix("eval/") for k in scores]
    ranked = metric.ranked_keys(keys) if hasattr(metric, "ranked_keys") else keys
    return {k: bool(metric.higher_is_better) for k in ranked}
