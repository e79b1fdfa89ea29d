"""report.md: one function per section, each returning its lines; `render_markdown` puts them in order."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd

from sorabench.report.analysis import Analysis
from sorabench.report.attributes import REFERENCE_SOURCES, SWAP_ATTRIBUTES
from sorabench.report.formatting import arrow, fmt, fmt_ci, fmt_p, md_table, ranked_rows, summary_cell
from sorabench.report.guidance import GUIDANCE_KEY, GUIDANCE_PLOTS
from sorabench.report.plots import Figures
from sorabench.report.runs import Study, declared_protocol
from sorabench.report.stats import ALPHA, finite, holm_family
from sorabench.report.thresholds import replicate_order, threshold_section, with_replicates


def render_markdown(title: str, header: list[str], a: Analysis, excluded: pd.DataFrame, figures: Figures,
                    row: str = "strategy", steps: pd.DataFrame | None = None) -> str:
    """The whole report: `header` lines under the title, then every section; `row` names a report row in words;
    `steps`: each run's steps to the declared thresholds (`sorabench.report.thresholds`)."""
    md = [f"# {title}", "", *[f"- {h}" for h in header], ""]
    md += ranked_section(a.summary, a.metric, a.direction, row)
    md += metrics_section(a.summary, a.metrics)
    md += pairwise_section(a.tests)
    md += per_seed_section(a.runs, [*a.tests] or [a.metric], a.order, a.by)
    md += threshold_section(steps if steps is not None else pd.DataFrame(), a.order, a.by)
    md += composition_section(a.composition, a.by)
    md += binding_section(*a.binding, by=a.by)
    md += references_section(a.references)
    md += power_section(a.power, a.tests)
    md += equivalence_section(a.equivalence)
    md += guidance_section(a.guidance, a.best_scales, a.axis_metric, a.axis_direction, figures.guidance,
                           a.guidance_protocol, by=a.by)
    if a.front is not None:
        md += pareto_section(a.runs, a.front, a.objectives, figures.pareto, by=a.by)
    md += excluded_section(excluded)
    md += curves_section(figures.curves)
    md += ["## Reading", "", a.text, ""]
    return "\n".join(md)


def header_lines(study: Study, uri: str, metric: str, direction: str) -> list[str]:
    """Where the runs come from, how many there are, what ranks them and under which protocol and budget."""
    counts = study.children.state.value_counts()
    return [
        f"experiment: `{study.experiment}`" + (f", study `{study.name}`" if study.name else ""),
        f"tracking URI: `{uri}`",
        "parent run: " + (f"`{study.parent_id}`" if study.parent_id else "none (all runs of the experiment)"),
        "child runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        *completeness_line(study),
        f"headline metric: {metric} ({'lower' if direction == 'minimize' else 'higher'} is better)",
        f"rows: one per {study.row} (group_by)",
        f"evaluation protocol: `{study.protocol_hash}` (hash of every run's protocol tags: one for the whole table)",
        preregistered_line(study.parents),
        budget_line(study.complete),
        f"generated: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
    ]


def completeness_line(study: Study) -> list[str]:
    """One visible line when the study has failed, unfinished or missing cells (child runs not COMPLETE, or fewer
    than the `sorabench.cells` its sweep tagged on the parent run); nothing when every cell completed."""
    states = study.children.state if "state" in study.children else pd.Series(dtype=str)
    tag = "tags.sorabench.cells"
    cells = pd.to_numeric(study.parents[tag], errors="coerce").dropna() if tag in study.parents else pd.Series()
    expected = int(cells.max()) if len(cells) else len(states)
    ended = states.isin(["COMPLETE", "PRUNED"])  # a pruned search trial ended as it should
    complete = int(ended.sum())
    not_complete = {s: int(n) for s, n in states[~ended].value_counts().items()}
    missing = max(0, expected - len(states))
    if complete >= expected and not not_complete:
        return []
    parts = [f"{n} {s}" for s, n in not_complete.items()] + ([f"{missing} missing"] if missing else [])
    return [f"**INCOMPLETE STUDY: {complete} of {expected} cells completed ({', '.join(parts)})**; the tables "
            "below count only COMPLETE runs"]


