"""The search space of a sweep YAML: its params, a grid's cells and their names, and one trial's values and config."""

from __future__ import annotations

import itertools
import re

import optuna
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback

from sorabench.config import ConfigError, compose_config, require
from sorabench.sweep.tuning import RECIPE, recipe_overrides, tuned_key


def parse_space(sweep: dict) -> dict[str, dict]:
    """Validate `params` of a sweep YAML; return {override key: spec}."""
    params = sweep.get("params") or {}
    require(isinstance(params, dict) and params, "sweep.params", params, "must map config keys to search specs")
    for key, spec in params.items():
        where = f"sweep.params.{key}"
        require(isinstance(spec, dict), where, spec, "must be {choices: [...]} or {low: ..., high: ...}")
        if "choices" in spec:
            require(isinstance(spec["choices"], list) and spec["choices"], where, spec, "choices must be a list")
        else:
            require({"low", "high"} <= set(spec), where, spec, "needs choices, or low and high")
            require(spec["low"] < spec["high"], where, spec, "low must be below high")
            if sweep.get("mode") == "grid":
                raise ConfigError(f"{where}={spec}: a grid sweep needs choices, not a range")
    return params


def grid_space(sweep: dict) -> dict[str, list]:
    space = {key: list(spec["choices"]) for key, spec in parse_space(sweep).items()}
    space["seed"] = list(sweep.get("seeds") or [0])
    return space


def grid_cells(sweep: dict) -> list[dict]:
    """Every cell of a grid sweep, in a fixed order: seed by seed, the product of the choices within each (so every
    configuration has its first seed before any has a second: a grid stopped early stays balanced)."""
    space = grid_space(sweep)
    seeds = space.pop("seed")
    combos = list(itertools.product(*space.values()))
    return [{**dict(zip(space, combo)), "seed": seed} for seed in seeds for combo in combos]


def cell_id(values: dict) -> str:
    """A cell's name: its values (seed last) joined, safe as a path part."""
    parts = [str(v) for k, v in values.items() if k != "seed"] + [f"seed{values['seed']}"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def cell_values(t) -> dict:
    """A grid trial's cell {key: value}: its user attr `cell` (params where a study has no such attr)."""
    return t.user_attrs.get("cell") or t.params


def trial_cell(t, keys: list[str]) -> str | None:
    """The grid cell a trial holds (None for a trial without one: a spare, or a trial of another grid)."""
    values = cell_values(t)
    if not all(k in values for k in keys):
        return None
    return cell_id({k: values[k] for k in keys})


def suggest(trial: optuna.Trial, sweep: dict) -> dict:
    values = {}
    for key, spec in parse_space(sweep).items():
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    values["seed"] = trial.suggest_categorical("seed", list(sweep.get("seeds") or [0]))
    return values


def trial_values(trial: optuna.Trial, sweep: dict) -> dict | None:
    """The trial's cell: a grid trial's queued params (None if it was not queued: a spare), or TPE's suggestion."""
    if sweep["mode"] == "grid":
        keys = list(grid_space(sweep))
        cell = trial.user_attrs.get("cell") or {}
        return {k: cell[k] for k in keys} if all(k in cell for k in keys) else None
    return suggest(trial, sweep)


def frozen_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored state of a running trial (its system attrs, which `optuna.Trial` does not show)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def record_cell_params(trial: optuna.Trial, values: dict, sweep: dict):
    """Also record a grid trial's cell as Optuna params: optuna-dashboard plots and filters by params, not user
    attrs, so without them no chart could tell which strategy or seed a point is. The cell stays the user attr
    `cell` (what scheduling reads). Numbers get an int/float range (Optuna checks only their kind across trials);
    names a categorical of the grid's choices, which a study's storage fixes for good: once a grid gains a choice,
    the new cells run without that param (the dashboard then lists them under user attrs only)."""
    fixed = frozen_trial(trial).system_attrs.get("fixed_params") or {}
    for key, choices in grid_space(sweep).items():
        if key not in trial.params and fixed.get(key) != values[key]:
            continue  # queued by an older sorabench (no fixed params): a suggestion would draw a random value
        numbers = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
        try:
            if numbers and all(isinstance(c, int) for c in choices):
                trial.suggest_int(key, min(choices), max(choices))
            elif numbers:
                trial.suggest_float(key, float(min(choices)), float(max(choices)))
            else:
                trial.suggest_categorical(key, choices)
        except ValueError:  # "CategoricalDistribution does not support dynamic value space": the grid grew
            pass


def run_name(study: str, values: dict, sweep: dict, trial: optuna.Trial) -> str:
    """Grid: named after the cell (a retried trial finds the dead one's checkpoint); search: after the first try."""
    if sweep["mode"] == "grid":
        cell = cell_id(values)
    else:
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen_trial(trial))
        cell = f"trial-{trial.number if first is None else first}"
    return f"{study}/{cell}"  # under the study: two studies in one outputs/ never share (or reuse) a run


def trial_config(cfg: DictConfig, sweep: dict, values: dict, name: str) -> DictConfig:
    overrides = [*(sweep.get("fixed") or []), *(cfg.overrides or [])]
    values = dict(values)
    recipe = values.pop(RECIPE, None)  # not a config key: a recipe's own overrides (sorabench.sweep.tuning)
    overrides += [f"{k}={v}" for k, v in values.items()]
    if recipe is not None:
        overrides += recipe_overrides(str(recipe), str(values.get(tuned_key(sweep))), sweep.get("recipes") or {},
                                      sweep.get("picks") or {})
    # The run directory is `<study>/<cell>` (unique under outputs/); the MLflow name is the cell alone, so the UI's
    # runs table, which nests children under the study's parent, shows `adaln_zero-seed0` rather than a cut-off
    # `conditioning_ab...`.
    overrides += [f"name={name}", f"mlflow.run_name={name.rsplit('/', 1)[-1]}"]
    overrides += [f"outputs={cfg.outputs}", f"mlflow.experiment={cfg.study}"]
    if cfg.get("plugins"):  # the user's strategies etc., imported by every trial's composition (workers too)
        overrides.append("plugins=[" + ",".join(cfg.plugins) + "]")
    overrides += [f"mlflow.enabled={cfg.mlflow.enabled}", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    return compose_config(sweep.get("command", "train"), overrides, command=sweep.get("command", "train"))


# What the study's runs table shows beside each run's name, after the objectives (a sweep YAML may set `columns`).
DEFAULT_COLUMNS = ["eval/acc_all", "eval/fid", "val/loss"]


def view_columns(sweep: dict) -> tuple[list[str], list[str], bool]:
    """(metrics, params, ascending) of the study's runs table: the objectives first (the first one sorts, ascending
    when minimized), then the comparison metrics; a search's params (a grid cell is already the run's name)."""
    objectives = [o["metric"] for o in sweep["objectives"]]
    metrics = list(dict.fromkeys([*objectives, *(sweep.get("columns") or DEFAULT_COLUMNS)]))
    params = [] if sweep["mode"] == "grid" else list(parse_space(sweep))
    return metrics, params, sweep["objectives"][0]["direction"] == "minimize"
