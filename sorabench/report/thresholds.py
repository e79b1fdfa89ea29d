"""Steps to threshold: the first evaluated step at which each run reached a declared level of a metric (e.g.
`eval/acc_direction` >= 0.9), seed by seed.

A final-step mean cannot say *when* a strategy learned a skill, and a two-peaked outcome (one seed of three learns it
at all) hides in it; the step at which each seed crosses a fixed level says both. The levels are declared before the
study runs (`protocol.thresholds` in the sweep YAML, beside the margins) or given to the report (`thresholds=`). The
resolution is the evaluation interval of the runs (`evaluate.every_n_steps`): a step here means "reached by this
evaluation, not by the one before"; a run that never reached the level is censored at its last evaluated step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sorabench.report.formatting import md_table
from sorabench.report.runs import parse_margins
from sorabench.report.stats import metric_direction

COLUMNS = ["row", "run_id", "seed", "replicate", "metric", "level", "step", "last_step"]


def with_replicates(runs: pd.DataFrame) -> pd.DataFrame | None:
    """`runs` with a `replicate` label per run ('seed 0', or 'seed 0, data.seed 1' where the sweep declares
    `replicates`: `sorabench.report.runs.replicate_labels`); None when runs carry no seed."""
    if "replicate" in runs:
        return runs
    if "seed" not in runs:
        return None
    return runs.assign(replicate=["seed " + str(int(s)) if pd.notna(s) else "seed ?" for s in runs["seed"]])


def replicate_order(runs: pd.DataFrame) -> list[str]:
    """The replicate labels in seed order (then by the other replicate axes)."""
    first = runs.drop_duplicates("replicate")
    key = [(int(s) if pd.notna(s) else 1 << 62, str(r)) for s, r in zip(first["seed"], first["replicate"])] \
        if "seed" in first else [(0, str(r)) for r in first["replicate"]]
    return [label for _, label in sorted(key)]


def parse_thresholds(value) -> dict[str, float]:
    """{metric: level} from a mapping or a list of "metric:level" strings; a level may be any number (FVD's too)."""
    return parse_margins(value, key="thresholds", positive=False)


def steps_to_threshold(histories: dict[str, pd.DataFrame], runs: pd.DataFrame, thresholds: dict[str, float],
                       by: str = "strategy") -> pd.DataFrame:
    """One row per run and declared metric: the first logged step whose value is at or beyond the level (>= for a
    metric where higher is better, <= otherwise, as `metric_direction` says), NaN if it never was; `last_step`
    is the run's last evaluated step (where a run that never reached it is censored)."""
    rows = []
    runs = with_replicates(runs)
    seeds = dict(zip(runs["run_id"], runs["seed"])) if runs is not None else {}
    labels = dict(zip(runs["run_id"], runs["replicate"])) if runs is not None else {}
    for metric, level in thresholds.items():
        history = histories.get(metric)
        if history is None or history.empty:
            continue
        higher = metric_direction(metric, "auto", runs) == "maximize"
        h = history.sort_values([c for c in ("run_id", "step", "timestamp") if c in history])
        h = h.drop_duplicates(["run_id", "step"], keep="last")  # a resumed run's step logged twice: the latest
        for run_id, points in h.groupby("run_id", sort=False):
            reached = points[points["value"] >= level] if higher else points[points["value"] <= level]
            rows.append([points[by].iloc[0], run_id, seeds.get(run_id), labels.get(run_id), metric, level,
                         int(reached["step"].iloc[0]) if len(reached) else float("nan"), int(points["step"].max())])
    return pd.DataFrame(rows, columns=COLUMNS).rename(columns={"row": by})


def threshold_section(table: pd.DataFrame, order: list, by: str = "strategy") -> list[str]:
    """Markdown: per row and metric, each seed's step (or "not by <last>"), how many reached it and their median."""
    if table.empty:
        return []
    columns = replicate_order(table.dropna(subset=["replicate"]))
    lines = []
    for label in order:
        for (metric, level), group in table[table[by] == label].groupby(["metric", "level"], sort=False):
            by_seed = {r.replicate: r for r in group.itertuples()}
            cells = [("-" if c not in by_seed else f"{int(by_seed[c].step):,}" if pd.notna(by_seed[c].step)
                      else f"not by {int(by_seed[c].last_step):,}") for c in columns]
            reached = group["step"].dropna()
            median = float(np.median(group["step"].fillna(np.inf)))  # a censored run: later than every step
            median = f"{median:,.0f}" if np.isfinite(median) else "-"
            arrow = ">=" if metric_direction(metric) == "maximize" else "<="
            lines.append([str(label), f"{metric} {arrow} {level:g}", *cells, f"{len(reached)}/{len(group)}", median])
    if not lines:
        return []
    return ["## Steps to threshold", "",
            "The first evaluated step at which each run reached the declared level (resolution: the evaluation "
            "interval; a run that never did is shown at its last evaluated step). The median counts censored runs "
            "as later than every step: '-' where half or more never reached the level.", "",
            md_table([by, "level", *columns, "reached", "median step"], lines), ""]