def preregistered_line(parents: pd.DataFrame) -> str:
    """The study's declared protocol (`protocol:` of its sweep YAML) and the hash the sweep froze it under."""
    digest = "tags.sorabench.protocol_hash"
    frozen = str(parents[digest].dropna().iloc[-1]) if digest in parents and parents[digest].notna().any() else None
    declared = declared_protocol(parents)
    if not declared and frozen is None:
        return "pre-registered protocol: none declared (no `protocol:` in the sweep YAML)"
    fields = ("budget", "seeds", "tested", "alpha", "margins", "thresholds")
    parts = [f"{k} {declared[k]}" for k in fields if k in declared]
    line = (f"pre-registered protocol `{frozen or 'not frozen'}` (fixed overrides, protocol, objectives and recipes, "
            f"frozen when the study started): " + ("; ".join(parts) or "no fields declared"))
    tag = "tags.sorabench.protocol_deviations"
    deviation = str(parents[tag].dropna().iloc[-1]) if tag in parents and parents[tag].notna().any() else "none"
    return line + ("" if deviation == "none" else f"; **DEVIATES from it: {deviation}**")


def budget_line(runs: pd.DataFrame) -> str:
    """How the runs' training budget was set (`budget`, `budget_reference`, `trainer.max_steps` params), in words."""
    def values(col: str) -> list[str]:
        # numbers as text, in numeric order: 800 < 1200
        return sorted(set(runs[col].dropna().astype(str)), key=lambda v: (len(v), v)) if col in runs else []

    kinds, steps = values("params.budget") or ["steps"], values("params.trainer.max_steps")
    if kinds == ["flops"]:
        ref = ", ".join(values("params.budget_reference")) or "?"
        return (f"training budget: equal FLOPs (budget=flops): each strategy's steps scaled to the training FLOPs of "
                f"{ref}; steps per run: {', '.join(steps) or '?'}")
    if kinds == ["steps"]:
        return f"training budget: equal steps (budget=steps): {', '.join(steps) or '?'} steps per run"
    return f"training budget: MIXED ({', '.join(kinds)}) - these runs were not trained under one budget"


def ranked_section(summary: pd.DataFrame, metric: str, direction: str, row: str) -> list[str]:
    ranked = "Strategies" if row == "strategy" else f"Rows (group_by: {row})"
    md = [f"## {ranked}, ranked by {metric} ({arrow(direction)})", ""]
    md.append("Mean ± 95% confidence interval over seeds (Student t: mean ± t₀.₉₇₅,ₙ₋₁·s/√n; n/a with one run). "
              "Only COMPLETE runs count.")
    md.append("")
    md += [md_table(*ranked_rows(summary, metric, direction, row)), ""]
    if "seeds" in summary:
        order = list(summary.index)
        seeds = {s: summary.loc[s, "seeds"].split(";") for s in order}
        dup = [s for s in order if len(set(seeds[s])) < len(seeds[s])]
        md.append("Seeds: " + "; ".join(f"{s}: {summary.loc[s, 'seeds'] or '?'}" for s in order) + ".")
        if dup:
            md.append(f"Note: {', '.join(dup)} repeat a seed; n counts runs, not distinct seeds.")
        md.append("")
    return md


def metrics_section(summary: pd.DataFrame, metrics: list[str]) -> list[str]:
    order = list(summary.index)
    others = [m for m in metrics if not m.startswith("eval/chance_") and not GUIDANCE_KEY.fullmatch(m)]
    md = ["## All metrics", "", "Mean ± 95% CI over seeds; (n=k) where fewer runs logged the metric.", ""]
    return md + [md_table(["metric", *order], [[m, *[summary_cell(summary, s, m) for s in order]] for m in others]),
                 ""]


def pairwise_section(tests: dict[str, pd.DataFrame]) -> list[str]:
    md = ["## Pairwise tests", ""]
    md.append(f"Welch's t-test (unequal variances) and the two-sided Mann–Whitney U test per pair of strategies; "
              f"diff = mean A − mean B; Holm = Welch p adjusted over every pair of every tested metric "
              f"({', '.join(tests)}) together. The reading calls a difference significant on the Holm p. "
              f"Significance level {ALPHA:g}.")
    md.append("")
    headers = ["A", "B", "n A", "n B", "mean A", "mean B", "diff", "Welch t", "Welch p", "Holm p", "MWU U",
               "MWU p", "note"]
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
        md += [md_table(headers, rows), ""]
    if not tests:
        md += ["No tested metric was logged.", ""]
    return md


def per_seed_section(runs: pd.DataFrame, metrics: list[str], order: list, by: str = "strategy") -> list[str]:
    """Every run's value of the tested metrics, seed by seed: a mean ± CI hides a two-peaked outcome (a strategy
    that learns a skill on one seed of three), which the tests' normal approximation then misreads."""
    runs = with_replicates(runs)
    if runs is None or runs.empty:
        return []
    columns = replicate_order(runs)
    rows = []
    for label in order:
        group = runs[runs[by] == label]
        for m in metrics:
            if m not in group:
                continue
            by_seed = dict(zip(group["replicate"], group[m]))
            rows.append([str(label), m, *[fmt(by_seed.get(c), 3) for c in columns]])
    if not rows:
        return []
    return ["## Per seed", "", "Each run's value (read beside the intervals: a two-peaked outcome shows here).", "",
            md_table([by, "metric", *columns], rows), ""]


