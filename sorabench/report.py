"""`sorabench report`: compare text-conditioning strategies from the MLflow runs of a study.

Reads one MLflow experiment (one per study): the study's parent run (tags `sorabench.role=study`,
`sorabench.study=<study>`) and its child runs, one per Optuna trial (tag `mlflow.parentRunId`, tag
`sorabench.strategy` or param `conditioning.name`, param `seed`, tags `optuna.trial_number`, `optuna.state`,
`failure_reason`). Only COMPLETE children enter the statistics; failed and pruned ones are listed with their reasons.

Writes into `run_dir`: `report.md` (tables, pairwise tests, seen/unseen composition, plots, a plain-text reading),
`summary.csv` (one row per strategy: `<metric>_mean`, `<metric>_ci95`, `<metric>_n`, `n`), `pairwise.csv`,
`runs.csv` (every child run flattened: metrics by bare name, `params.*`, `tags.*`) and one PNG per metric history;
with a guidance axis (`metrics.guidance_scales`) also `guidance.csv`, `guidance_best.csv` (each strategy at its own
best scale, chosen on the selection split, and at the shared default) and `guidance_acc_all.png` / `guidance_fvd.png`;
the same files go to the parent run's artifacts under `report/`.

The statistics are small pure functions of a runs DataFrame (one row per run, a `strategy` column, one column per
metric named by its MLflow key), so they can be checked on synthetic numbers: `mean_ci95`, `summarise`,
`rank_strategies`, `pairwise_tests`, `holm`, `holm_across`, `composition`, `aggregate_history`, `reading`,
`guidance_summary`, `best_scales`.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sorabench.config import ConfigError, require
from sorabench.tracking import check_tracking_uri

COMPLETE = "COMPLETE"
ALPHA = 0.05
KEY_METRICS = ("eval/fvd", "eval/fid", "eval/kid", "eval/acc_all", "val/loss", "train/loss", "time/train_seconds")
TESTED_METRICS = ("eval/acc_all", "eval/bind_twins")  # tested pairwise besides the headline metric, if logged
CURVE_METRICS = ("val/loss", "train/loss")  # plotted whenever logged; eval/* only with more than one point
PARAMS, GFLOPS = "model/params", "model/gflops"
ID_COLUMNS = [
    "run_id", "run_name", "trial", "strategy", "seed", "state", "failure_reason",
    "status", "role", "study", "parent_run_id", "start_time", "end_time",
]
_STATUS_TO_STATE = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "FAIL"}  # without an optuna.state tag


# --------------------------------------------------------------------------------------------------- statistics


def metric_direction(metric: str, direction: str = "auto", runs: pd.DataFrame | None = None) -> str:
    """'minimize' or 'maximize'; auto: the `higher_is_better` flag the evaluation logged for a registered metric
    (tag `eval.higher_is_better.<name>`, see sorabench.metrics.registry) where `runs` have it, else accuracies
    (`eval/acc_*`) and scores maximize, everything else minimizes."""
    require(direction in ("auto", "minimize", "maximize"), "direction", direction, "must be auto, minimize or maximize")
    if direction != "auto":
        return direction
    flag = f"tags.eval.higher_is_better.{metric.removeprefix('eval/')}"
    if runs is not None and flag in runs and runs[flag].notna().any():
        return "maximize" if str(runs[flag].dropna().iloc[-1]) == "True" else "minimize"
    base = metric.rsplit("/", 1)[-1].lower()
    higher = base.startswith("acc") or "accuracy" in base or base in ("precision", "recall", "clip_score", "is")
    return "maximize" if higher else "minimize"


def group_keys(group_by) -> list[str]:
    """`group_by` as a list of keys: `strategy` (the conditioning label, the default) and/or dotted config keys."""
    keys = [group_by] if isinstance(group_by, str) else list(group_by or [])
    require(bool(keys) and all(isinstance(k, str) and k for k in keys), "group_by", group_by,
            "must be a dotted config key (e.g. optim.lr) or a list of them, [strategy,dit.width]")
    return keys


def group_labels(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    """The report row of each run: its strategy and/or the values of config keys (logged as params), so that runs of
    different configurations are never pooled into one row: ["strategy", "optim.lr"] -> 'adaln_zero, optim.lr=0.001'."""
    parts = []
    for key in keys:
        if key == "strategy":
            parts.append(runs["strategy"].astype(str))
            continue
        if f"params.{key}" not in runs:
            logged = ", ".join(sorted(c.removeprefix("params.") for c in runs if c.startswith("params."))) or "none"
            raise ConfigError(f"group_by={key!r}: no run logged this config key; logged: {logged}")
        parts.append(key + "=" + runs[f"params.{key}"].fillna("?").astype(str))
    label = parts[0]
    for part in parts[1:]:
        label = label + ", " + part
    return label


def pareto_front(runs: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """True for the runs no other run dominates (at least as good on every objective, better on one); a run without a
    finite value of every objective is never on the front."""
    signs = [1.0 if direction == "minimize" else -1.0 for _, direction in objectives]
    values = np.stack([pd.to_numeric(runs[m], errors="coerce").to_numpy(dtype=float) * s
                       for (m, _), s in zip(objectives, signs)], axis=1) if len(runs) else np.zeros((0, 2))
    finite = np.isfinite(values).all(1)
    front = []
    for i, v in enumerate(values):
        dominated = ((values <= v).all(1) & (values < v).any(1) & finite).any()
        front.append(bool(finite[i] and not dominated))
    return pd.Series(front, index=runs.index, dtype=bool)


def sweep_objectives(parents: pd.DataFrame) -> list[tuple[str, str]]:
    """The (metric, direction) objectives of the study, from the sweep config its parent run records (`sweep_yaml`)."""
    if parents.empty or "tags.sweep_yaml" not in parents or not isinstance(parents["tags.sweep_yaml"].iloc[-1], str):
        return []
    try:
        sweep = OmegaConf.to_container(OmegaConf.create(parents["tags.sweep_yaml"].iloc[-1]))
    except Exception:  # noqa: BLE001 - a cut-off tag (MLflow keeps 5000 characters): no objectives, no front
        return []
    return [(str(o["metric"]), str(o["direction"])) for o in (sweep.get("objectives") or []) if isinstance(o, dict)]


def _finite(values) -> np.ndarray:
    x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    return x[np.isfinite(x)]


def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t 95% interval t_{0.975,n-1}·s/√n, n) over the finite values.

    With one value the half-width is NaN ("n/a"); with none the mean is NaN too.
    """
    from scipy import stats

    x = _finite(values)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if np.all(x == x[0]):  # a constant (params, chance): exactly, without the rounding noise of x.mean()
        return float(x[0]), (0.0 if n > 1 else math.nan), n
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, 1
    return mean, float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)), n


def summarise(runs: pd.DataFrame, metrics, by: str = "strategy") -> pd.DataFrame:
    """One row per strategy (index `by`): `n` (runs), `seeds`, and `<m>_mean`, `<m>_ci95`, `<m>_n` for every metric.

    `runs` should hold the completed runs only; a metric a run did not log is left out of that metric's n.
    """
    rows = []
    for name, group in runs.groupby(by, sort=True):
        row = {by: name, "n": len(group)}
        if "seed" in group:
            row["seeds"] = ";".join(str(s) for s in sorted(group["seed"].dropna().tolist()))
        for m in metrics:
            mean, ci, n = mean_ci95(group[m] if m in group else [])
            row[f"{m}_mean"], row[f"{m}_ci95"], row[f"{m}_n"] = mean, ci, n
        rows.append(row)
    return pd.DataFrame(rows).set_index(by) if rows else pd.DataFrame(columns=["n"]).rename_axis(by)


def rank_strategies(summary: pd.DataFrame, metric: str, direction: str) -> pd.DataFrame:
    """`summary` sorted best first on `<metric>_mean` (NaN last), with a 1-based `rank` column in front."""
    key = summary[f"{metric}_mean"].astype(float)
    key = key if direction == "minimize" else -key
    out = summary.loc[key.sort_values(na_position="last", kind="stable").index].copy()
    rank = pd.array(range(1, len(out) + 1), dtype="Int64")
    rank[out[f"{metric}_mean"].isna().to_numpy()] = pd.NA
    out.insert(0, "rank", rank)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for i, j in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (len(idx) - i) * p[j]))
        out[j] = running
    return out


