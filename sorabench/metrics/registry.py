"""Metrics by name, beside FVD, FID/KID and alignment: one `torchmetrics.Metric` class and one YAML line each.

A metric is a torchmetrics `Metric` with `update(video, real: bool)` (clips (B, 3, T, H, W) in [-1, 1], already cut
to the protocol: the real clips of `metrics.real_split`, then the generated ones), `compute()` -> a scalar, and
torchmetrics' own `higher_is_better` flag, which the report ranks by. Register it with `@register("name")` (the
idiom of the conditioning and dataset registries) and list its name in `metrics.extra` (`extra: [name]` in
`conf/metrics/<metrics>.yaml`); it is logged as `eval/<name>`, averaged over seeds like every number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sorabench.registry import registrar

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
