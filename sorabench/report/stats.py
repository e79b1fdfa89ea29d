"""The report's statistics: small pure functions of a runs DataFrame (one row per run, a row-label column `by`, one
column per metric named by its MLflow key), so they can be checked on synthetic numbers.

Summaries and Student-t intervals, ranking, Welch and exact Mann–Whitney tests with Holm's adjustment, the power of
the report's own decision, TOST equivalence at declared margins, the Pareto front and learning-curve aggregates.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
import pandas as pd

from sorabench.config import require

ALPHA = 0.05


def finite(x) -> bool:
    """True for a finite number (not None, pd.NA, NaN or ±inf, nor something that is no number at all)."""
    try:
        return x is not None and x is not pd.NA and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def finite_values(values) -> np.ndarray:
    """The finite values as floats (anything non-numeric or missing dropped)."""
    x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    return x[np.isfinite(x)]


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


def mean_ci95(values) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t 95% interval t_{0.975,n-1}·s/√n, n) over the finite values.

    With one value the half-width is NaN ("n/a"); with none the mean is NaN too.
    """
    from scipy import stats

    x = finite_values(values)
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


# ---------------------------------------------------------------------------------------------- pairwise tests


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
    groups = {name: finite_values(g[metric]) for name, g in runs.groupby(by, sort=True)} if metric in runs else {}
    groups = {k: v for k, v in groups.items() if len(v)}
    names = [s for s in (order if order is not None else sorted(groups)) if s in groups]
    rows = [pair_test(metric, a, b, groups[a], groups[b]) for a, b in combinations(names, 2)]
    out = pd.DataFrame(rows, columns=[c for c in PAIRWISE_COLUMNS if c != "welch_p_holm"])
    out.insert(out.columns.get_loc("welch_p") + 1, "welch_p_holm", holm(out["welch_p"]) if len(out) else [])
    return out


def pair_test(metric: str, a, b, x: np.ndarray, y: np.ndarray) -> dict:
    """One row of `pairwise_tests`: strategy a's finite values x against b's y."""
    from scipy import stats

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
    return row


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


# ------------------------------------------------------------------------------------- power and equivalence


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

    x = finite_values(runs.loc[runs[by] == a, metric]) if metric in runs else np.array([])
    y = finite_values(runs.loc[runs[by] == b, metric]) if metric in runs else np.array([])
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

    groups = {name: finite_values(g[metric]) for name, g in runs.groupby(by, sort=True)} if metric in runs else {}
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


# ------------------------------------------------------------------------------------ Pareto front and curves


def pareto_front(runs: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """True for the runs no other run dominates (at least as good on every objective, better on one); a run without a
    finite value of every objective is never on the front."""
    signs = [1.0 if direction == "minimize" else -1.0 for _, direction in objectives]
    values = np.stack([pd.to_numeric(runs[m], errors="coerce").to_numpy(dtype=float) * s
                       for (m, _), s in zip(objectives, signs)], axis=1) if len(runs) else np.zeros((0, 2))
    finite_rows = np.isfinite(values).all(1)
    front = []
    for i, v in enumerate(values):
        dominated = ((values <= v).all(1) & (values < v).any(1) & finite_rows).any()
        front.append(bool(finite_rows[i] and not dominated))
    return pd.Series(front, index=runs.index, dtype=bool)


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