def mannwhitney_exact(x, y) -> tuple[float, float]:
    """(U of x, two-sided p) of the Mann–Whitney test by enumerating every split of the pooled values into groups of
    these sizes: exact with ties too (midranks), where scipy's method="exact" uses the null distribution of untied
    data and is not exact once two values tie (seeds at chance accuracy tie often)."""
    from scipy import stats

    def u(a, b, axis=-1):
        return stats.mannwhitneyu(a, b, method="asymptotic", axis=axis).statistic

    res = stats.permutation_test((x, y), u, permutation_type="independent", alternative="two-sided",
                                 n_resamples=np.inf, vectorized=True)
    return float(u(x, y)), float(min(1.0, res.pvalue))


def min_mannwhitney_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided p-value the exact Mann–Whitney U test can give at these group sizes."""
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


PAIRWISE_COLUMNS = [
    "metric", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "diff",
    "welch_t", "welch_p", "welch_p_holm", "mwu_u", "mwu_p", "note",
]


def pairwise_tests(runs: pd.DataFrame, metric: str, by: str = "strategy", order=None) -> pd.DataFrame:
    """Every pair of strategies on one metric: Welch's t-test and the two-sided Mann–Whitney U test.

    p-values are scipy's (`ttest_ind(equal_var=False)`; Mann–Whitney exact by enumeration up to 8 runs per strategy,
    ties included, `mannwhitneyu(alternative="two-sided")` above); `welch_p_holm`
    adjusts them for the number of pairs. `diff` = mean_a − mean_b. `note` says when n is too small to mean much.
    Pairs follow `order` (e.g. the ranking), else sorted names; strategies without a finite value are left out.
    """
    from scipy import stats

    groups = {name: _finite(g[metric]) for name, g in runs.groupby(by, sort=True)} if metric in runs else {}
    groups = {k: v for k, v in groups.items() if len(v)}
    names = [s for s in (order if order is not None else sorted(groups)) if s in groups]
    rows = []
    for a, b in combinations(names, 2):
        x, y = groups[a], groups[b]
        row = {"metric": metric, "a": a, "b": b, "n_a": len(x), "n_b": len(y), "mean_a": x.mean(), "mean_b": y.mean()}
        row["diff"] = row["mean_a"] - row["mean_b"]
        row.update(welch_t=math.nan, welch_p=math.nan, mwu_u=math.nan, mwu_p=math.nan)
        notes = []
        if len(x) < 2 or len(y) < 2:
            notes.append("not tested: needs at least 2 runs per strategy")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zero variance, ties: scipy warns and returns nan / approximates
                welch = stats.ttest_ind(x, y, equal_var=False)
                # Exact at small n, ties or not (a permutation over every split): scipy's default approximates on
                # any tie (p = 0.077 at 3 vs 3, below the exact floor of 0.1) and its method="exact" ignores ties.
                if max(len(x), len(y)) <= 8:
                    mwu_u, mwu_p = mannwhitney_exact(x, y)
                else:
                    mwu = stats.mannwhitneyu(x, y, alternative="two-sided")
                    mwu_u, mwu_p = float(mwu.statistic), float(mwu.pvalue)
            if float(np.ptp(x)) > 0 or float(np.ptp(y)) > 0:
                # With no variance on either side the standard error is 0 and t is ±inf (p = 0) for any gap
                # between two constants: not evidence, so left undefined.
                row.update(welch_t=float(welch.statistic), welch_p=float(welch.pvalue))
            row.update(mwu_u=mwu_u, mwu_p=mwu_p)
            if not math.isfinite(row["welch_p"]):
                notes.append("Welch undefined: no variance within either strategy")
            if min(len(x), len(y)) < 5:
                notes.append("small n: low power")
            floor = min_mannwhitney_p(len(x), len(y))
            if floor >= ALPHA:
                notes.append(f"Mann–Whitney cannot reach p<{ALPHA:g} at these n (smallest p={floor:.2g})")
        row["note"] = "; ".join(notes)
        rows.append(row)
    out = pd.DataFrame(rows, columns=[c for c in PAIRWISE_COLUMNS if c != "welch_p_holm"])
    out.insert(out.columns.get_loc("welch_p") + 1, "welch_p_holm", holm(out["welch_p"]) if len(out) else [])
    return out


def holm_across(tests: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Re-adjust `welch_p_holm` over every pair of every tested metric together (one family of tests): the
    headline's "significant" must survive the number of comparisons actually made, not only those of one metric."""
    frames = [t.assign(_metric=m) for m, t in tests.items()]
    if not frames or not sum(len(t) for t in frames):
        return tests
    joined = pd.concat(frames, ignore_index=True)
    joined["welch_p_holm"] = holm(joined["welch_p"])
    return {m: joined[joined._metric == m].drop(columns="_metric").reset_index(drop=True) for m in tests}


def holm_family(tests: dict[str, pd.DataFrame]) -> int:
    """How many tests `holm_across` adjusted together (those with a p-value)."""
    return int(sum(t["welch_p"].notna().sum() for t in tests.values() if "welch_p" in t))


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
            chance = _finite(g[f"eval/chance_{attr}"]) if f"eval/chance_{attr}" in g else np.array([])
            row = {by: name, "attribute": attr, "chance": float(chance.mean()) if len(chance) else math.nan}
            for label, values in (("seen", seen), ("unseen", unseen), ("gap", seen - unseen)):
                row[f"{label}_mean"], row[f"{label}_ci95"], row[f"{label}_n"] = mean_ci95(values)
            rows.append(row)
    return pd.DataFrame(rows)