def composition_section(comp: pd.DataFrame, by: str = "strategy") -> list[str]:
    md = ["## Composition: seen vs unseen", ""]
    if comp.empty:
        return md + ["No eval/acc_<attr>_seen / eval/acc_<attr>_unseen metrics were logged.", ""]
    md.append("Attribute accuracy on prompts whose attribute combination was seen in training vs held out; "
              "gap = seen − unseen, paired per run; chance = uniform guessing (1/K; product of all for `all`).")
    md.append("")
    rows = [
        [r[by], r.attribute, fmt(r.chance, 3), fmt_ci(r.seen_mean, r.seen_ci95),
         fmt_ci(r.unseen_mean, r.unseen_ci95), fmt_ci(r.gap_mean, r.gap_ci95)]
        for _, r in comp.iterrows()
    ]
    return md + [md_table(["strategy", "attribute", "chance", "seen", "unseen", "gap"], rows), ""]


def binding_section(scores: pd.DataFrame, errors: pd.DataFrame, by: str = "strategy") -> list[str]:
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


def references_section(refs: pd.DataFrame | None) -> list[str]:
    md = ["## Reference points: real clips, the VAE's ceiling, noise", ""]
    if refs is None or refs.empty:
        return md + ["No eval/real_acc_* metrics were logged.", ""]
    md.append("What the evaluator reads (accuracy against the prompts' labels) from the real evaluation clips, "
              "from the shared VAE's reconstructions of those clips (no latent DiT can show more: the ceiling) "
              "and from pure noise (the floor). A strategy's accuracy is read against the ceiling, not 1.0.")
    md.append("")
    rows = [[r.attribute, *[fmt(r[src], 3) for src in REFERENCE_SOURCES]] for _, r in refs.iterrows()]
    return md + [md_table(["attribute", *REFERENCE_SOURCES.values()], rows), ""]


def power_section(power: pd.DataFrame | None, tests: dict[str, pd.DataFrame]) -> list[str]:
    md = ["## Power", ""]
    if power is None or power.empty:
        return md + ["Fewer than two strategies with two or more runs: no power analysis.", ""]
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
        verdict = "separated" if finite(p) and p < ALPHA else "not separated"
        seeds = "–" if not finite(r.seeds_needed) else (
            f"> {int(r.seeds_needed) - 1}" if r.seeds_needed > 1000 else str(int(r.seeds_needed)))
        rows.append([r.metric, r.a, r.b, fmt(r["diff"]), fmt_p(p), verdict, fmt(r.cohens_d, 3), seeds])
    headers = ["metric", "best", "vs", "diff", "Holm p", "at α", "Cohen's d", "seeds for 80% (observed d)"]
    return md + [md_table(headers, rows), ""]


def equivalence_section(equivalence: pd.DataFrame | None) -> list[str]:
    md = ["## Equivalence (TOST at the declared margins)", ""]
    if equivalence is None or equivalence.empty:
        return md + ["No equivalence margin was declared (`protocol.margins` of the sweep YAML, or `margins=` of the "
                     "report): a pair that is not separated is undecided, never \"the same\".", ""]
    md.append("Two one-sided Welch tests (statsmodels `ttost_ind`) of |mean A − mean B| < margin, the margin "
              "declared before the study ran. equivalent: TOST p < α, i.e. the 90% interval of the difference "
              "lies inside ±margin. A pair neither separated (pairwise tests) nor equivalent is undecided at these "
              "seeds; 'seeds for margin' is what Welch's test needs to detect a difference of the margin with 80% "
              "power at the observed spreads.")
    md.append("")
    rows = [[r.metric, r.a, r.b, fmt(r["diff"]), f"[{fmt(r.ci90_low, 3)}, {fmt(r.ci90_high, 3)}]",
             f"±{fmt(r.margin, 3)}", fmt_p(r.tost_p), "equivalent" if r.equivalent else "not shown",
             "–" if not finite(r.seeds_for_margin) else str(int(r.seeds_for_margin))]
            for _, r in equivalence.iterrows()]
    return md + [md_table(["metric", "A", "B", "diff", "90% CI", "margin", "TOST p", "verdict", "seeds for margin"],
                          rows), ""]


