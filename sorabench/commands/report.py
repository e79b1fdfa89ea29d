"""`sorabench report`: compare text-conditioning strategies from the MLflow runs of a study.

Reads one MLflow experiment (one per study): the study's parent run (tags `sorabench.role=study`,
`sorabench.study=<study>`) and its child runs, one per Optuna trial (tag `mlflow.parentRunId`, tag
`sorabench.strategy` or param `conditioning.name`, param `seed`, tags `optuna.trial_number`, `optuna.state`,
`failure_reason`). Only COMPLETE children enter the statistics; failed and pruned ones are listed with their reasons.

Writes into `run_dir`: `report.md` (tables, pairwise tests, seen/unseen composition, plots, a plain-text reading),
`summary.csv` (one row per strategy: `<metric>_mean`, `<metric>_ci95`, `<metric>_n`, `n`), `pairwise.csv`,
`equivalence.csv`, `runs.csv` (every child run flattened: metrics by bare name, `params.*`, `tags.*`, and `group`,
its report row) and one PNG per metric history; with a guidance axis (`metrics.guidance_scales`) also
`guidance.csv`, `guidance_best.csv` (each strategy at its own best scale, chosen on the selection split, and at the
shared default) and `guidance_acc_all.png` / `guidance_fvd.png`; the same files go to the parent run's artifacts
under `report/`. With `group_by` other than `strategy` the row label is the column `group` of the CSV files.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sorabench import tracking
from sorabench.report.analysis import Analysis, analyse
from sorabench.report.formatting import ranked_rows
from sorabench.report.markdown import header_lines, render_markdown
from sorabench.report.plots import Figures, curve_metrics, draw_figures
from sorabench.report.recipes import RECIPE_TAG, picks, recipes, side_by_side
from sorabench.report.runs import (
    SUMMARY_METRICS, Study, declared_protocol, fetch_histories, find_experiment, group_keys, load_study,
    summary_metrics, sweep_objectives,
)
from sorabench.report.stats import PAIRWISE_COLUMNS, metric_direction
from sorabench.report.thresholds import parse_thresholds, steps_to_threshold


def main(cfg: DictConfig) -> int:
    study_name = None if cfg.study is None else str(cfg.study)
    name = str(cfg.experiment) if cfg.experiment is not None else study_name
    asked = "experiment" if cfg.experiment is not None else "study"
    metric = str(cfg.metric)
    metric_direction(metric, str(cfg.direction))  # a wrong direction is reported before the store is opened
    keys = group_keys(OmegaConf.to_container(cfg.group_by) if OmegaConf.is_config(cfg.group_by) else cfg.group_by)
    uri = str(cfg.mlflow.tracking_uri)
    client = tracking.open_store(uri)
    experiment_id = find_experiment(client, name, asked, uri)
    study = load_study(tracking.search_all_runs(client, experiment_id), name, study_name, keys, asked)
    title, out_dir = f"sorabench report: {study_name or name}", Path(cfg.run_dir)
    if len(recipes(study.complete)) > 1:
        return report_by_recipe(cfg, client, study, title, uri, out_dir)
    a, files = report_one(cfg, client, study, title, uri, out_dir)
    if study.parent_id:
        log_to_parent(client, study, a, out_dir, files, str(cfg.name))
    print_summary(a, study.row, out_dir, files)
    return 0


def report_one(cfg: DictConfig, client, study: Study, title: str, uri: str, out_dir: Path
               ) -> tuple[Analysis, list[str]]:
    """Analyse one set of runs and write its report.md, CSV files and figures into `out_dir`."""
    a = analyse(study.complete, study.metrics, str(cfg.metric), str(cfg.direction), by=study.by, margins=cfg.margins,
                declared=declared_protocol(study.parents), objectives=sweep_objectives(study.parents),
                excluded=len(study.excluded))
    out_dir.mkdir(parents=True, exist_ok=True)
    # steps to threshold: the report's `thresholds=` over the levels the sweep declared (protocol.thresholds)
    levels = (parse_thresholds(cfg.get("thresholds"))
              or parse_thresholds(declared_protocol(study.parents).get("thresholds")))
    wanted = [*curve_metrics(a.metrics), *(m for m in levels if m in a.metrics)]
    histories = fetch_histories(client, study.complete, list(dict.fromkeys(wanted)), by=study.by)
    steps = steps_to_threshold(histories, a.runs, levels, by=study.by)
    figures = draw_figures({m: h for m, h in histories.items() if m in curve_metrics(a.metrics)}, a, out_dir,
                           by=study.by)
    md = render_markdown(title, header_lines(study, uri, str(cfg.metric), a.direction), a, study.excluded, figures,
                         row=study.row, steps=steps)
    files = write_files(out_dir, md, a, study, figures)
    if len(steps):
        steps.to_csv(out_dir / "thresholds.csv", index=False)
        files.append("thresholds.csv")
    return a, files


def report_by_recipe(cfg: DictConfig, client, study: Study, title: str, uri: str, out_dir: Path) -> int:
    """A study with the grid axis `recipe` (shared vs tuned, sorabench.sweep.tuning): one full report per recipe in
    `<out_dir>/<recipe>/` (a strategy at two recipes is two treatments, never pooled), and `report.md` with the
    rankings side by side and each strategy's pick."""
    analyses, files = {}, {}
    tag = study.children.get(RECIPE_TAG, pd.Series(index=study.children.index, dtype=object)).astype(str)
    for recipe in recipes(study.complete):
        sub = replace(study, children=study.children[tag == recipe])
        analyses[recipe], files[recipe] = report_one(cfg, client, sub, f"{title} - recipe `{recipe}`", uri,
                                                     out_dir / recipe)
    first = next(iter(analyses.values()))
    section = side_by_side(analyses, first.metric, picks(study.complete, by=study.by))
    md = [f"# {title}", "", *[f"- {line}" for line in header_lines(study, uri, str(cfg.metric), first.direction)], "",
          *section]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    if study.parent_id:  # report/report.md and report/<recipe>/... (the parent's per-row means: one recipe's only)
        log_to_parent(client, study, first, out_dir, ["report.md"], str(cfg.name), metrics=False)
        for recipe, written in files.items():
            log_to_parent(client, study, analyses[recipe], out_dir / recipe, written, f"{cfg.name}/{recipe}",
                          metrics=False)
    for recipe, a in analyses.items():
        print(f"\nrecipe {recipe}:")
        print_summary(a, study.row, out_dir / recipe, files[recipe])
    print("\n".join(section))
    return 0


