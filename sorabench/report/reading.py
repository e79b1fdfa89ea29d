"""The report's plain-text reading: the best row on the headline metric, whether it is separated from the runner-up
(or shown equivalent to it), and its text alignment against chance."""

from __future__ import annotations

import math

import pandas as pd

from sorabench.report.formatting import fmt, fmt_ci, fmt_p
from sorabench.report.stats import ALPHA, finite


def reading(
    summary: pd.DataFrame, tests: pd.DataFrame, metric: str, direction: str, comp: pd.DataFrame | None = None,
    excluded: int = 0, by: str = "strategy",
) -> str:
    """One plain-text paragraph: the best strategy on `metric`, whether it beats the runner-up at p<0.05 (Welch),
    and its all-attributes accuracy against chance. `summary` ranked best first (`rank_strategies`), `tests` from
    `pairwise_tests` on `metric`, `comp` from `composition` (rows in its column `by`)."""
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
        parts.append(runner_up(ranked, tests, metric))
    parts.append(alignment(summary, best, comp, by))
    if excluded:
        parts.append(f"{excluded} failed, pruned or unfinished run{'s' if excluded > 1 else ''} were left out.")
    return " ".join(parts)


def runner_up(ranked: pd.DataFrame, tests: pd.DataFrame, metric: str) -> str:
    """The runner-up against the best, and whether the pairwise test (Holm-adjusted) separates them."""
    best, second = ranked.index[:2]
    b, s = ranked.loc[best], ranked.loc[second]
    mean, ci, n = f"{metric}_mean", f"{metric}_ci95", f"{metric}_n"
    pair = tests[((tests.a == best) & (tests.b == second)) | ((tests.a == second) & (tests.b == best))]
    raw = pair["welch_p"].iloc[0] if len(pair) else math.nan
    p = pair["welch_p_holm"].iloc[0] if len(pair) and "welch_p_holm" in pair else raw
    mwu = pair["mwu_p"].iloc[0] if len(pair) else math.nan
    gap = abs(b[mean] - s[mean])
    text = (
        f"The runner-up is {second} at {fmt_ci(s[mean], s[ci])} (n={int(s[n])}),"
        f" {fmt(gap)} {'worse' if gap > 0 else 'apart'};"
    )
    if not finite(p):
        return text + " the difference could not be tested (a strategy has fewer than 2 runs, or no variance)."
    verdict = "significant" if p < ALPHA else "not significant"
    text += f" the difference is {verdict} at p<{ALPHA:g}"
    text += (f" (Welch t-test, Holm-adjusted over all pairs of the tested metrics p={fmt_p(p)},"
             f" unadjusted p={fmt_p(raw)}; Mann–Whitney p={fmt_p(mwu)}).")
    if min(int(b[n]), int(s[n])) < 5:
        text += " With fewer than 5 seeds per strategy the tests have little power."
    return text


def alignment(summary: pd.DataFrame, best, comp: pd.DataFrame | None, by: str) -> str:
    """The best row's text alignment: all-attributes accuracy against chance (seen and unseen compositions), or,
    for the binding task, every object right against chance and the real clips."""
    if "eval/acc_all_mean" in summary and finite(summary.loc[best, "eval/acc_all_mean"]):
        acc = summary.loc[best, "eval/acc_all_mean"]
        acc_ci = fmt(summary.loc[best, "eval/acc_all_ci95"], 2)
        text = f"{best} gets all attributes of the prompt right in {fmt(acc, 3)} of clips (eval/acc_all, ± {acc_ci})"
        chance = summary.loc[best].get("eval/chance_all_mean")
        if finite(chance) and chance > 0:
            text += f" against a chance level of {fmt(chance, 3)} (uniform guessing), {fmt(acc / chance, 3)}× chance"
        else:
            text += " (chance level not logged)"
        if comp is not None and len(comp):
            row = comp[(comp[by] == best) & (comp.attribute == "all")] if by in comp else comp.iloc[:0]
            if len(row):
                r = row.iloc[0]
                text += f"; {fmt(r.seen_mean, 3)} on seen and {fmt(r.unseen_mean, 3)} on unseen compositions"
        return text + "."
    if "eval/bind_all_mean" in summary and finite(summary.loc[best, "eval/bind_all_mean"]):  # the binding task
        row = summary.loc[best]
        text = (f"{best} shows every object of the prompt with its own attributes in "
                f"{fmt(row['eval/bind_all_mean'], 3)} of clips (eval/bind_all, ± {fmt(row['eval/bind_all_ci95'], 2)})")
        if finite(row.get("eval/bind_chance_all_mean")):
            text += f" against a chance level of {fmt(row['eval/bind_chance_all_mean'], 3)}"
        if finite(row.get("eval/bind_twins_mean")):
            text += f"; both clips of a swapped-binding twin pair right in {fmt(row['eval/bind_twins_mean'], 3)}"
        if finite(row.get("eval/real_bind_all_mean")):
            text += f" (the evaluator reads {fmt(row['eval/real_bind_all_mean'], 3)} of real clips fully right)"
        return text + "."
    return f"eval/acc_all was not logged for {best}, so its text alignment cannot be compared with chance."


def equivalence_reading(summary: pd.DataFrame, equivalence: pd.DataFrame, metric: str) -> str:
    """The TOST verdict of the best strategy against the runner-up on `metric`, for the reading: with no declared
    margin a pair that is not separated is undecided, and the reading says so."""
    ranked = [s for s in summary.index if finite(summary.loc[s].get(f"{metric}_mean"))]
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
