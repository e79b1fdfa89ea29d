"""Everything one report states about a study's completed runs, computed in one place and without I/O: the ranked
summary, the tests, equivalence, composition, binding, reference points, power, the guidance axis, the Pareto front
and the reading. The markdown, the figures and the CSV files are views of an `Analysis`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sorabench.config import require
from sorabench.report.attributes import binding_tables, composition, reference_points
from sorabench.report.guidance import best_scales, default_scale, guidance_protocol, guidance_summary
from sorabench.report.reading import equivalence_reading, reading
from sorabench.report.runs import parse_margins
from sorabench.report.stats import (
    EQUIVALENCE_COLUMNS, PAIRWISE_COLUMNS, equivalence_tests, headline_power, holm_across, holm_family,
    metric_direction, pairwise_tests, pareto_front, rank_strategies, summarise,
)

TESTED_METRICS = ("eval/acc_all", "eval/bind_twins")  # tested pairwise besides the headline metric, if logged


@dataclass
class Analysis:
    runs: pd.DataFrame  # the completed runs, labelled by report row in the column `by`
    by: str
    metric: str  # the headline metric and its better direction
    direction: str
    metrics: list[str]  # every metric a completed run logged
    summary: pd.DataFrame  # one row per report row, ranked on the headline metric (stats.summarise)
    tests: dict[str, pd.DataFrame]  # tested metric -> pairwise tests, Holm over all of them together
    equivalence: pd.DataFrame  # TOST at the declared margins
    composition: pd.DataFrame
    binding: tuple[pd.DataFrame, pd.DataFrame]  # scores, errors
    references: pd.DataFrame
    power: pd.DataFrame
    guidance: pd.DataFrame  # guidance_summary
    best_scales: pd.DataFrame  # each row at its own best scale and at the shared default
    axis_metric: str  # the bare axis metric the best scale optimises, and its direction
    axis_direction: str
    shared_scale: float
    guidance_protocol: str
    objectives: list[tuple[str, str]]  # the sweep's objectives; a Pareto front when they are two
    front: pd.Series | None
    text: str  # the reading

    @property
    def order(self) -> list:
        """The report rows, best first."""
        return list(self.summary.index)


def analyse(complete: pd.DataFrame, all_metrics: list[str], metric: str, direction: str, by: str = "strategy",
            margins=None, declared: dict | None = None, objectives=(), excluded: int = 0) -> Analysis:
    """The `Analysis` of the completed runs `complete` (labelled by row in `by`) on the headline `metric`.

    `direction`: auto | minimize | maximize; `margins`: the report's own equivalence margins (`parse_margins`), over
    `declared` (the study's pre-registered protocol); `objectives`: the sweep's; `excluded`: runs left out, counted."""
    metrics = [m for m in all_metrics if complete[m].notna().any()]
    require(metric in metrics, "metric", metric, f"not logged by any completed run; logged: {', '.join(metrics)}")
    direction = metric_direction(metric, direction, complete)  # with the flags the runs logged
    summary = rank_strategies(summarise(complete, metrics, by=by), metric, direction)
    order = list(summary.index)
    # The pre-registered tests (`protocol.tested`) when the study declared them, else the default set: one Holm family.
    tested = [m for m in dict.fromkeys([metric, *((declared or {}).get("tested") or TESTED_METRICS)]) if m in metrics]
    tests = holm_across({m: pairwise_tests(complete, m, by=by, order=order) for m in tested})
    margins = {**parse_margins((declared or {}).get("margins"), "protocol.margins"), **parse_margins(margins)}
    equivalence = pd.concat([equivalence_tests(complete, m, float(margins[m]), by=by, order=order) for m in tested
                             if m in margins] or [pd.DataFrame(columns=EQUIVALENCE_COLUMNS)], ignore_index=True)
    comp = composition(complete, by=by, order=order)
    text = reading(summary, tests.get(metric, pd.DataFrame(columns=PAIRWISE_COLUMNS)), metric, direction, comp,
                   excluded=excluded, by=by)
    text += equivalence_reading(summary, equivalence, metric)
    guidance = guidance_summary(complete, by=by)
    bare = metric.removeprefix("eval/")
    axis_metric = bare if (guidance.metric == bare).any() else "acc_all"
    axis_direction = direction if axis_metric == bare else metric_direction(axis_metric)
    shared = default_scale(complete)
    best = best_scales(complete, axis_metric, axis_direction, shared, by=by, order=order) if len(guidance) else \
        pd.DataFrame()
    objectives = list(objectives)
    two = len(objectives) == 2 and all(m in metrics for m, _ in objectives)
    return Analysis(
        runs=complete, by=by, metric=metric, direction=direction, metrics=metrics, summary=summary, tests=tests,
        equivalence=equivalence, composition=comp, binding=binding_tables(complete, by=by, order=order),
        references=reference_points(complete),
        power=headline_power(complete, summary, tested, by=by, family=holm_family(tests)),
        guidance=guidance, best_scales=best, axis_metric=axis_metric, axis_direction=axis_direction,
        shared_scale=shared, guidance_protocol=guidance_protocol(complete), objectives=objectives,
        front=pareto_front(complete, objectives) if two else None, text=text,
    )