def write_files(out_dir: Path, md: str, a: Analysis, study: Study, figures: Figures) -> list[str]:
    """report.md and the CSV files beside the figures; the names of every file of the report, figures included."""
    a.equivalence.to_csv(out_dir / "equivalence.csv", index=False)
    files = ["report.md", "summary.csv", "pairwise.csv", "equivalence.csv", "runs.csv", *figures.curves.values()]
    files += [figures.pareto] if figures.pareto else []
    if len(a.guidance):
        a.guidance.to_csv(out_dir / "guidance.csv", index=False)
        a.best_scales.to_csv(out_dir / "guidance_best.csv", index=False)
        files += ["guidance.csv", "guidance_best.csv", *figures.guidance.values()]
    (out_dir / "report.md").write_text(md)
    a.summary.reset_index().to_csv(out_dir / "summary.csv", index=False)
    pairwise = pd.concat(list(a.tests.values())) if a.tests else pd.DataFrame(columns=PAIRWISE_COLUMNS)
    pairwise.to_csv(out_dir / "pairwise.csv", index=False)
    study.children.to_csv(out_dir / "runs.csv", index=False)
    return files


def log_to_parent(client, study: Study, a: Analysis, out_dir: Path, files: list[str], name: str,
                  metrics: bool = True):
    """The report's files as artifacts of the study's parent run, and (for the sweep's own report) its per-row means
    as the parent's metrics. The sweep's own report (name = the study) is `report/` of the parent run; a later
    `report name=<other>` (another group_by, a recheck) goes to `reports/<other>/` and logs no metrics."""
    own = name == str(study.name)
    try:
        tracking.log_files(client, study.parent_id, [out_dir / f for f in files],
                           "report" if own else f"reports/{name}")
        if own and metrics:
            tracking.log_metric_values(client, study.parent_id,
                                       summary_metrics(a.summary, [a.metric, *SUMMARY_METRICS]))
    except Exception as e:  # noqa: BLE001 — the files are written; an unreachable artifact store is only a warning
        print(f"warning: could not log the report to parent run {study.parent_id}: {e}", file=sys.stderr)


def print_summary(a: Analysis, row: str, out_dir: Path, files: list[str]):
    """The ranked table (the same cells as report.md's), the reading, and where the files are."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(soft_wrap=True, width=200)
    headers, rows = ranked_rows(a.summary, a.metric, a.direction, row)
    table = Table(*headers, title=f"{'strategies' if row == 'strategy' else row} by {a.metric} (mean ± 95% CI)")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)
    console.print(a.text, markup=False, highlight=False)
    console.print(f"wrote {', '.join(files)} to {out_dir}", markup=False, highlight=False)
