"""`sorabench sweep status [sweep=...] [study=...] [storage=...]`: one row per cell of a study (its latest trial;
the cells not queued yet too) or per search trial: state, worker host, heartbeat age, retries, wall time, objective
and MLflow run."""

from __future__ import annotations

from datetime import datetime

import optuna
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console

from sorabench.config import ConfigError, to_container
from sorabench.sweep.space import cell_id, grid_cells, grid_space, parse_space, trial_cell
from sorabench.sweep.study import FINAL_FAILURE, SPARE, make_storage
from sorabench.sweep.tuning import expand_sweep
from sorabench.tracking import mlflow_children

console = Console(soft_wrap=True)
COLUMNS = ("cell", "trial", "state", "host", "heartbeat", "retries", "wall", "objective", "mlflow")


def status(cfg: DictConfig) -> int:
    """Print the table of every cell of the study `cfg.study`, then how many cells are in each state."""
    storage = make_storage(cfg)
    sweep = to_container(cfg.sweep)
    sweep = expand_sweep(sweep, storage if "tuned_from" in sweep else None)  # a tuned sweep's `recipe` axis
    parse_space(sweep)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError as e:
        raise ConfigError(f"study={cfg.study!r}: no such study in {cfg.storage}") from e
    rows = status_rows(cfg, sweep, study, storage)
    title = f"study {cfg.study!r} ({sweep['mode']}) in {cfg.storage}"
    print_table(title, COLUMNS, [[str(r[c]) for c in COLUMNS] for r in rows])
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def heartbeat_ages(storage: optuna.storages.RDBStorage, study_name: str) -> dict[int, float]:
    """Seconds since each running trial's last heartbeat (trial number -> age), measured by the database's clock."""
    import sqlalchemy
    from optuna.storages._rdb import models  # Optuna keeps heartbeats in its schema, without a public getter

    query = (sqlalchemy.select(models.TrialModel.number, models.TrialHeartbeatModel.heartbeat)
             .join(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
             .join(models.StudyModel, models.StudyModel.study_id == models.TrialModel.study_id)
             .where(models.StudyModel.study_name == study_name))
    with storage.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.current_timestamp())).scalar()
        rows = conn.execute(query).all()
    if isinstance(now, str):  # SQLite returns text
        now = datetime.fromisoformat(now)
    return {number: (now - beat).total_seconds() for number, beat in rows}


def trial_groups(sweep: dict, trials: list) -> list[tuple[str, list]]:
    """(cell name, its trials) in the grid's cell order, then cells of the study the grid no longer has; for a
    search, one group per trial, named after the trial it retries."""
    if sweep["mode"] == "grid":
        keys = list(grid_space(sweep))
        by_cell: dict[str, list] = {}
        for t in trials:
            by_cell.setdefault(trial_cell(t, keys), []).append(t)
        groups = [(cell_id(c), by_cell.get(cell_id(c), [])) for c in grid_cells(sweep)]
        return groups + [(c, ts) for c, ts in by_cell.items() if c is not None and c not in dict(groups)]
    first = RetryHeartbeatStaleTrialCallback.retried_trial_number
    return [(f"trial-{t.number if first(t) is None else first(t)}", [t]) for t in trials]


def status_rows(cfg: DictConfig, sweep: dict, study: optuna.Study, storage) -> list[dict]:
    """One row per grid cell (its latest trial; the cells not queued yet too) or per search trial."""
    trials = [t for t in study.get_trials(deepcopy=False) if SPARE not in t.user_attrs]
    ages = heartbeat_ages(storage, cfg.study)
    runs = mlflow_children(cfg)
    metric = sweep["objectives"][0]["metric"]
    rows = []
    for cell, ts in trial_groups(sweep, trials):
        t = max(ts, key=lambda x: x.number) if ts else None
        row = {"cell": cell, "trial": "" if t is None else t.number, "state": "NOT QUEUED" if t is None else
               t.state.name, "host": "", "heartbeat": "", "wall": "",
               "retries": max(len(ts) - 1, len(t.system_attrs.get("retry_history", [])) if t else 0),
               "objective": "", "mlflow": ""}
        if t is not None:
            row["host"] = str(t.user_attrs.get("host", ""))
            if t.state == TrialState.RUNNING and t.number in ages:
                row["heartbeat"] = f"{ages[t.number]:.0f} s ago"
            if t.datetime_start is not None:
                end = t.datetime_complete or datetime.now()
                row["wall"] = f"{(end - t.datetime_start).total_seconds():.0f} s"
            if t.values:
                row["objective"] = ", ".join(f"{v:.4g}" for v in t.values)
            run = runs.get(t.user_attrs.get("run_name") or f"{cfg.study}/{cell}")
            if run:
                row["mlflow"] = run["status"] + (f" {metric}={run[metric]:.4g}" if metric in run else "")
            if t.state == TrialState.FAIL:
                row["state"] += " (final)" if FINAL_FAILURE in t.user_attrs else " (reruns)"
        rows.append(row)
    return rows


def print_table(title: str, columns, rows: list[list[str]], out: Console | None = None):
    """A table no cell of which is cut: whole in a pipe or a log file (as wide as it needs), whole in a terminal
    that fits it, and as one block of `column: value` lines per row in a terminal too narrow for it."""
    from rich.measure import Measurement
    from rich.table import Table

    out = out or console
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    need = Measurement.get(out, out.options.update(max_width=100_000), table).maximum
    if not out.is_terminal:
        Console(file=out.file, width=max(need, 80), soft_wrap=True).print(table)
    elif need <= out.width:
        out.print(table)
    else:
        out.print(title, markup=False, highlight=False)
        for row in rows:
            out.print(f"{columns[0]}: {row[0]}", style="bold", markup=False, highlight=False)
            for col, value in zip(columns[1:], row[1:]):
                if value:
                    out.print(f"  {col}: {value}", markup=False, highlight=False)
