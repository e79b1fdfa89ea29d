"""The guidance axis: every model scored at several classifier-free guidance scales, and each strategy at its own best
scale (chosen on held-apart prompts) against the shared default.

`metrics.guidance_scales` logs `eval/cfg<scale>/<metric>` (test prompts) and `eval_<split>/cfg<scale>/<metric>`
(the selection split's prompts, val by default) beside the unsuffixed eval/* of the shared default scale
(`metrics.cfg`); see sorabench.metrics.evaluate.guidance_key.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from sorabench.report.stats import finite, mean_ci95

GUIDANCE_KEY = re.compile(r"(eval(?:_[A-Za-z0-9]+)?)/cfg([0-9]+(?:\.[0-9]+)?)/(.+)")
GUIDANCE_PLOTS = ("acc_all", "fvd")
PROTOCOL_TAGS = ("tags.eval.protocol.guidance_scales", "tags.eval.protocol.guidance_n_samples",
                 "tags.eval.protocol.guidance_select_split")


def guidance_keys(columns) -> pd.DataFrame:
    """One row per guidance-axis column: `column`, `prefix` (eval = the reported split, eval_<split> = selection),
    `scale` (float) and bare `metric` (e.g. acc_all)."""
    rows = [(c, m.group(1), float(m.group(2)), m.group(3)) for c in columns if (m := GUIDANCE_KEY.fullmatch(str(c)))]
    return pd.DataFrame(rows, columns=["column", "prefix", "scale", "metric"])


def guidance_summary(runs: pd.DataFrame, by: str = "strategy") -> pd.DataFrame:
    """Mean, 95% CI and n over runs of every guidance-axis metric: one row per (strategy, prefix, metric, scale)."""
    keys = guidance_keys(runs.columns)
    rows = []
    for name, group in runs.groupby(by, sort=True):
        for k in keys.itertuples():
            mean, ci, n = mean_ci95(group[k.column])
            if n:
                rows.append({by: name, "prefix": k.prefix, "metric": k.metric, "scale": k.scale, "mean": mean,
                             "ci95": ci, "n": n})
    out = pd.DataFrame(rows, columns=[by, "prefix", "metric", "scale", "mean", "ci95", "n"])
    return out.sort_values([by, "prefix", "metric", "scale"], kind="stable").reset_index(drop=True)


def default_scale(runs: pd.DataFrame) -> float:
    """The shared default guidance scale of the runs (`metrics.cfg`), NaN if not logged or not one value."""
    for col in ("params.metrics.cfg", "tags.eval.protocol.cfg"):
        if col in runs:
            values = set(pd.to_numeric(runs[col], errors="coerce").dropna())
            if len(values) == 1:
                return float(values.pop())
    return math.nan


def guidance_protocol(runs: pd.DataFrame) -> str:
    """The axis's protocol as the runs tagged it (scales, clips per scale, selection split), in one line."""
    return ", ".join(f"{k.removeprefix('tags.eval.protocol.')}: {'/'.join(sorted(set(runs[k].dropna())))}"
                     for k in PROTOCOL_TAGS if k in runs) or "protocol tags not logged"


def best_scales(runs: pd.DataFrame, metric: str, direction: str, default: float, by: str = "strategy",
                order=None, shown=("acc_all", "fvd")) -> pd.DataFrame:
    """Each strategy at its own best guidance scale and at the shared `default` scale.

    The best scale optimises the mean over runs of `metric` (a bare axis metric, e.g. fvd) on the selection split
    (`eval_<split>/cfg*/`), never on the reported prompts; without a selection split it is chosen on the reported
    prompts and `chosen_on` says "oracle". The `shown` metrics are the reported split's (`eval/cfg*/`) at the best
    and at the default scale, both at the axis's clip count; when the default scale is not on the axis, the
    unsuffixed eval/* (metrics.n_samples clips) stand in and `default_from` says so."""
    g = guidance_summary(runs, by)
    rows = []
    names = sorted(set(g[by])) if order is None else [s for s in order if s in set(g[by])]
    for name in names:
        gs = g[g[by] == name]
        select = gs[(gs.prefix != "eval") & (gs.metric == metric)]
        chosen_on = f"{select.prefix.iloc[0].removeprefix('eval_')} prompts" if len(select) else "test prompts (oracle)"
        if select.empty:
            select = gs[(gs.prefix == "eval") & (gs.metric == metric)]
        if select.empty:
            continue
        select = select[select.prefix == select.prefix.iloc[0]]
        key = select["mean"] if direction == "minimize" else -select["mean"]
        best = float(select.loc[key.idxmin(), "scale"])
        row = {by: name, "best_scale": best, "chosen_on": chosen_on, "selection_value": float(select["mean"].min()
               if direction == "minimize" else select["mean"].max()), "default_scale": default}
        reported = gs[gs.prefix == "eval"]
        on_axis = finite(default) and (reported.scale == default).any()
        row["default_from"] = "axis" if on_axis else "eval/* (metrics.n_samples clips)"
        for m in shown:
            at = reported[(reported.metric == m) & (reported.scale == best)]
            row[f"{m}_best_mean"], row[f"{m}_best_ci95"] = (at["mean"].iloc[0], at["ci95"].iloc[0]) if len(at) else (
                math.nan, math.nan)
            if on_axis:
                at = reported[(reported.metric == m) & (reported.scale == default)]
                row[f"{m}_default_mean"], row[f"{m}_default_ci95"] = (at["mean"].iloc[0], at["ci95"].iloc[0]) if len(
                    at) else (math.nan, math.nan)
            else:
                col = runs[runs[by] == name][f"eval/{m}"] if f"eval/{m}" in runs else []
                row[f"{m}_default_mean"], row[f"{m}_default_ci95"], _ = mean_ci95(col)
        rows.append(row)
    return pd.DataFrame(rows)
