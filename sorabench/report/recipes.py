"""Rankings under the shared recipe and under each strategy's own tuned recipe, side by side.

A study run with the grid axis `recipe` (sweep=conditioning_ablation_tuned, `sorabench.sweep.tuning`) tags each run
`sorabench.recipe` (`shared` or `tuned`) and each tuned run with its pick (`sorabench.tuned_overrides`, the pick's
selection score on val `sorabench.tuned_value` and the tuning budget `sorabench.tuning_trials`). Each recipe is
analysed on its own -- a strategy at its own recipe and at the shared one are different treatments, never pooled --
and this module prints the two rankings beside each other with every strategy's pick.
"""

from __future__ import annotations

import pandas as pd

from sorabench.report.analysis import Analysis
from sorabench.report.formatting import fmt, md_table, summary_cell

RECIPE_TAG = "tags.sorabench.recipe"


def recipes(runs: pd.DataFrame) -> list[str]:
    """The recipes the runs were trained under, `shared` first; [] for a study without the axis."""
    if RECIPE_TAG not in runs:
        return []
    found = sorted(set(runs[RECIPE_TAG].dropna().astype(str)))
    return sorted(found, key=lambda r: (r != "shared", r))


def picks(runs: pd.DataFrame, by: str = "strategy") -> pd.DataFrame:
    """Per strategy, the tuned recipe its runs carry (one per strategy by construction; '?' if the tags are missing)."""
    tuned = runs[runs.get(RECIPE_TAG, pd.Series(index=runs.index, dtype=object)).astype(str) == "tuned"]
    rows = {}
    for label, group in tuned.groupby(by, sort=False):
        def tag(name: str) -> str:
            col = f"tags.sorabench.{name}"
            values = sorted(set(group[col].dropna().astype(str))) if col in group else []
            return " / ".join(values) or "?"

        rows[label] = {"overrides": tag("tuned_overrides"), "val_score": tag("tuned_value"),
                       "trials": tag("tuning_trials")}
    return pd.DataFrame.from_dict(rows, orient="index")


def side_by_side(analyses: dict[str, Analysis], metric: str, chosen: pd.DataFrame) -> list[str]:
    """The markdown section: each strategy's headline metric and rank under every recipe, and its pick."""
    names = list(analyses)
    strategies = list(dict.fromkeys(s for a in analyses.values() for s in a.order))
    headers = ["strategy", *[f"{r}: {metric} (rank)" for r in names], "tuned recipe (chosen on val)",
               "val score of the pick", "tuning trials"]
    rows = []
    for s in strategies:
        cells = [str(s)]
        for r in names:
            a = analyses[r]
            cells.append(f"{summary_cell(a.summary, s, metric)} ({fmt(a.summary.loc[s, 'rank'], 3)})"
                         if s in a.summary.index else "–")
        pick = chosen.loc[s] if s in chosen.index else None
        cells += [pick["overrides"], pick["val_score"], pick["trials"]] if pick is not None else ["–", "–", "–"]
        rows.append(cells)
    lines = ["## Shared recipe vs each strategy's own tuned recipe", "",
             "Each recipe is ranked on its own (its own report below); a tuned strategy is its best recipe and "
             "guidance scale on **val** out of the same number of tuning trials as every other strategy "
             "(`sorabench.sweep.tuning`); the reported numbers come from the split named in the protocol.", "",
             md_table(headers, rows), ""]
    for r in names:
        lines.append(f"- `{r}`: ranking {' > '.join(map(str, analyses[r].order))} - full report: [{r}/report.md]"
                     f"({r}/report.md)")
    return lines + [""]