def aggregate_history(history: pd.DataFrame, by: str = "strategy") -> pd.DataFrame:
    """Per strategy and step over runs: mean, sd (ddof=1, NaN for one run), min, max, n.

    `history` has columns `by`, run_id, step, value and optionally timestamp; a step logged twice by one run
    (a resumed run) keeps the latest value.
    """
    h = history.sort_values([c for c in ("run_id", "step", "timestamp") if c in history])
    h = h.drop_duplicates(["run_id", "step"], keep="last")
    agg = h.groupby([by, "step"])["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    agg = agg.rename(columns={"std": "sd", "count": "n"})
    agg["ci95"] = [mean_ci95(g.to_numpy())[1] for _, g in h.groupby([by, "step"])["value"]]
    return agg


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
            values = _finite(runs[f"eval/{src}_acc_{attr}"]) if f"eval/{src}_acc_{attr}" in runs else np.array([])
            row[src] = float(values.mean()) if len(values) else math.nan
            row[f"{src}_spread"] = float(values.max() - values.min()) if len(values) else math.nan
        if any(math.isfinite(row[src]) for src in REFERENCE_SOURCES):
            rows.append(row)
    return pd.DataFrame(rows)


BINDING_COLUMNS = ["all", "all_seen", "all_unseen", "all_unseen_pair", "twins", "object", "count", "colour", "shape",
                   "size", "direction", "speed"]  # eval/bind_<column>, in the binding table's order
SWAP_ATTRIBUTES = ["shape", "size", "direction", "speed"]  # eval/bind_{wrong,swap}_<attr> (colour names the object)


def _mean_cell(values, bounds=(0.0, 1.0)) -> str:
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
    scores = [{by: name, "n": len(groups[name]), **{c: _mean_cell(groups[name][f"eval/bind_{c}"]) for c in cols}}
              for name in names]
    for src, label in REFERENCE_SOURCES.items():
        row = {by: label, "n": ""}
        values = {c: _finite(runs[f"eval/{src}_bind_{c}"]) for c in cols if f"eval/{src}_bind_{c}" in runs}
        row.update({c: fmt(values[c].mean(), 3) if len(values.get(c, ())) else "–" for c in cols})  # shared by runs
        if any(v != "–" for k, v in row.items() if k in cols):
            scores.append(row)
    if "eval/bind_chance_all" in runs:
        scores.append({by: "chance (uniform guess)", "n": "", **{c: "–" for c in cols},
                       "all": fmt(_finite(runs["eval/bind_chance_all"]).mean(), 3)})
    errors = []
    for name in names if "eval/bind_swap_share" in runs else ():  # runs logged before binding errors had none
        g = groups[name]
        row = {by: name}
        for attr in SWAP_ATTRIBUTES:
            if f"eval/bind_swap_{attr}" in g:
                row[attr] = f"{_mean_cell(g[f'eval/bind_wrong_{attr}'])} / {_mean_cell(g[f'eval/bind_swap_{attr}'])}"
        for key in ("swap_share", "swap_share_chance"):
            row[key] = _mean_cell(g[f"eval/bind_{key}"]) if f"eval/bind_{key}" in g else "–"
        errors.append(row)
    return pd.DataFrame(scores), pd.DataFrame(errors)


def binding_markdown(scores: pd.DataFrame, errors: pd.DataFrame, by: str = "strategy") -> list[str]:
    if scores.empty:
        return []
    md = ["## Binding: every object of the prompt", "",
          "Shares in [0, 1], mean ± 95% CI over seeds (metrics/binding.py). all: clips with every object fully right "
          "(seen compositions, unseen descriptions, unseen pairings of seen descriptions); twins: swapped-binding twin "
          "pairs with both clips right; object: objects fully right; count: clips showing exactly the prompt's number "
          "of objects; per attribute: objects with it right. The instrument's rows read the same prompts' real clips "
          "and their VAE reconstructions: no latent DiT is expected above the second.", ""]
    cols = [c for c in scores.columns if c not in (by, "n")]
    md += [md_table([by, "n", *cols], scores[[by, "n", *cols]].values.tolist()), ""]
    if not errors.empty:
        attrs = [c for c in errors.columns if c in SWAP_ATTRIBUTES]
        md += ["### Binding errors", "",
               "Per attribute, over objects whose value differs from another object's in the prompt: share read wrong "
               "/ share read as another object's value (the attribute bound to the wrong object). swap share: of all "
               "wrong readings, those that are another object's value; chance: the share uniform wrong guesses give. "
               "A swap share above chance means the model draws the prompt's words on the wrong objects.", ""]
        md += [md_table([by, *[f"{a} wrong / swap" for a in attrs], "swap share", "chance"],
                        errors[[by, *attrs, "swap_share", "swap_share_chance"]].values.tolist()), ""]
    return md


def headline_power(runs: pd.DataFrame, summary: pd.DataFrame, metrics, by: str = "strategy",
                   family: int = 1) -> pd.DataFrame:
    """`power_analysis` of the best against the worst and against the runner-up strategy on each metric, ranked
    by that metric's own means, at the level the report's decision uses: Holm over `family` tests, whose
    strictest step is α / family (so the seed counts are what a separation in the report would need)."""
    rows = []
    for m in metrics:
        if f"{m}_mean" not in summary:
            continue
        # `summary` may already be ranked (it has a `rank` column): re-rank on this metric without it
        ranked = rank_strategies(summary.drop(columns="rank", errors="ignore"), m, metric_direction(m, runs=runs))
        ranked = ranked.dropna(subset=[f"{m}_mean"])
        names = list(ranked.index)
        for other in dict.fromkeys(names[1:2] + names[-1:]):
            if other != names[0]:
                rows.append(power_analysis(runs, m, names[0], other, by=by, alpha=ALPHA / max(family, 1)))
    return pd.DataFrame(rows)


def power_analysis(runs: pd.DataFrame, metric: str, a: str, b: str, by: str = "strategy",
                   power: float = 0.8, alpha: float = ALPHA, max_n: int = 1000) -> dict:
    """The observed effect of a vs b on `metric` and the seeds per strategy the report's test - Welch's two-sided
    t-test - needs to detect it with `power` at `alpha`.

    effect = Cohen's d with the pooled sd (reported); the power uses each side's own sd, as Welch's test does: at n
    per group, noncentrality |diff| / sqrt((s_a² + s_b²) / n) and the Welch-Satterthwaite df
    (s_a² + s_b²)² (n - 1) / (s_a⁴ + s_b⁴), which is Student's 2n - 2 when the sds are equal and falls towards
    n - 1 when one side's spread dominates (a strategy that learns on some seeds only). `seeds_needed` is the
    smallest such n (NaN when d is 0 or not finite, `max_n` + 1 when more than `max_n` would be needed).
    """
    from scipy import stats

    x = _finite(runs.loc[runs[by] == a, metric]) if metric in runs else np.array([])
    y = _finite(runs.loc[runs[by] == b, metric]) if metric in runs else np.array([])
    out = {"metric": metric, "a": a, "b": b, "n_a": len(x), "n_b": len(y), "diff": math.nan,
           "pooled_sd": math.nan, "cohens_d": math.nan, "power_at_n": math.nan, "seeds_needed": math.nan,
           "alpha": alpha}
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1), y.var(ddof=1)
    pooled = math.sqrt(((len(x) - 1) * va + (len(y) - 1) * vb) / (len(x) + len(y) - 2))
    out.update(diff=float(x.mean() - y.mean()), pooled_sd=pooled)
    if pooled == 0 or not math.isfinite(pooled):
        return out
    out["cohens_d"] = abs(out["diff"]) / pooled

    def power_at(n: int) -> float:
        ncp = abs(out["diff"]) / math.sqrt((va + vb) / n)
        df = (va + vb) ** 2 * (n - 1) / (va**2 + vb**2)
        crit = stats.t.ppf(1 - alpha / 2, df)
        # The lower tail is negligible for a real effect; scipy returns NaN for it at large noncentrality.
        lower = stats.nct.cdf(-crit, df, ncp)
        return float(stats.nct.sf(crit, df, ncp) + (lower if math.isfinite(lower) else 0.0))

    out["power_at_n"] = power_at(min(len(x), len(y)))
    if out["cohens_d"] > 0:
        out["seeds_needed"] = next((n for n in range(2, max_n + 1) if power_at(n) >= power), max_n + 1)
    return out


EQUIVALENCE_COLUMNS = ["metric", "a", "b", "n_a", "n_b", "diff", "ci90_low", "ci90_high", "margin", "tost_p",
                       "equivalent", "seeds_for_margin"]


def equivalence_tests(runs: pd.DataFrame, metric: str, margin: float, by: str = "strategy", order=None,
                      alpha: float = ALPHA) -> pd.DataFrame:
    """Every pair of strategies on `metric`: the two one-sided Welch tests (TOST, statsmodels' `ttost_ind`) of
    |mean_a - mean_b| < `margin`, the margin declared before the study ran. `equivalent` when tost_p < alpha, i.e.
    the (1 - 2·alpha) interval of the difference lies inside ±margin: the only ground for "no difference"; a pair
    that is neither separated nor equivalent is undecided at these seeds. `seeds_for_margin`: seeds per strategy
    that Welch's test at `alpha` needs to detect a difference of `margin` with 80% power, at the observed spreads."""
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW, ttost_ind

    groups = {name: _finite(g[metric]) for name, g in runs.groupby(by, sort=True)} if metric in runs else {}
    names = [n for n in (order if order is not None else sorted(groups)) if n in groups and len(groups[n]) >= 2]
    rows = []
    for a, b in combinations(names, 2):
        x, y = groups[a], groups[b]
        row = dict(metric=metric, a=a, b=b, n_a=len(x), n_b=len(y), diff=float(x.mean() - y.mean()), margin=margin)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = ttost_ind(x, y, -margin, margin, usevar="unequal")[0]
            low, high = CompareMeans(DescrStatsW(x), DescrStatsW(y)).tconfint_diff(alpha=2 * alpha, usevar="unequal")
        row.update(ci90_low=float(low), ci90_high=float(high), tost_p=float(p))
        row["equivalent"] = bool(math.isfinite(row["tost_p"]) and row["tost_p"] < alpha)
        shifted = runs[runs[by].isin([a, b])].copy()  # the power to detect `margin`: b moved to a's mean - margin
        shifted.loc[shifted[by] == b, metric] = pd.to_numeric(shifted.loc[shifted[by] == b, metric],
                                                              errors="coerce") - y.mean() + x.mean() - margin
        row["seeds_for_margin"] = power_analysis(shifted, metric, a, b, by=by, alpha=alpha)["seeds_needed"]
        rows.append(row)
    return pd.DataFrame(rows, columns=EQUIVALENCE_COLUMNS)


def parse_margins(value, key: str = "margins") -> dict[str, float]:
    """Equivalence margins as {metric: margin > 0}: a mapping (YAML), or a list of "metric:margin" strings (what a
    command line can pass: Hydra's dict keys cannot hold the / of a metric name)."""
    if value is None:
        return {}
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        pairs = [str(v).rsplit(":", 1) for v in value]
        require(all(len(p) == 2 for p in pairs), key, value, 'must be a list of "metric:margin" strings')
        value = dict(pairs)
    require(isinstance(value, dict), key, value, 'must map metrics to margins, or list "metric:margin" strings')
    out = {}
    for metric, margin in value.items():
        try:
            out[str(metric)] = float(margin)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{metric}={margin!r}: a margin must be a number") from None
        require(out[str(metric)] > 0, f"{key}.{metric}", margin, "a margin must be > 0")
    return out


