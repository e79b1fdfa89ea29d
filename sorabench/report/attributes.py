"""Per-attribute tables: seen vs unseen composition, the instrument's reference points (real clips, the VAE's
ceiling, noise) and the binding task's scores and errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from sorabench.report.formatting import fmt, fmt_ci
from sorabench.report.stats import finite_values, mean_ci95


def attribute_order(found, runs: pd.DataFrame | None = None) -> list[str]:
    """Display order of attributes: `all` first, then the dataset's own order (the label schema its evaluation
    logged as the tag `eval.attributes`), then any other by name."""
    schema = []
    if runs is not None and "tags.eval.attributes" in runs:
        tags = runs["tags.eval.attributes"].dropna()
        schema = str(tags.iloc[-1]).split(",") if len(tags) else []
    ordered = ["all", *schema]
    found = set(found)
    return [a for a in ordered if a in found] + sorted(found - set(ordered))


def composition_attributes(runs: pd.DataFrame) -> list[str]:
    """Attributes with both `eval/acc_<attr>_seen` and `eval/acc_<attr>_unseen`, `all` first."""
    cols = set(runs.columns)
    found = [m.group(1) for c in cols if (m := re.fullmatch(r"eval/acc_(.+)_seen", str(c)))]
    return attribute_order([a for a in found if f"eval/acc_{a}_unseen" in cols], runs)


def composition(runs: pd.DataFrame, by: str = "strategy", order=None) -> pd.DataFrame:
    """Seen vs unseen compositions per strategy and attribute: mean ± 95% CI of each, their paired per-run gap
    (seen − unseen), and the chance level (`eval/chance_<attr>`, NaN when not logged)."""
    attrs = composition_attributes(runs)
    rows = []
    groups = dict(tuple(runs.groupby(by, sort=True)))
    for name in [s for s in (order if order is not None else sorted(groups)) if s in groups]:
        g = groups[name]
        for attr in attrs:
            seen = pd.to_numeric(g[f"eval/acc_{attr}_seen"], errors="coerce")
            unseen = pd.to_numeric(g[f"eval/acc_{attr}_unseen"], errors="coerce")
            chance = finite_values(g[f"eval/chance_{attr}"]) if f"eval/chance_{attr}" in g else np.array([])
            row = {by: name, "attribute": attr, "chance": float(chance.mean()) if len(chance) else math.nan}
            for label, values in (("seen", seen), ("unseen", unseen), ("gap", seen - unseen)):
                row[f"{label}_mean"], row[f"{label}_ci95"], row[f"{label}_n"] = mean_ci95(values)
            rows.append(row)
    return pd.DataFrame(rows)


REFERENCE_SOURCES = {"real": "real clips", "ceiling": "VAE reconstructions (ceiling)", "noise": "pure noise (floor)"}


def reference_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Per attribute, what the evaluator reads from real clips, from the VAE's reconstructions of them (the ceiling
    any latent DiT is measured against) and from noise: `eval/<source>_acc_<attr>`, mean over runs (they share
    the evaluator, the VAE and the clips, so the runs agree unless those differ: `spread` is max − min)."""
    found = {m.group(1) for c in runs.columns if (m := re.fullmatch(r"eval/(?:real|ceiling|noise)_acc_(.+)", str(c)))}
    rows = []
    for attr in attribute_order(found, runs):
        row = {"attribute": attr}
        for src in REFERENCE_SOURCES:
            values = finite_values(runs[f"eval/{src}_acc_{attr}"]) if f"eval/{src}_acc_{attr}" in runs else np.array([])
            row[src] = float(values.mean()) if len(values) else math.nan
            row[f"{src}_spread"] = float(values.max() - values.min()) if len(values) else math.nan
        if any(math.isfinite(row[src]) for src in REFERENCE_SOURCES):
            rows.append(row)
    return pd.DataFrame(rows)


BINDING_COLUMNS = ["all", "all_seen", "all_unseen", "all_unseen_pair", "twins", "object", "count", "colour", "shape",
                   "size", "direction", "speed"]  # eval/bind_<column>, in the binding table's order
SWAP_ATTRIBUTES = ["shape", "size", "direction", "speed"]  # eval/bind_{wrong,swap}_<attr> (colour names the object)


def mean_cell(values, bounds=(0.0, 1.0)) -> str:
    """Mean ± 95% CI over runs of a share (cut to [0, 1]); the bare mean with one run; '–' with none."""
    values = pd.to_numeric(values, errors="coerce")
    if not values.notna().any():
        return "–"
    mean, ci, n = mean_ci95(values)
    return fmt_ci(mean, ci, bounds) if n > 1 else fmt(mean, 3)


def binding_tables(runs: pd.DataFrame, by: str = "strategy", order=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The binding task's two tables (metrics/binding.py), one row per strategy (mean ± 95% CI over runs) and, in
    the first, the instrument's rows (real clips, VAE reconstructions, noise: the runs share them) and chance:
    (scores: eval/bind_<BINDING_COLUMNS>; errors: per attribute of SWAP_ATTRIBUTES wrong / swapped, and the share of
    wrong readings that are another object's value against what uniform wrong guesses give). Empty without
    eval/bind_all."""
    if "eval/bind_all" not in runs:
        return pd.DataFrame(), pd.DataFrame()
    groups = dict(tuple(runs.groupby(by, sort=True)))
    names = [s for s in (order if order is not None else sorted(groups)) if s in groups]
    cols = [c for c in BINDING_COLUMNS if f"eval/bind_{c}" in runs]
    scores = [{by: name, "n": len(groups[name]), **{c: mean_cell(groups[name][f"eval/bind_{c}"]) for c in cols}}
              for name in names]
    for src, label in REFERENCE_SOURCES.items():
        row = {by: label, "n": ""}
        values = {c: finite_values(runs[f"eval/{src}_bind_{c}"]) for c in cols if f"eval/{src}_bind_{c}" in runs}
        row.update({c: fmt(values[c].mean(), 3) if len(values.get(c, ())) else "–" for c in cols})  # shared by runs
        if any(v != "–" for k, v in row.items() if k in cols):
            scores.append(row)
    if "eval/bind_chance_all" in runs:
        scores.append({by: "chance (uniform guess)", "n": "", **{c: "–" for c in cols},
                       "all": fmt(finite_values(runs["eval/bind_chance_all"]).mean(), 3)})
    errors = []
    for name in names if "eval/bind_swap_share" in runs else ():  # runs logged before binding errors had none
        g = groups[name]
        row = {by: name}
        for attr in SWAP_ATTRIBUTES:
            if f"eval/bind_swap_{attr}" in g:
                row[attr] = f"{mean_cell(g[f'eval/bind_wrong_{attr}'])} / {mean_cell(g[f'eval/bind_swap_{attr}'])}"
        for key in ("swap_share", "swap_share_chance"):
            row[key] = mean_cell(g[f"eval/bind_{key}"]) if f"eval/bind_{key}" in g else "–"
        errors.append(row)
    return pd.DataFrame(scores), pd.DataFrame(errors)