def guidance_section(g: pd.DataFrame, best: pd.DataFrame, metric: str, direction: str, plots: dict[str, str],
                     protocol: str, by: str = "strategy") -> list[str]:
    md = ["## Guidance", ""]
    if g.empty:
        return md + ["No guidance axis was logged (metrics.guidance_scales=[] in these runs).", ""]
    md.append(f"Each model scored at every guidance scale of the axis ({protocol}); mean ± 95% CI over seeds. "
              "Scales share prompts and sampling seeds, so they differ only by guidance. FVD depends on the clip "
              "count: compare axis values with each other, not with the unsuffixed eval/* numbers.")
    md.append("")
    md += [f"![guidance: {m}]({name})\n" for m, name in plots.items()]
    if not best.empty:
        md += best_scale_table(best, metric, direction, by)
    table = g[(g.prefix == "eval") & g.metric.isin(GUIDANCE_PLOTS)]
    if len(table):
        wide = table.assign(cell=[fmt_ci(a, b) for a, b in zip(table["mean"], table["ci95"])]).pivot_table(
            index=[by, "scale"], columns="metric", values="cell", aggfunc="first")
        cols = [m for m in GUIDANCE_PLOTS if m in wide]
        md += [md_table(["strategy", "scale", *[f"eval/{m}" for m in cols]],
                        [[s, fmt(sc, 3), *[wide.loc[(s, sc), m] for m in cols]] for s, sc in wide.index]), ""]
    return md


def best_scale_table(best: pd.DataFrame, metric: str, direction: str, by: str = "strategy") -> list[str]:
    """The guidance section's table of each row at its own best scale and at the shared default."""
    oracle = best.chosen_on.str.contains("oracle").any()
    md = [f"Each strategy at its own best scale — the scale with the best mean {metric} "
          f"({'lower' if direction == 'minimize' else 'higher'} is better) on "
          + ("**the test prompts themselves: an oracle choice** (selection on test, optimistic; set "
             "metrics.guidance_select_split=val)" if oracle else
             f"the {best.chosen_on.iloc[0]} (held apart from the test prompts reported here)")
          + " — and at the shared default scale. Values are on the test prompts.", ""]
    shown = [c.removesuffix("_best_mean") for c in best.columns if c.endswith("_best_mean")]
    headers = ["strategy", "best scale", f"{metric} on {best.chosen_on.iloc[0]}",
               *[f"{m} at best" for m in shown], "default scale", *[f"{m} at default" for m in shown]]
    rows = [[getattr(r, by), fmt(r.best_scale, 3), fmt(r.selection_value),
             *[fmt_ci(getattr(r, f"{m}_best_mean"), getattr(r, f"{m}_best_ci95")) for m in shown],
             fmt(r.default_scale, 3),
             *[fmt_ci(getattr(r, f"{m}_default_mean"), getattr(r, f"{m}_default_ci95")) for m in shown]]
            for r in best.itertuples()]
    md += [md_table(headers, rows), ""]
    if (best.default_from != "axis").any():
        md += ["The default scale is not on the axis: its columns are the unsuffixed eval/* numbers, from "
               "metrics.n_samples clips (their FVD is not comparable with the axis's).", ""]
    return md


def pareto_section(runs: pd.DataFrame, front: pd.Series, objectives: list[tuple[str, str]], plot: str,
                   by: str = "strategy") -> list[str]:
    names = " and ".join(f"{m} ({arrow(d)})" for m, d in objectives)
    md = ["## Pareto front", "", f"The study has two objectives, {names}. A run is on the front when no other "
          "completed run is at least as good on both and better on one (each run is one point; seeds are not "
          "averaged).", ""]
    rows = [[fmt(r.trial), r[by], *[fmt(r[m]) for m, _ in objectives], r.run_id]
            for _, r in runs[front].sort_values(objectives[0][0]).iterrows()]
    md += [md_table(["trial", "row", *[m for m, _ in objectives], "run"], rows), "", f"![Pareto front]({plot})", ""]
    return md


def excluded_section(excluded: pd.DataFrame) -> list[str]:
    md = ["## Failed, pruned and unfinished runs", ""]
    if excluded.empty:
        return md + ["None: every child run completed.", ""]
    rows = [
        [fmt(r.trial), r.strategy, fmt(r.seed), r.state, r.failure_reason or "–", r.run_id]
        for _, r in excluded.iterrows()
    ]
    return md + [md_table(["trial", "strategy", "seed", "state", "reason", "run"], rows), ""]


def curves_section(plots: dict[str, str]) -> list[str]:
    md = ["## Training curves", ""]
    if plots:
        return md + [f"![{m}]({name})\n" for m, name in plots.items()]
    return md + ["No metric history with more than one point.", ""]