def declared_protocol(parents: pd.DataFrame) -> dict:
    """The study's pre-registered protocol (`protocol:` of its sweep YAML, recorded on the parent run): alpha and the
    equivalence margin of each tested metric. {} when none was declared."""
    if parents.empty or "tags.sweep_yaml" not in parents or not isinstance(parents["tags.sweep_yaml"].iloc[-1], str):
        return {}
    try:
        sweep = OmegaConf.to_container(OmegaConf.create(parents["tags.sweep_yaml"].iloc[-1]))
    except Exception:  # noqa: BLE001 - a cut-off tag
        return {}
    return dict(sweep.get("protocol") or {})


# ------------------------------------------------------------------------------------------------ guidance axis
# `metrics.guidance_scales` logs `eval/cfg<scale>/<metric>` (test prompts) and `eval_<split>/cfg<scale>/<metric>`
# (the selection split's prompts, val by default) beside the unsuffixed eval/* of the shared default scale
# (`metrics.cfg`); see sorabench.metrics.evaluate.guidance_key.

GUIDANCE_KEY = re.compile(r"(eval(?:_[A-Za-z0-9]+)?)/cfg([0-9]+(?:\.[0-9]+)?)/(.+)")
GUIDANCE_PLOTS = ("acc_all", "fvd")


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
        on_axis = _ok(default) and (reported.scale == default).any()
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


def plot_guidance(g: pd.DataFrame, metric: str, path: Path, default: float = math.nan, order=None,
                  by: str = "strategy") -> Path:
    """`eval/cfg*/<metric>` against the guidance scale, one line per strategy: mean over seeds ± 95% CI."""
    fig, ax = _new_plot()
    d = g[(g.prefix == "eval") & (g.metric == metric)]
    names = [s for s in (order if order is not None else sorted(set(d[by]))) if s in set(d[by])]
    for i, name in enumerate(names):
        r = d[d[by] == name].sort_values("scale")
        x = r["scale"].to_numpy() * (1 + 0.012 * (i - (len(names) - 1) / 2))  # a small dodge: CIs stay readable
        ax.errorbar(x, r["mean"], yerr=r["ci95"].fillna(0).to_numpy(), marker="o", ms=4, capsize=3,
                    label=f"{name} (n={int(r['n'].max())})")
    if _ok(default):
        ax.axvline(default, color="grey", ls=":", lw=1, label=f"shared default ({default:g})")
    return _save_plot(fig, ax, path, "classifier-free guidance scale", f"eval/{metric}",
                      f"eval/{metric} vs guidance: mean over seeds, bars = 95% CI")


def guidance_markdown(g: pd.DataFrame, best: pd.DataFrame, metric: str, direction: str, plots: dict[str, str],
                      protocol: str) -> list[str]:
    md = ["## Guidance", ""]
    if g.empty:
        return md + ["No guidance axis was logged (metrics.guidance_scales=[] in these runs).", ""]
    md.append(f"Each model scored at every guidance scale of the axis ({protocol}); mean ± 95% CI over seeds. "
              "Scales share prompts and sampling seeds, so they differ only by guidance. FVD depends on the clip "
              "count: compare axis values with each other, not with the unsuffixed eval/* numbers.")
    md.append("")
    md += [f"![guidance: {m}]({name})\n" for m, name in plots.items()]
    if not best.empty:
        oracle = best.chosen_on.str.contains("oracle").any()
        md.append(f"Each strategy at its own best scale — the scale with the best mean {metric} "
                  f"({'lower' if direction == 'minimize' else 'higher'} is better) on "
                  + ("**the test prompts themselves: an oracle choice** (selection on test, optimistic; set "
                     "metrics.guidance_select_split=val)" if oracle else
                     f"the {best.chosen_on.iloc[0]} (held apart from the test prompts reported here)")
                  + " — and at the shared default scale. Values are on the test prompts.")
        md.append("")
        shown = [c.removesuffix("_best_mean") for c in best.columns if c.endswith("_best_mean")]
        headers = ["strategy", "best scale", f"{metric} on {best.chosen_on.iloc[0]}",
                   *[f"{m} at best" for m in shown], "default scale", *[f"{m} at default" for m in shown]]
        rows = [[r.strategy, fmt(r.best_scale, 3), fmt(r.selection_value),
                 *[fmt_ci(getattr(r, f"{m}_best_mean"), getattr(r, f"{m}_best_ci95")) for m in shown],
                 fmt(r.default_scale, 3),
                 *[fmt_ci(getattr(r, f"{m}_default_mean"), getattr(r, f"{m}_default_ci95")) for m in shown]]
                for r in best.itertuples()]
        md += [md_table(headers, rows), ""]
        if (best.default_from != "axis").any():
            md += ["The default scale is not on the axis: its columns are the unsuffixed eval/* numbers, from "
                   "metrics.n_samples clips (their FVD is not comparable with the axis's).", ""]
    table = g[(g.prefix == "eval") & g.metric.isin(GUIDANCE_PLOTS)]
    if len(table):
        wide = table.assign(cell=[fmt_ci(a, b) for a, b in zip(table["mean"], table["ci95"])]).pivot_table(
            index=["strategy", "scale"], columns="metric", values="cell", aggfunc="first")
        cols = [m for m in GUIDANCE_PLOTS if m in wide]
        md += [md_table(["strategy", "scale", *[f"eval/{m}" for m in cols]],
                        [[s, fmt(sc, 3), *[wide.loc[(s, sc), m] for m in cols]] for s, sc in wide.index]), ""]
    return md


# ------------------------------------------------------------------------------------------------ formatting


def _ok(x) -> bool:
    try:
        return x is not None and x is not pd.NA and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x, digits: int = 4) -> str:
    return f"{float(x):.{digits}g}" if _ok(x) else "–"


def fmt_ci(mean, ci, bounds: tuple[float, float] | None = None) -> str:
    """'mean ± ci'; 'mean ± n/a' with a single run; '–' without any. A metric with `bounds` (an accuracy: [0, 1])
    whose interval crosses one shows the interval cut to them, 'mean [low, high]', not a range it cannot take."""
    if not _ok(mean):
        return "–"
    if not _ok(ci):
        return f"{fmt(mean)} ± n/a"
    if bounds is not None and (mean - ci < bounds[0] or mean + ci > bounds[1]):
        return f"{fmt(mean)} [{fmt(max(bounds[0], mean - ci), 2)}, {fmt(min(bounds[1], mean + ci), 2)}]"
    return f"{fmt(mean)} ± {fmt(ci, 2) if ci > 1e-9 * max(abs(float(mean)), 1e-12) else '0'}"


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric can take, where it has one: accuracies (eval/acc_*, eval/*_acc_*) and binding scores
    (eval/bind_*, eval/*_bind_*: shares of objects, clips or twin pairs) lie in [0, 1]."""
    base = str(metric).rsplit("/", 1)[-1]
    shares = ("acc", "chance", "bind")
    return (0.0, 1.0) if base.startswith(shares) or "_acc_" in base or "_bind_" in base else None


def fmt_p(p) -> str:
    if not _ok(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_params(p) -> str:
    return f"{float(p) / 1e6:.2f}M" if _ok(p) else "–"


def md_table(headers, rows) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ").strip() or " "

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_cell(summary: pd.DataFrame, strategy, metric: str) -> str:
    row = summary.loc[strategy]
    text = fmt_ci(row.get(f"{metric}_mean"), row.get(f"{metric}_ci95"), metric_bounds(metric))
    k = row.get(f"{metric}_n")
    if _ok(k) and 0 < int(k) < int(row["n"]):
        text += f" (n={int(k)})"
    return text


def _arrow(direction: str) -> str:
    return "↓" if direction == "minimize" else "↑"


def reading(
    summary: pd.DataFrame, tests: pd.DataFrame, metric: str, direction: str, comp: pd.DataFrame | None = None,
    excluded: int = 0,
) -> str:
    """One plain-text paragraph: the best strategy on `metric`, whether it beats the runner-up at p<0.05 (Welch),
    and its all-attributes accuracy against chance. `summary` ranked best first (`rank_strategies`), `tests` from
    `pairwise_tests` on `metric`."""
    better = "lower" if direction == "minimize" else "higher"
    ranked = summary[summary[f"{metric}_mean"].notna()]
    if ranked.empty:
        return f"No completed run logged {metric}, so no strategy can be ranked on it."
    best = ranked.index[0]
    b = ranked.loc[best]
    mean, ci, n = f"{metric}_mean", f"{metric}_ci95", f"{metric}_n"
    parts = [
        f"On {metric} ({better} is better) the best strategy is {best} at {fmt_ci(b[mean], b[ci])}"
        f" (mean ± 95% CI over n={int(b[n])} seeds)."
    ]
    if len(ranked) < 2:
        parts.append("It is the only strategy with this metric, so there is nothing to compare it with.")
    else:
        second = ranked.index[1]
        s = ranked.loc[second]
        pair = tests[((tests.a == best) & (tests.b == second)) | ((tests.a == second) & (tests.b == best))]
        raw = pair["welch_p"].iloc[0] if len(pair) else math.nan
        p = pair["welch_p_holm"].iloc[0] if len(pair) and "welch_p_holm" in pair else raw
        mwu = pair["mwu_p"].iloc[0] if len(pair) else math.nan
        gap = abs(b[mean] - s[mean])
        text = (
            f"The runner-up is {second} at {fmt_ci(s[mean], s[ci])} (n={int(s[n])}),"
            f" {fmt(gap)} {'worse' if gap > 0 else 'apart'};"
        )
        if _ok(p):
            verdict = "significant" if p < ALPHA else "not significant"
            text += f" the difference is {verdict} at p<{ALPHA:g}"
            text += (f" (Welch t-test, Holm-adjusted over all pairs of the tested metrics p={fmt_p(p)},"
                     f" unadjusted p={fmt_p(raw)}; Mann–Whitney p={fmt_p(mwu)}).")
            if min(int(b[n]), int(s[n])) < 5:
                text += " With fewer than 5 seeds per strategy the tests have little power."
        else:
            text += " the difference could not be tested (a strategy has fewer than 2 runs, or no variance)."
        parts.append(text)
    if "eval/acc_all_mean" in summary and _ok(summary.loc[best, "eval/acc_all_mean"]):
        acc = summary.loc[best, "eval/acc_all_mean"]
        acc_ci = fmt(summary.loc[best, "eval/acc_all_ci95"], 2)
        text = f"{best} gets all attributes of the prompt right in {fmt(acc, 3)} of clips (eval/acc_all, ± {acc_ci})"
        chance = summary.loc[best].get("eval/chance_all_mean")
        if _ok(chance) and chance > 0:
            text += f" against a chance level of {fmt(chance, 3)} (uniform guessing), {fmt(acc / chance, 3)}× chance"
        else:
            text += " (chance level not logged)"
        if comp is not None and len(comp):
            row = comp[(comp.strategy == best) & (comp.attribute == "all")] if "strategy" in comp else comp.iloc[:0]
            if len(row):
                r = row.iloc[0]
                text += f"; {fmt(r.seen_mean, 3)} on seen and {fmt(r.unseen_mean, 3)} on unseen compositions"
        parts.append(text + ".")
    elif "eval/bind_all_mean" in summary and _ok(summary.loc[best, "eval/bind_all_mean"]):  # the binding task
        row = summary.loc[best]
        text = (f"{best} shows every object of the prompt with its own attributes in {fmt(row['eval/bind_all_mean'], 3)}"
                f" of clips (eval/bind_all, ± {fmt(row['eval/bind_all_ci95'], 2)})")
        if _ok(row.get("eval/bind_chance_all_mean")):
            text += f" against a chance level of {fmt(row['eval/bind_chance_all_mean'], 3)}"
        if _ok(row.get("eval/bind_twins_mean")):
            text += f"; both clips of a swapped-binding twin pair right in {fmt(row['eval/bind_twins_mean'], 3)}"
        if _ok(row.get("eval/real_bind_all_mean")):
            text += f" (the evaluator reads {fmt(row['eval/real_bind_all_mean'], 3)} of real clips fully right)"
        parts.append(text + ".")
    else:
        parts.append(f"eval/acc_all was not logged for {best}, so its text alignment cannot be compared with chance.")
    if excluded:
        parts.append(f"{excluded} failed, pruned or unfinished run{'s' if excluded > 1 else ''} were left out.")
    return " ".join(parts)


def equivalence_reading(summary: pd.DataFrame, equivalence: pd.DataFrame, metric: str) -> str:
    """The TOST verdict of the best strategy against the runner-up on `metric`, for the reading: with no declared
    margin a pair that is not separated is undecided, and the reading says so."""
    ranked = [s for s in summary.index if _ok(summary.loc[s].get(f"{metric}_mean"))]
    if len(ranked) < 2:
        return ""
    best, second = ranked[:2]
    rows = equivalence[(equivalence.metric == metric) & (((equivalence.a == best) & (equivalence.b == second)) |
                                                         ((equivalence.a == second) & (equivalence.b == best)))]
    if rows.empty:
        return (f" No equivalence margin was declared for {metric}: if the two are not separated, that is no evidence "
                "that they are the same.")
    r = rows.iloc[0]
    if r.equivalent:
        return (f" {best} and {second} are equivalent within ±{fmt(r.margin, 3)} on {metric} (TOST p={fmt_p(r.tost_p)},"
                f" 90% CI of the difference [{fmt(r.ci90_low, 3)}, {fmt(r.ci90_high, 3)}]).")
    return (f" Equivalence within the declared ±{fmt(r.margin, 3)} on {metric} is not shown (TOST p={fmt_p(r.tost_p)}):"
            " where they are not separated either, the comparison is undecided at these seeds.")


def budget_line(runs: pd.DataFrame) -> str:
    """How the runs' training budget was set (`budget`, `budget_reference`, `trainer.max_steps` params), in words."""
    def values(col: str) -> list[str]:
        return sorted(set(runs[col].dropna().astype(str)), key=lambda v: (len(v), v)) if col in runs else []  # 800 < 1200

    kinds, steps = values("params.budget") or ["steps"], values("params.trainer.max_steps")
    if kinds == ["flops"]:
        ref = ", ".join(values("params.budget_reference")) or "?"
        return (f"training budget: equal FLOPs (budget=flops): each strategy's steps scaled to the training FLOPs of "
                f"{ref}; steps per run: {', '.join(steps) or '?'}")
    if kinds == ["steps"]:
        return f"training budget: equal steps (budget=steps): {', '.join(steps) or '?'} steps per run"
    return f"training budget: MIXED ({', '.join(kinds)}) - these runs were not trained under one budget"


# --------------------------------------------------------------------------------------------------- MLflow


def _to_int(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return pd.NA


def _time(ms) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _state(tags: dict, status: str) -> str:
    state = tags.get("optuna.state")
    if state:  # "COMPLETE", or "TrialState.COMPLETE" from str(TrialState)
        return str(state).rsplit(".", 1)[-1].upper()
    return _STATUS_TO_STATE.get(status, status)


def runs_frame(runs) -> tuple[pd.DataFrame, list[str]]:
    """MLflow `Run`s as one flat row each: ID_COLUMNS, then metrics by their bare key (final values), then
    `params.<key>` and `tags.<key>`. Returns the frame and the metric keys."""
    rows, metrics, params, tags = [], set(), set(), set()
    for run in runs:
        t, p = run.data.tags, run.data.params
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "trial": _to_int(t.get("optuna.trial_number")),
            "strategy": t.get("sorabench.strategy") or p.get("conditioning.name") or "unknown",
            "seed": _to_int(p.get("seed")),
            "state": _state(t, run.info.status),
            "failure_reason": t.get("failure_reason", ""),
            "status": run.info.status,
            "role": t.get("sorabench.role", ""),
            "study": t.get("sorabench.study", ""),
            "parent_run_id": t.get("mlflow.parentRunId", ""),
            "start_time": _time(run.info.start_time),
            "end_time": _time(run.info.end_time),
        }
        row.update({k: v for k, v in run.data.metrics.items() if k not in ID_COLUMNS})
        row.update({f"params.{k}": v for k, v in p.items()})
        row.update({f"tags.{k}": v for k, v in t.items()})
        metrics.update(run.data.metrics)
        params.update(f"params.{k}" for k in p)
        tags.update(f"tags.{k}" for k in t)
        rows.append(row)
    metrics = sorted(metrics - set(ID_COLUMNS))
    frame = pd.DataFrame(rows, columns=ID_COLUMNS + metrics + sorted(params) + sorted(tags))
    frame[["trial", "seed"]] = frame[["trial", "seed"]].astype("Int64")
    return frame, metrics


def select_study_runs(frame: pd.DataFrame, study: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(child runs, parent runs). Parents: runs tagged `sorabench.role=study` (of `study` when given and any is);
    children: their runs via `mlflow.parentRunId`. Without a parent run every other run of the experiment counts."""
    parents = frame[frame.role == "study"]
    if study and (parents.study == study).any():
        parents = parents[parents.study == study]
    if len(parents):
        children = frame[frame.parent_run_id.isin(parents.run_id)]
    else:  # `evaluate ckpt=` runs re-score a run under another protocol: never counted as runs of their own
        children = frame[~frame.role.isin(["study", "evaluation"])]
    return children, parents.sort_values("start_time", na_position="first")


def search_all_runs(client, experiment_id: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def fetch_histories(client, runs: pd.DataFrame, metrics, by: str = "strategy") -> dict[str, pd.DataFrame]:
    """{metric: DataFrame(by, run_id, step, timestamp, value)} from `MlflowClient.get_metric_history`."""
    out = {}
    for m in metrics:
        rows = [
            (strategy, run_id, point.step, point.timestamp, point.value)
            for run_id, strategy, value in zip(runs.run_id, runs[by], runs[m])
            if pd.notna(value)
            for point in client.get_metric_history(run_id, m)
        ]
        if rows:
            out[m] = pd.DataFrame(rows, columns=[by, "run_id", "step", "timestamp", "value"])
    return out


def plot_history(agg: pd.DataFrame, metric: str, path: Path, order=None, by: str = "strategy") -> Path:
    """Mean over seeds per strategy against the training step, with a 95% CI band (Student t over seeds); PNG via the Agg canvas."""
    fig, ax = _new_plot()
    names = [s for s in (order if order is not None else sorted(agg[by].unique())) if s in set(agg[by])]
    for name in names:
        g = agg[agg[by] == name].sort_values("step")
        runs = int(g["n"].max())
        (line,) = ax.plot(g["step"], g["mean"], marker="o" if len(g) < 20 else None, ms=3, label=f"{name} (n={runs})")
        if runs > 1:
            band = g["ci95"].fillna(0.0) if "ci95" in g else None
            low, high = (g["mean"] - band, g["mean"] + band) if band is not None else (g["min"], g["max"])
            ax.fill_between(g["step"], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return _save_plot(fig, ax, path, "training step", metric, f"{metric}: mean over seeds, band = 95% CI")


def _new_plot():
    """A figure and its axes on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_pareto(runs: pd.DataFrame, front: pd.Series, objectives: list[tuple[str, str]], path: Path,
                by: str = "strategy") -> Path:
    """Every completed run on the two objectives, one colour per report row; the non-dominated runs joined by a line."""
    (x, dx), (y, dy) = objectives
    fig, ax = _new_plot()
    for name, g in runs.groupby(by, sort=True):
        ax.scatter(pd.to_numeric(g[x], errors="coerce"), pd.to_numeric(g[y], errors="coerce"), s=18, label=str(name))
    f = runs[front].assign(_x=lambda d: pd.to_numeric(d[x]), _y=lambda d: pd.to_numeric(d[y])).sort_values("_x")
    ax.plot(f["_x"], f["_y"], color="black", lw=1, marker="o", mfc="none", ms=9, label="Pareto front")
    return _save_plot(fig, ax, path, f"{x} ({_arrow(dx)})", f"{y} ({_arrow(dy)})",
                      f"{x} vs {y}: {int(front.sum())} non-dominated of {len(runs)} runs")


def pareto_markdown(runs: pd.DataFrame, front: pd.Series, objectives: list[tuple[str, str]], plot: str) -> list[str]:
    names = " and ".join(f"{m} ({_arrow(d)})" for m, d in objectives)
    md = ["## Pareto front", "", f"The study has two objectives, {names}. A run is on the front when no other "
          "completed run is at least as good on both and better on one (each run is one point; seeds are not "
          "averaged).", ""]
    rows = [[fmt(r.trial), r.strategy, *[fmt(r[m]) for m, _ in objectives], r.run_id]
            for _, r in runs[front].sort_values(objectives[0][0]).iterrows()]
    md += [md_table(["trial", "row", *[m for m, _ in objectives], "run"], rows), "", f"![Pareto front]({plot})", ""]
    return md


def plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") + ".png"


# --------------------------------------------------------------------------------------------------- report


def render_markdown(
    *, title: str, header: list[str], summary: pd.DataFrame, metric: str, direction: str, metrics: list[str],
    tests: dict[str, pd.DataFrame], comp: pd.DataFrame, excluded: pd.DataFrame, plots: dict[str, str], text: str,
    refs: pd.DataFrame | None = None, power: pd.DataFrame | None = None, guidance: list[str] = (),
    pareto: list[str] = (), row: str = "strategy", equivalence: pd.DataFrame | None = None, binding: list[str] = (),
) -> str:
    order = list(summary.index)
    md = [f"# {title}", "", *[f"- {h}" for h in header], ""]

    ranked = "Strategies" if row == "strategy" else f"Rows (group_by: {row})"
    md += [f"## {ranked}, ranked by {metric} ({_arrow(direction)})", ""]
    md.append("Mean ± 95% confidence interval over seeds (Student t: mean ± t₀.₉₇₅,ₙ₋₁·s/√n; n/a with one run). "
              "Only COMPLETE runs count.")
    md.append("")
    key = [metric] + [m for m in KEY_METRICS if m != metric and f"{m}_mean" in summary]
    arrows = [_arrow(direction if m == metric else metric_direction(m)) for m in key]
    headers = ["rank", row, "n", *[f"{m} {a}" for m, a in zip(key, arrows)], "params", "GFLOPs"]
    rows = [
        [fmt(summary.loc[s, "rank"], 3), s, int(summary.loc[s, "n"]), *[_summary_cell(summary, s, m) for m in key],
         fmt_params(summary.loc[s].get(f"{PARAMS}_mean")), fmt(summary.loc[s].get(f"{GFLOPS}_mean"), 3)]
        for s in order
    ]
    md += [md_table(headers, rows), ""]
    if "seeds" in summary:
        seeds = {s: summary.loc[s, "seeds"].split(";") for s in order}
        dup = [s for s in order if len(set(seeds[s])) < len(seeds[s])]
        md.append("Seeds: " + "; ".join(f"{s}: {summary.loc[s, 'seeds'] or '?'}" for s in order) + ".")
        if dup:
            md.append(f"Note: {', '.join(dup)} repeat a seed; n counts runs, not distinct seeds.")
        md.append("")

    others = [m for m in metrics if not m.startswith("eval/chance_") and not GUIDANCE_KEY.fullmatch(m)]
    md += ["## All metrics", "", "Mean ± 95% CI over seeds; (n=k) where fewer runs logged the metric.", ""]
    md += [md_table(["metric", *order], [[m, *[_summary_cell(summary, s, m) for s in order]] for m in others]), ""]

    md += ["## Pairwise tests", ""]
    md.append(f"Welch's t-test (unequal variances) and the two-sided Mann–Whitney U test per pair of strategies; "
              f"diff = mean A − mean B; Holm = Welch p adjusted over every pair of every tested metric "
              f"({', '.join(tests)}) together. The reading calls a difference significant on the Holm p. "
              f"Significance level {ALPHA:g}.")
    md.append("")
    for m, t in tests.items():
        md += [f"### {m}", ""]
        if t.empty:
            md += ["Fewer than two strategies logged this metric: nothing to test.", ""]
            continue
        rows = [
            [r.a, r.b, r.n_a, r.n_b, fmt(r.mean_a), fmt(r.mean_b), fmt(r["diff"]), fmt(r.welch_t, 3),
             fmt_p(r.welch_p), fmt_p(r.welch_p_holm), fmt(r.mwu_u, 3), fmt_p(r.mwu_p), r.note]
            for _, r in t.iterrows()
        ]
        headers = ["A", "B", "n A", "n B", "mean A", "mean B", "diff", "Welch t", "Welch p", "Holm p", "MWU U",
                   "MWU p", "note"]
        md += [md_table(headers, rows), ""]
    if not tests:
        md += ["No tested metric was logged.", ""]

    md += ["## Composition: seen vs unseen", ""]
    if comp.empty:
        md += ["No eval/acc_<attr>_seen / eval/acc_<attr>_unseen metrics were logged.", ""]
    else:
        md.append("Attribute accuracy on prompts whose attribute combination was seen in training vs held out; "
                  "gap = seen − unseen, paired per run; chance = uniform guessing (1/K; product of all for `all`).")
        md.append("")
        rows = [
            [r.strategy, r.attribute, fmt(r.chance, 3), fmt_ci(r.seen_mean, r.seen_ci95),
             fmt_ci(r.unseen_mean, r.unseen_ci95), fmt_ci(r.gap_mean, r.gap_ci95)]
            for _, r in comp.iterrows()
        ]
        md += [md_table(["strategy", "attribute", "chance", "seen", "unseen", "gap"], rows), ""]

    md += list(binding)
    md += ["## Reference points: real clips, the VAE's ceiling, noise", ""]
    if refs is None or refs.empty:
        md += ["No eval/real_acc_* metrics were logged.", ""]
    else:
        md.append("What the evaluator reads (accuracy against the prompts' labels) from the real evaluation clips, "
                  "from the shared VAE's reconstructions of those clips (no latent DiT can show more: the ceiling) "
                  "and from pure noise (the floor). A strategy's accuracy is read against the ceiling, not 1.0.")
        md.append("")
        rows = [[r.attribute, *[fmt(r[src], 3) for src in REFERENCE_SOURCES]] for _, r in refs.iterrows()]
        md += [md_table(["attribute", *REFERENCE_SOURCES.values()], rows), ""]

    md += ["## Power", ""]
    if power is None or power.empty:
        md += ["Fewer than two strategies with two or more runs: no power analysis.", ""]
    else:
        level = power.alpha.iloc[0] if "alpha" in power else ALPHA
        md.append("Observed effect of the best strategy against the runner-up and the worst (Cohen's d, pooled sd) "
                  "and the seeds per strategy the report's own decision needs to separate them with 80% power: "
                  f"Welch's two-sided t-test (each strategy's own spread) at α = {level:.3g}: {ALPHA:g} divided by "
                  f"the {holm_family(tests)} tests of the pairwise section, the strictest step of their Holm "
                  "adjustment (noncentral t). The observed effect and spreads of a small study are themselves noisy: "
                  "read the seed count as an order of magnitude, and plan seeds from the declared smallest effect of "
                  "interest (the equivalence margin, next section), not from the observed one. No 'observed power' is "
                  "shown: at the observed effect it only re-expresses the p-value.")
        md.append("")
        def holm_p(r) -> float:
            t = tests.get(r.metric)
            pair = t[((t.a == r.a) & (t.b == r.b)) | ((t.a == r.b) & (t.b == r.a))] if t is not None else None
            return float(pair.welch_p_holm.iloc[0]) if pair is not None and len(pair) else math.nan

        rows = []
        for _, r in power.iterrows():
            p = holm_p(r)
            verdict = "separated" if _ok(p) and p < ALPHA else "not separated"
            seeds = "–" if not _ok(r.seeds_needed) else (
                f"> {int(r.seeds_needed) - 1}" if r.seeds_needed > 1000 else str(int(r.seeds_needed)))
            rows.append([r.metric, r.a, r.b, fmt(r["diff"]), fmt_p(p), verdict, fmt(r.cohens_d, 3), seeds])
        headers = ["metric", "best", "vs", "diff", "Holm p", "at α", "Cohen's d", "seeds for 80% (observed d)"]
        md += [md_table(headers, rows), ""]

    md += ["## Equivalence (TOST at the declared margins)", ""]
    if equivalence is None or equivalence.empty:
        md += ["No equivalence margin was declared (`protocol.margins` of the sweep YAML, or `margins=` of the "
               "report): a pair that is not separated is undecided, never \"the same\".", ""]
    else:
        md.append("Two one-sided Welch tests (statsmodels `ttost_ind`) of |mean A − mean B| < margin, the margin "
                  "declared before the study ran. equivalent: TOST p < α, i.e. the 90% interval of the difference "
                  "lies inside ±margin. A pair neither separated (pairwise tests) nor equivalent is undecided at these "
                  "seeds; 'seeds for margin' is what Welch's test needs to detect a difference of the margin with 80% "
                  "power at the observed spreads.")
        md.append("")
        rows = [[r.metric, r.a, r.b, fmt(r["diff"]), f"[{fmt(r.ci90_low, 3)}, {fmt(r.ci90_high, 3)}]",
                 f"±{fmt(r.margin, 3)}", fmt_p(r.tost_p), "equivalent" if r.equivalent else "not shown",
                 "–" if not _ok(r.seeds_for_margin) else str(int(r.seeds_for_margin))]
                for _, r in equivalence.iterrows()]
        md += [md_table(["metric", "A", "B", "diff", "90% CI", "margin", "TOST p", "verdict", "seeds for margin"],
                        rows), ""]

    md += list(guidance)
    md += list(pareto)

    md += ["## Failed, pruned and unfinished runs", ""]
    if excluded.empty:
        md += ["None: every child run completed.", ""]
    else:
        rows = [
            [fmt(r.trial), r.strategy, fmt(r.seed), r.state, r.failure_reason or "–", r.run_id]
            for _, r in excluded.iterrows()
        ]
        md += [md_table(["trial", "strategy", "seed", "state", "reason", "run"], rows), ""]

    md += ["## Training curves", ""]
    if plots:
        md += [f"![{m}]({name})\n" for m, name in plots.items()]
    else:
        md += ["No metric history with more than one point.", ""]

    md += ["## Reading", "", text, ""]
    return "\n".join(md)


def _print(summary: pd.DataFrame, metric: str, direction: str, text: str, out_dir: Path, files: list[str],
           row: str = "strategy"):
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(soft_wrap=True, width=200)
    key = [metric] + [m for m in KEY_METRICS if m != metric and f"{m}_mean" in summary]
    arrows = [_arrow(direction if m == metric else metric_direction(m)) for m in key]
    table = Table("rank", row, "n", *[f"{m} {a}" for m, a in zip(key, arrows)], "params", "GFLOPs",
                  title=f"{'strategies' if row == 'strategy' else row} by {metric} (mean ± 95% CI)")
    for s in summary.index:
        table.add_row(
            fmt(summary.loc[s, "rank"], 3), str(s), str(int(summary.loc[s, "n"])),
            *[_summary_cell(summary, s, m) for m in key],
            fmt_params(summary.loc[s].get(f"{PARAMS}_mean")), fmt(summary.loc[s].get(f"{GFLOPS}_mean"), 3),
        )
    console.print(table)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {', '.join(files)} to {out_dir}", markup=False, highlight=False)


def _open_store(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite"):
        db = Path(uri.split("///", 1)[-1])
        if not db.is_file():
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: no MLflow database at {db} (run a sweep first, "
                              "or point outputs= / mlflow.tracking_uri at the study's store)")
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


# What makes two runs' numbers comparable: the evaluation protocol each run tags (feature network and its weights,
# clips, frames, guidance, sampler steps, split, ...) and the numeric precision it trained and sampled in.
PROTOCOL_TAG_PREFIX, PROTOCOL_PARAMS = "tags.eval.protocol.", ("params.trainer.precision",)


def check_protocols(runs: pd.DataFrame, keys: list[str]) -> str:
    """The hash of the protocol the runs share; a ConfigError naming the first field on which they differ (their
    numbers must not be pooled or ranked together), unless that field is a `group_by` key (then rows differ by it
    on purpose)."""
    import hashlib

    columns = sorted(c for c in runs if c.startswith(PROTOCOL_TAG_PREFIX) or c in PROTOCOL_PARAMS)
    shared = {}
    for col in columns:
        values = sorted(set(runs[col].dropna().astype(str)))
        field = col.removeprefix(PROTOCOL_TAG_PREFIX).removeprefix("params.")
        if len(values) > 1 and col.removeprefix("params.") not in keys:
            counts = ", ".join(f"{v!r} ({int((runs[col].astype(str) == v).sum())} runs)" for v in values[:4])
            raise ConfigError(f"eval protocol {field}: the runs were evaluated differently ({counts}); their numbers "
                              "cannot be pooled or ranked together: report each protocol on its own (experiment=, or "
                              f"group_by=[strategy,{field}] for a logged config key)")
        shared[field] = values
    return hashlib.sha256(repr(sorted(shared.items())).encode()).hexdigest()[:12] if shared else "none logged"


# Logged on the study's parent run per row (`summary/<row>/<metric>`, the mean over seeds), beside the headline.
SUMMARY_METRICS = ["eval/acc_all", "eval/acc_seen", "eval/acc_unseen", "eval/bind_all", "eval/bind_twins", "eval/fvd",
                   "eval/fid", "val/loss"]


def log_summary_metrics(client, run_id: str, summary: pd.DataFrame, metrics: list[str]):
    """The report's per-row means as metrics of the parent run: its page compares the strategies at a glance."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    safe = {row: re.sub(r"[^\w\-. /]+", "_", str(row)) for row in summary.index}  # MLflow's allowed key characters
    batch = [Metric(f"summary/{safe[row]}/{m}", float(summary.at[row, f"{m}_mean"]), now, 0)
             for m in dict.fromkeys(metrics) if f"{m}_mean" in summary
             for row in summary.index if pd.notna(summary.at[row, f"{m}_mean"])]
    for i in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def main(cfg: DictConfig) -> int:
    study = None if cfg.study is None else str(cfg.study)
    name = str(cfg.experiment) if cfg.experiment is not None else study
    key = "experiment" if cfg.experiment is not None else "study"
    metric = str(cfg.metric)
    direction = metric_direction(metric, str(cfg.direction))
    keys = group_keys(OmegaConf.to_container(cfg.group_by) if OmegaConf.is_config(cfg.group_by) else cfg.group_by)
    row = " × ".join(keys)
    uri = str(cfg.mlflow.tracking_uri)
    client = _open_store(uri)

    def existing() -> str:
        names = sorted(e.name for e in client.search_experiments())
        return ", ".join(names) or "none"

    if name is None:
        raise ConfigError(f"study=None: set study=<name> or experiment=<name>; experiments in {uri}: {existing()}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise ConfigError(f"{key}={name!r}: no such MLflow experiment in {uri}; existing experiments: {existing()}")

    frame, all_metrics = runs_frame(search_all_runs(client, experiment.experiment_id))
    children, parents = select_study_runs(frame, study)
    protocol_hash = check_protocols(children[children.state == COMPLETE], keys)
    children = children.sort_values(["trial", "start_time"], na_position="last", kind="stable")
    labels = group_labels(children, keys)
    runs_csv = children.assign(group=labels)
    # Every statistic groups by the `strategy` column: with group_by it holds the row label instead.
    children = children.assign(strategy=labels)
    complete = children[children.state == COMPLETE]
    excluded = children[children.state != COMPLETE]
    if complete.empty:
        counts = excluded.state.value_counts()
        detail = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
        raise ConfigError(f"{key}={name!r}: no completed runs in experiment {name!r} (child runs: {detail})")

    metrics = [m for m in all_metrics if complete[m].notna().any()]
    require(metric in metrics, "metric", metric, f"not logged by any completed run; logged: {', '.join(metrics)}")
    direction = metric_direction(metric, str(cfg.direction), complete)  # now with the flags the runs logged
    summary = rank_strategies(summarise(complete, metrics), metric, direction)
    order = list(summary.index)
    tested = [m for m in dict.fromkeys([metric, *TESTED_METRICS]) if m in metrics]
    tests = holm_across({m: pairwise_tests(complete, m, order=order) for m in tested})
    declared = declared_protocol(parents)
    margins = {**parse_margins(declared.get("margins"), "protocol.margins"), **parse_margins(cfg.margins)}
    equivalence = pd.concat([equivalence_tests(complete, m, float(margins[m]), order=order) for m in tested
                             if m in margins] or [pd.DataFrame(columns=EQUIVALENCE_COLUMNS)], ignore_index=True)
    comp = composition(complete, order=order)

    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = [m for m in CURVE_METRICS if m in metrics]
    curves += [m for m in metrics if m.startswith("eval/") and not re.match(r"eval/(chance|real|noise|ceiling)_", m)
               and not GUIDANCE_KEY.fullmatch(m)]
    plots = {}
    for m, history in fetch_histories(client, complete, curves).items():
        if m not in CURVE_METRICS and history.groupby("run_id").size().max() < 2:
            continue
        plots[m] = plot_history(aggregate_history(history), m, out_dir / plot_name(m), order=order).name

    text = reading(summary, tests.get(metric, pd.DataFrame(columns=PAIRWISE_COLUMNS)), metric, direction, comp,
                   excluded=len(excluded))
    text += equivalence_reading(summary, equivalence, metric)
    guidance = guidance_summary(complete)
    axis_metric = metric.removeprefix("eval/") if (guidance.metric == metric.removeprefix("eval/")).any() else "acc_all"
    axis_direction = direction if axis_metric == metric.removeprefix("eval/") else metric_direction(axis_metric)
    shared = default_scale(complete)
    best = best_scales(complete, axis_metric, axis_direction, shared, order=order) if len(guidance) else pd.DataFrame()
    guidance_plots = {m: plot_guidance(guidance, m, out_dir / f"guidance_{m}.png", shared, order=order).name
                      for m in GUIDANCE_PLOTS if ((guidance.prefix == "eval") & (guidance.metric == m)).any()}
    protocol = ", ".join(f"{k.removeprefix('tags.eval.protocol.')}: {'/'.join(sorted(set(complete[k].dropna())))}"
                         for k in ("tags.eval.protocol.guidance_scales", "tags.eval.protocol.guidance_n_samples",
                                   "tags.eval.protocol.guidance_select_split") if k in complete)
    guidance_md = guidance_markdown(guidance, best, axis_metric, axis_direction, guidance_plots,
                                    protocol or "protocol tags not logged")
    objectives = sweep_objectives(parents)
    pareto_md, pareto_plot = [], None
    if len(objectives) == 2 and all(m in metrics for m, _ in objectives):
        front = pareto_front(complete, objectives)
        pareto_plot = plot_pareto(complete, front, objectives, out_dir / "pareto.png").name
        pareto_md = pareto_markdown(complete, front, objectives, pareto_plot)
    parent_id = parents.run_id.iloc[-1] if len(parents) else None
    counts = children.state.value_counts()
    header = [
        f"experiment: `{name}`" + (f", study `{study}`" if study else ""),
        f"tracking URI: `{uri}`",
        "parent run: " + (f"`{parent_id}`" if parent_id else "none (all runs of the experiment)"),
        "child runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        f"headline metric: {metric} ({'lower' if direction == 'minimize' else 'higher'} is better)",
        f"rows: one per {row} (group_by)",
        f"evaluation protocol: `{protocol_hash}` (hash of every run's protocol tags: one for the whole table)",
        budget_line(complete),
        f"generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
    ]
    bind_tables = binding_tables(complete, order=order)
    md = render_markdown(
        title=f"sorabench report: {study or name}", header=header, summary=summary, metric=metric, direction=direction,
        metrics=metrics, tests=tests, comp=comp, excluded=excluded, plots=plots, text=text,
        refs=reference_points(complete), power=headline_power(complete, summary, tested, family=holm_family(tests)),
        guidance=guidance_md,
        pareto=pareto_md, row=row, equivalence=equivalence, binding=binding_markdown(*bind_tables),
    )

    equivalence.to_csv(out_dir / "equivalence.csv", index=False)
    files = ["report.md", "summary.csv", "pairwise.csv", "equivalence.csv", "runs.csv", *plots.values()]
    files += [pareto_plot] if pareto_plot else []
    if len(guidance):
        guidance.to_csv(out_dir / "guidance.csv", index=False)
        best.to_csv(out_dir / "guidance_best.csv", index=False)
        files += ["guidance.csv", "guidance_best.csv", *guidance_plots.values()]
    (out_dir / "report.md").write_text(md)
    summary.reset_index().to_csv(out_dir / "summary.csv", index=False)
    pairwise = pd.concat(list(tests.values())) if tests else pd.DataFrame(columns=PAIRWISE_COLUMNS)
    pairwise.to_csv(out_dir / "pairwise.csv", index=False)
    runs_csv.to_csv(out_dir / "runs.csv", index=False)

    if parent_id:
        # The sweep's own report (name = the study) is `report/` of the parent run, and its per-row means are the
        # parent's metrics; a later `report name=<other>` (another group_by, a recheck) goes to `reports/<other>/`.
        own = str(cfg.name) == str(study)
        try:
            for f in files:
                client.log_artifact(parent_id, str(out_dir / f), artifact_path="report" if own else
                                    f"reports/{cfg.name}")
            if own:
                log_summary_metrics(client, parent_id, summary, [metric, *SUMMARY_METRICS])
        except Exception as e:  # noqa: BLE001 — the files are written; an unreachable artifact store is only a warning
            print(f"warning: could not log the report to parent run {parent_id}: {e}", file=sys.stderr)
    _print(summary, metric, direction, text, out_dir, files, row)
    return 0
