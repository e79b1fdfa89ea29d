"""`sorabench sweep`: an Optuna study whose trials are DiT runs composed from Hydra configs.

- A search space is YAML in `conf/sweep/`: `params` (`{choices: [...]}`, `{low, high, log}`, `{low, high, step}`),
  `seeds`, `fixed` overrides and `objectives` (metric + direction; several make a multi-objective study).
- `mode: grid` runs every combination of the choices x every seed (an ablation is exhaustive, not a search);
  `mode: search` samples with TPE and prunes on `val/loss` with a MedianPruner through optuna-integration's
  Lightning pruning callback.
- Each trial builds its config with Hydra's compose API (`conf/<sweep.command>.yaml` + overrides), trains, evaluates
  and returns the objective(s). The Hydra Optuna sweeper plugin is not used: it pins optuna<3.
- Storage: `sqlite:///<outputs>/optuna.db`, or a PostgreSQL URL so that the same command started on many machines
  works on one study. Heartbeats mark a dead worker's trial failed; `RetryHeartbeatStaleTrialCallback` requeues it.
- A trial's run directory (and so its checkpoint and MLflow run) is named after its grid cell, so a retried trial
  resumes the dead one's checkpoint and continues the same MLflow child run: nothing is duplicated or orphaned.
- Grid cells are queued, not sampled: each worker, at start and under a study-wide lock (a file lock beside a SQLite
  database, a PostgreSQL advisory lock), adds one WAITING trial per cell that has none and one retry per trial that
  failed for a reason outside the model (an interrupt, a full disk, a race) — so rerunning the command resumes what
  was interrupted, and adding seeds or choices to an existing study runs exactly the new cells. Workers pop WAITING
  trials atomically (Optuna's storage), so no cell runs twice. A grid trial's cell is its user attr `cell`, not
  Optuna params: a study's storage fixes a categorical parameter's choices for good, and Optuna's GridSampler
  forgets the finished cells when the grid changes.
- A failure caused by the model (a non-finite loss or objective) is final: rerunning would fail the same way.
- Search: TPE's random state is set from (seed, trial number) before each trial, so workers and restarts propose
  distinct trials and a sweep run by one worker is reproducible.
- `trainer=ddp`: Lightning's launcher reruns this command once per extra rank; rank 0 owns the Optuna trial and
  sends each trial's cell to the other ranks (`DDPFollower`), which never touch the study.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console

from sorabench.config import ConfigError, compose_config, require, to_container
from sorabench.tracking import check_tracking_uri, git_commit, package_versions, tag_experiment_kind

console = Console(soft_wrap=True)
# Heartbeats and their retry callback are what distributed studies need; Optuna still labels them experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINAL_FAILURE = "final_failure"  # user attr of a trial that failed for a reason a retry cannot fix
SPARE = "spare"  # user attr of a trial that found no queued cell left when it started (two workers raced for it)


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


def retried_numbers(trials) -> set[int]:
    """Numbers of the failed trials that a later trial retries (every step of each retry chain)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def needs_rerun(t, retried: set[int]) -> bool:
    """A trial that failed for a reason outside the model (interrupt, dead worker past its retries, a full disk)
    and that nothing retries yet: rerunning the command must run it again."""
    return t.state == TrialState.FAIL and FINAL_FAILURE not in t.user_attrs and SPARE not in t.user_attrs \
        and t.number not in retried


def requeue(study: optuna.Study, t):
    """Queue a retry of `t` with its params: the same run name, so it resumes t's checkpoint and MLflow run."""
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, t)


def schedule(study: optuna.Study, sweep: dict, n_cells: int | None = None) -> tuple[int, int]:
    """Queue what this study still needs (call under `study_lock`): a retry of each trial that needs a rerun, and
    for a grid one WAITING trial per cell that has no trial yet. Returns (retries, new cells) queued."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    reruns = [t for t in trials if needs_rerun(t, retried)]
    for t in reruns:
        requeue(study, t)
    new = []
    if sweep["mode"] == "grid":
        space = grid_space(sweep)
        keys = list(space)
        taken = {trial_cell(t, keys) for t in trials}
        cells = grid_cells(sweep)[:n_cells]
        new = [c for c in cells if cell_id(c) not in taken]
        for c in new:
            # `fixed_params` (what Study.enqueue_trial sets) lets `record_cell_params` show the cell as params
            study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={"cell": c},
                                                      system_attrs={"fixed_params": c}))
    return len(reruns), len(new)


def record_cell_params(trial: optuna.Trial, values: dict, sweep: dict):
    """Also record a grid trial's cell as Optuna params: optuna-dashboard plots and filters by params, not user
    attrs, so without them no chart could tell which strategy or seed a point is. The cell stays the user attr
    `cell` (what scheduling reads). Numbers get an int/float range (Optuna checks only their kind across trials);
    names a categorical of the grid's choices, which a study's storage fixes for good: once a grid gains a choice,
    the new cells run without that param (the dashboard then lists them under user attrs only)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    fixed = frozen.system_attrs.get("fixed_params") or {}
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


@contextmanager
def study_lock(cfg: DictConfig, storage: optuna.storages.RDBStorage):
    """One worker at a time queues trials: a lock file beside a SQLite database, an advisory lock on PostgreSQL
    (both work across machines that share the database)."""
    url = cfg.storage
    if url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(f"sorabench:{cfg.study}".encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    elif url.startswith("sqlite:///"):
        from sorabench.files import file_lock

        with file_lock(url.removeprefix("sqlite:///") + f".{cfg.study}.lock"):
            yield
    else:  # another database: Optuna's own transactions only (rare duplicates possible when workers start at once)
        yield


def check_study_compatible(study: optuna.Study, sweep: dict):
    """A sweep YAML that changes what the study's cells mean cannot be honoured: say so before any trial runs."""
    space = parse_space(sweep)
    keys = sorted([*space, "seed"])
    shape = {"mode": sweep["mode"], "keys": keys, "objectives": [[o["metric"], o["direction"]] for o in
                                                                    sweep["objectives"]]}
    if sweep["mode"] == "search":  # TPE's categorical choices are fixed by the storage for the study's life
        shape["choices"] = {k: v["choices"] for k, v in space.items() if "choices" in v}
    old = study.user_attrs.get("sorabench.sweep")
    if old is None:  # a study made before this attr existed: its trials' parameter names
        names = {k for t in study.get_trials(deepcopy=False) for k in cell_values(t)}
        if names and sweep["mode"] == "grid" and names != set(keys):
            old = {**shape, "keys": sorted(names)}
    if old is not None:
        fields = (("mode", "sweep.mode"), ("keys", "sweep.params"), ("objectives", "sweep.objectives"),
                  ("choices", "sweep.params (choices of a search)"))
        for field, what in fields:
            if old.get(field) != shape.get(field):
                hint = "adding seeds or choices to a grid is fine" if shape["mode"] == "grid" else \
                    "Optuna fixes a search's categorical choices for the life of its study"
                raise ConfigError(
                    f"{what}: study {study.study_name!r} was created with {old.get(field)}, this sweep has "
                    f"{shape.get(field)}; its finished trials would not mean the same thing ({hint}). Keep {what} "
                    "as it was, or start a new study with study=<name>")
    study.set_user_attr("sorabench.sweep", shape)


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random state is set from (seed, trial number) before each trial. A fixed `seed` alone makes every
    process (a second worker, a restart) draw the same sequence and propose the same parameters again; the trial
    number is unique in a study, so proposals differ, and one worker running the sweep reproduces it."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study, trial):
        s = int.from_bytes(hashlib.sha256(f"{self._base_seed}:{trial.number}".encode()).digest()[:4], "big")
        self._rng.rng.seed(s)  # the TPE candidates
        self._random_sampler._rng.rng.seed(s)  # the startup trials and independent parameters
        super().before_trial(study, trial)


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


def run_name(study: str, values: dict, sweep: dict, trial: optuna.Trial) -> str:
    """Grid: named after the cell (a retried trial finds the dead one's checkpoint); search: after the first try."""
    if sweep["mode"] == "grid":
        cell = cell_id(values)
    else:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        cell = f"trial-{trial.number if first is None else first}"
    return f"{study}/{cell}"  # under the study: two studies in one outputs/ never share (or reuse) a run


def make_storage(cfg: DictConfig) -> optuna.storages.RDBStorage:
    url = cfg.storage
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"storage={url!r}: cannot create its folder {folder} ({e.strerror})") from e
    if url.startswith("postgresql"):
        # Fail in seconds, naming the URL, instead of hanging on an unreachable server.
        engine_kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry),
            )
        except Exception as e:  # SQLAlchemy's OperationalError and friends: report the URL, not a traceback
            # Workers started together on an empty database race to create Optuna's tables; the loser retries
            # and finds them. A server that is not there fails the same way every time.
            if attempt == 2:
                raise ConfigError(f"storage={url!r}: cannot open the Optuna storage ({str(e).splitlines()[0]})") from e
            time.sleep(1 + random.random())


def create_study(cfg: DictConfig, sweep: dict, storage) -> optuna.Study:
    objectives = sweep.get("objectives") or []
    require(bool(objectives), "sweep.objectives", objectives, "needs at least one {metric, direction}")
    for o in objectives:
        require(o.get("direction") in ("minimize", "maximize"), "sweep.objectives.direction", o, "minimize|maximize")
    seed = sweep.get("sampler_seed", 0)
    if sweep["mode"] == "grid":  # cells are queued (see `schedule`); the sampler only sees spare trials
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    elif len(objectives) > 1:  # Optuna prunes single-objective studies only
        sampler, pruner = TrialSeededTPESampler(seed=seed, multivariate=True), optuna.pruners.NopPruner()
    else:
        require(sweep["mode"] == "search", "sweep.mode", sweep["mode"], "must be grid or search")
        sampler = TrialSeededTPESampler(seed=seed, multivariate=True)
        p = sweep.get("pruner") or {}
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=p.get("n_startup_trials", 3), n_warmup_steps=p.get("n_warmup_steps", 1)
        )
    study = optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        directions=[o["direction"] for o in objectives],
        load_if_exists=True,
    )
    study.set_metric_names([o["metric"] for o in objectives])  # optuna-dashboard's axis: `eval/fvd`, not "Objective 0"
    return study


def ensure_parent_run(cfg: DictConfig, study: optuna.Study) -> str | None:
    """The study's MLflow parent run (one per study, shared by every worker through the study's user attrs)."""
    if not cfg.mlflow.enabled:
        return None
    if "mlflow_parent_run_id" in study.user_attrs:
        return study.user_attrs["mlflow_parent_run_id"]
    import mlflow

    check_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.study)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(cfg.study, artifact_location=f"{cfg.mlflow.artifact_location}/{cfg.study}")
    )
    tag_experiment_kind(client, experiment_id)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`sorabench.role` = 'study' and tags.`sorabench.study` = '{cfg.study}'"
    )
    if existing:
        run_id = existing[0].info.run_id
    else:
        tags = {
            "sorabench.role": "study",
            "sorabench.study": cfg.study,
            "mlflow.runName": f"study-{cfg.study}",
            "git_commit": git_commit(),
            "package_versions": str(package_versions()),
            "sweep_yaml": OmegaConf.to_yaml(cfg.sweep)[:5000],
        }
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


# What the study's runs table shows beside each run's name, after the objectives (a sweep YAML may set `columns`).
DEFAULT_COLUMNS = ["eval/acc_all", "eval/fid", "val/loss"]


def share_study_view(cfg: DictConfig, sweep: dict, parent_run_id: str | None) -> dict[str, str]:
    """Store two runs-table views of the study's experiment and return their addresses ({} without MLflow):
    `runs`, every run with the objectives and comparison metrics as columns, sorted by the first objective; and
    `by_strategy`, one row per conditioning strategy holding the mean over its runs."""
    if parent_run_id is None:
        return {}
    import mlflow

    from sorabench.tracking import SHARED_VIEW_KEY, experiment_url, share_runs_view

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    objectives = [o["metric"] for o in sweep["objectives"]]
    metrics = list(dict.fromkeys([*objectives, *(sweep.get("columns") or DEFAULT_COLUMNS)]))
    params = [] if sweep["mode"] == "grid" else list(parse_space(sweep))  # a grid cell is already the run's name
    ascending = sweep["objectives"][0]["direction"] == "minimize"
    views = {"runs": SHARED_VIEW_KEY, "by_strategy": f"{SHARED_VIEW_KEY}-by-strategy"}
    share_runs_view(client, experiment_id, metrics, params, order_by=objectives[0], ascending=ascending)
    share_runs_view(client, experiment_id, metrics, order_by=objectives[0], ascending=ascending,
                    group_by_tag="sorabench.strategy", key=views["by_strategy"])
    return {name: experiment_url(cfg.mlflow.tracking_uri, experiment_id, view=key) for name, key in views.items()}


PRECISION_ATTR = "sorabench.precision"


def pin_study_precision(study: optuna.Study, check_cfg: DictConfig) -> str:
    """`trainer.precision: auto` resolved once per study (by whoever creates it) and kept in the study, so that every
    trial, worker and rerun computes in one precision, and the report can pool them (`sorabench.precision`)."""
    from sorabench.precision import resolve

    if PRECISION_ATTR not in study.user_attrs:
        resolved = resolve(check_cfg.trainer.precision, check_cfg.trainer.accelerator)
        study.set_user_attr(PRECISION_ATTR, resolved.precision)
        console.print(f"precision of every trial: {resolved}", markup=False, highlight=False)
    return study.user_attrs[PRECISION_ATTR]


def trial_config(cfg: DictConfig, sweep: dict, values: dict, name: str) -> DictConfig:
    overrides = [*(sweep.get("fixed") or []), *(cfg.overrides or [])]
    overrides += [f"{k}={v}" for k, v in values.items()]
    # The run directory is `<study>/<cell>` (unique under outputs/); the MLflow name is the cell alone, so the UI's
    # runs table, which nests children under the study's parent, shows `adaln_zero-seed0` rather than a cut-off
    # `conditioning_ab...`.
    overrides += [f"name={name}", f"mlflow.run_name={name.rsplit('/', 1)[-1]}"]
    overrides += [f"outputs={cfg.outputs}", f"mlflow.experiment={cfg.study}"]
    if cfg.get("plugins"):  # the user's strategies etc., imported by every trial's composition (workers too)
        overrides.append("plugins=[" + ",".join(cfg.plugins) + "]")
    overrides += [f"mlflow.enabled={cfg.mlflow.enabled}", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    return compose_config(sweep.get("command", "train"), overrides, command=sweep.get("command", "train"))


def trial_values(trial: optuna.Trial, sweep: dict) -> dict | None:
    """The trial's cell: a grid trial's queued params (None if it was not queued: a spare), or TPE's suggestion."""
    if sweep["mode"] == "grid":
        keys = list(grid_space(sweep))
        cell = trial.user_attrs.get("cell") or {}
        return {k: cell[k] for k in keys} if all(k in cell for k in keys) else None
    return suggest(trial, sweep)


def make_objective(cfg: DictConfig, sweep: dict, parent_run_id: str | None, ddp: bool = False):
    from sorabench.training.commands import train
    from sorabench.training.dit_module import NonFiniteLossError

    def objective(trial: optuna.Trial):
        values = trial_values(trial, sweep)
        if values is None:  # another worker popped the last queued cell between our look and our ask
            trial.set_user_attr(SPARE, "no queued grid cell was left when this trial started")
            raise optuna.TrialPruned("spare trial: no grid cell left")
        if sweep["mode"] == "grid":
            record_cell_params(trial, values, sweep)
        name = run_name(cfg.study, values, sweep, trial)
        tcfg = trial_config(cfg, sweep, values, name)
        if tcfg.trainer.precision == "auto":  # the study's, resolved once (pin_study_precision)
            with open_dict(tcfg):
                tcfg.trainer.precision = trial.study.user_attrs.get(PRECISION_ATTR, "auto")
        trial.set_user_attr("run_name", name)
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        if "failure_reason" in trial.user_attrs:  # a retry starts clean (the failed trial keeps its reason)
            trial.set_user_attr("failure_reason", None)
        callbacks = []
        if sweep["mode"] == "search" and len(sweep["objectives"]) == 1:
            from optuna_integration import PyTorchLightningPruningCallback

            monitor = (sweep.get("pruner") or {}).get("monitor", "val/loss")
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=monitor))
        tags = {"optuna.study": cfg.study, "optuna.trial_number": str(trial.number)}  # `train` tags the strategy
        console.rule(f"trial {trial.number}: {name}")
        if ddp:
            DDPFollower.announce({"values": values, "name": name, "precision": str(tcfg.trainer.precision)})
        try:
            result = train(tcfg, parent_run_id=parent_run_id, callbacks=callbacks, tags=tags, trial=trial)
        except optuna.TrialPruned as e:
            mark_run(tcfg, "PRUNED", str(e) or "pruned by the MedianPruner")
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            # Ctrl-C (Lightning turns it into SystemExit inside fit) or a signal: not the model's fault. Optuna marks
            # the trial FAIL; rerunning the command queues a retry that resumes the checkpoint and MLflow run.
            reason = f"interrupted ({type(e).__name__}); rerun the command to resume this trial"
            trial.set_user_attr("failure_reason", reason)
            mark_run(tcfg, "FAIL", reason)
            raise KeyboardInterrupt(reason) from e
        except Exception as e:
            # A non-finite loss happens again on a retry: final. Anything else (a full disk, a lost connection, a
            # race) may not: the trial fails now, and rerunning the command runs it again.
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("failure_reason", reason[:2000])
            if isinstance(e, NonFiniteLossError):
                trial.set_user_attr(FINAL_FAILURE, reason[:2000])
            mark_run(tcfg, "FAIL", reason)
            console.print(f"[red]trial {trial.number} failed: {reason}")
            console.print(traceback.format_exc(limit=3), style="dim")
            raise
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        values_out = []
        for o in sweep["objectives"]:
            v = result["metrics"].get(o["metric"])
            if v is None or not math.isfinite(v):
                reason = f"objective {o['metric']}={v} missing or not finite in the trial's metrics"
                trial.set_user_attr(FINAL_FAILURE, reason)
                mark_run(tcfg, "FAIL", reason)  # never COMPLETE in MLflow while Optuna says FAIL
                raise RuntimeError(reason)
            values_out.append(float(v))
        mark_run(tcfg, "COMPLETE", None)
        return values_out if len(values_out) > 1 else values_out[0]

    return objective


def mark_run(tcfg: DictConfig, state: str, reason: str | None):
    """Record the Optuna state (and a failure reason) on the trial's MLflow child run."""
    from sorabench.tracking import read_run_id

    recorded = read_run_id(tcfg.run_dir) if tcfg.mlflow.enabled else None
    if recorded is None:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tcfg.mlflow.tracking_uri)
    run_id = recorded["run_id"]
    client.set_tag(run_id, "optuna.state", state)
    client.set_tag(run_id, "failure_reason", (reason or "")[:5000])  # a resumed, completed run clears the old one
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[state]
    client.set_terminated(run_id, status=status)


def set_parent_status(cfg: DictConfig, run_id: str | None, status: str):
    """The study's parent run is RUNNING while workers have trials to run, FINISHED when the study is done."""
    if run_id is None:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def finished_count(study: optuna.Study) -> tuple[int, int]:
    """(trials that need no more work, trials running now): a failed trial needs none unless it is retried."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and SPARE not in t.user_attrs for t in trials)
    done += sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)


def target_trials(cfg: DictConfig, sweep: dict) -> int:
    if sweep["mode"] == "grid":
        n_cells = len(grid_cells(sweep))
        return min(int(cfg.n_trials or n_cells), n_cells)
    n = cfg.n_trials or sweep.get("n_trials")
    require(isinstance(n, int) and n > 0, "n_trials", n, "a search sweep needs n_trials > 0")
    return n


def worker_threads(cfg: DictConfig) -> int:
    """Intra-op threads of each local worker: `threads`, or the machine's cores shared out among `workers`."""
    workers = int(cfg.workers)
    require(workers >= 1, "workers", cfg.workers, "must be >= 1")
    threads = cfg.threads if cfg.threads is not None else max(1, (os.cpu_count() or 1) // workers)
    require(isinstance(threads, int) and threads >= 1, "threads", cfg.threads, "must be null or an int >= 1")
    return threads


def die_with_parent() -> None:
    """A local worker is killed (SIGKILL) when the process that started it dies, however it dies: a SIGKILLed or
    OOM-killed sweep otherwise leaves orphans that keep training and writing into the study (seen: 20 minutes after
    the parent was gone). Its trial is then the stalled trial a rerun requeues from its last checkpoint, exactly as
    when the worker itself is killed. Linux (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _local_worker(cfg_yaml: str) -> None:
    """Entry point of a local worker process (multiprocessing, spawn): the same study, one trial at a time."""
    from sorabench.tracking import quiet_libraries

    die_with_parent()
    quiet_libraries()
    cfg = OmegaConf.create(cfg_yaml)
    try:
        main(cfg)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent says how to resume
        pass


def start_local_workers(cfg: DictConfig) -> list:
    """Start `workers - 1` more processes on this machine that work on the same study as this one.

    Why: the small DiTs of a CPU ablation leave most of a core idle in per-op overhead, so k processes with
    cores/k threads each train more clips per second in all than one process with every core
    (benchmarks/RESULTS.md measures it). Each trial still runs alone in one process, from its own seed, so its
    numbers match a trial run by itself up to floating-point reduction order. Workers share the Optuna storage
    (each takes the next free grid cell) and the caches, which `prepare_shared_assets` filled before."""
    import multiprocessing

    import torch

    threads = worker_threads(cfg)
    torch.set_num_threads(threads)
    extra = int(cfg.workers) - 1
    if extra <= 0:
        return []
    child = OmegaConf.to_container(cfg, resolve=True)
    child.update(workers=1, threads=threads, report=False)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or DB handles
    procs = [ctx.Process(target=_local_worker, args=(OmegaConf.to_yaml(child),), name=f"sweep-worker-{i + 1}")
             for i in range(extra)]
    for p in procs:
        p.start()
    console.print(f"{int(cfg.workers)} local workers, {threads} thread(s) each")
    return procs


class DDPFollower:
    """`trainer=ddp` inside a sweep. Lightning's launcher starts ranks 1..N-1 by rerunning this command line, once,
    during rank 0's first `fit`; every later trial's `fit` in rank 0 reuses them. Rank 0 alone owns the Optuna
    trial: before each trial it sends the cell (values, run name) to the other ranks — through the environment the
    launcher copies for the first trial, by a broadcast over the process group for later ones — and a stop at the
    end. The other ranks run `follow`: train exactly the cell they are sent, never touching the study."""

    ENV = "SORABENCH_DDP_TRIAL"

    @classmethod
    def announce(cls, message: dict):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list([message], src=0)
        else:
            os.environ[cls.ENV] = json.dumps(message)  # the launcher copies os.environ into the ranks it starts

    @classmethod
    def stop(cls):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            cls.announce({"stop": True})

    @classmethod
    def receive(cls) -> dict:
        import torch.distributed as dist

        first = os.environ.pop(cls.ENV, None)
        if first is not None:
            return json.loads(first)
        if not dist.is_initialized():
            raise RuntimeError("a DDP rank > 0 of a sweep got no trial from rank 0 (started outside its launcher?)")
        message = [None]
        dist.broadcast_object_list(message, src=0)
        return message[0]

    @classmethod
    def follow(cls, cfg: DictConfig, sweep: dict) -> int:
        from sorabench.training.commands import train

        while not (message := cls.receive()).get("stop"):
            tcfg = trial_config(cfg, sweep, message["values"], message["name"])
            with open_dict(tcfg):
                tcfg.trainer.precision = message.get("precision", tcfg.trainer.precision)  # rank 0's, resolved
            try:
                train(tcfg)
            except Exception as e:
                # Exit rather than wait for the next message: rank 0 is inside a collective of this trial's fit,
                # and only a closed peer makes it fail now instead of at the backend's timeout (minutes).
                console.print(f"[red]DDP rank {os.environ.get('LOCAL_RANK')}: {message['name']} failed: {e}; this "
                              "rank exits so that rank 0 fails the trial now")
                return 1
        return 0


def main(cfg: DictConfig, subcommand: str | None = None) -> int:
    if subcommand == "status":
        return status(cfg)
    sweep = to_container(cfg.sweep)
    require(sweep.get("mode") in ("grid", "search"), "sweep.mode", sweep.get("mode"), "must be grid or search")
    parse_space(sweep)
    target = target_trials(cfg, sweep)
    worker_threads(cfg)  # workers= / threads= checked now, not after the shared VAE has trained
    # Compose one trial's config up front: a typo in the sweep YAML or overrides fails now, not after hours.
    probe = grid_space(sweep) if sweep["mode"] == "grid" else {}
    first = {k: v[0] for k, v in probe.items()}
    check_cfg = trial_config(cfg, sweep, first, f"{cfg.study}/config-check")
    if cfg.mlflow.enabled:  # before the study is created: a bad tracking URI leaves no half-made study behind
        check_tracking_uri(cfg.mlflow.tracking_uri)
    ddp = str(check_cfg.trainer.strategy).startswith("ddp")
    if ddp and check_cfg.trainer.num_nodes > 1:
        raise ConfigError(f"trainer.num_nodes={check_cfg.trainer.num_nodes}: a sweep trial runs DDP on one node; "
                          "start one sweep worker per node instead (same storage=)")
    from sorabench.tracking import process_rank

    if ddp and process_rank() > 0:  # a rank started by Lightning's launcher: train what rank 0 sends
        return DDPFollower.follow(cfg, sweep)

    storage = make_storage(cfg)
    study = create_study(cfg, sweep, storage)
    check_study_compatible(study, sweep)
    with study_lock(cfg, storage):  # workers starting at once: one queues the cells and one makes the parent run
        reruns, new = schedule(study, sweep, target if sweep["mode"] == "grid" else None)
        parent_run_id = ensure_parent_run(cfg, study)
        views = share_study_view(cfg, sweep, parent_run_id)
        pin_study_precision(study, check_cfg)
    console.print(f"study {cfg.study!r} ({sweep['mode']}, {target} trials) in {cfg.storage}: queued {new} new "
                  f"cells and {reruns} reruns of interrupted trials")
    if views:
        console.print(f"MLflow runs table of this study: {views['runs']}", markup=False, highlight=False)

    from sorabench.training.commands import prepare_shared_assets

    # The VAE, the evaluator and the data caches, once per sweep and before any trial: local workers started
    # below then only read them.
    prepare_shared_assets(check_cfg, caches=True)
    workers = [] if ddp else start_local_workers(cfg)
    objective = make_objective(cfg, sweep, parent_run_id, ddp=ddp)
    start = time.time()
    set_parent_status(cfg, parent_run_id, "RUNNING")
    with remembered_ctrl_c() as interrupted:
        run_trials(cfg, sweep, study, objective, target, interrupted)
    for w in workers:
        w.join()
    if ddp:  # (after an interrupt, Lightning's launcher has already stopped the other ranks)
        DDPFollower.stop()
    set_parent_status(cfg, parent_run_id, "FINISHED")
    console.print(f"study {cfg.study!r}: {target} trials finished; this worker ran for {time.time() - start:.0f} s")
    print_results(study)
    if cfg.report and cfg.mlflow.enabled:
        from sorabench.report import main as report_main

        rcfg = compose_config("report", [f"outputs={cfg.outputs}", f"study={cfg.study}", f"name={cfg.study}",
                                         f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
                                         f"metric={sweep['objectives'][0]['metric']}"], command="report")
        report_main(rcfg)
    if views:
        from sorabench.tracking import ui_hint

        console.print(f"MLflow UI: {ui_hint(cfg.mlflow.tracking_uri)}{views['runs']} (every run, by "
                      f"{sweep['objectives'][0]['metric']}; per strategy: {views['by_strategy']})",
                      markup=False, highlight=False)
    return 0


def run_trials(cfg: DictConfig, sweep: dict, study: optuna.Study, objective, target: int, interrupted) -> None:
    """Take the study's next queued cell (or TPE's next trial) until none is left to run here or anywhere."""
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> FAIL -> requeued by the callback
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        done, running = finished_count(study)
        if sweep["mode"] == "grid":  # every cell is queued: run what waits, wait for what runs elsewhere
            more, work = waiting > 0, waiting + running > 0
        else:
            more, work = waiting > 0 or done + running < target, done < target
        if not work:
            break
        if more:
            study.optimize(objective, n_trials=1, catch=(Exception,))
        else:  # everything left is running elsewhere (or died there): wait for it to finish or go stale
            time.sleep(cfg.heartbeat_interval)
        if interrupted():  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way: start no further trial
            raise KeyboardInterrupt("interrupted between trials")


@contextmanager
def remembered_ctrl_c():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered (yields `interrupted()`). Python drops an
    exception raised while a __del__ runs (seen here: Lightning's Profiler.__del__ during garbage collection), so
    without this a worker could take Ctrl-C, finish its trial and go on to the next one."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield lambda: False  # Ctrl-C is ignored here (or cannot be caught off the main thread): leave it so
        return
    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)  # Python's own handler raises KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


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
        from datetime import datetime

        now = datetime.fromisoformat(now)
    return {number: (now - beat).total_seconds() for number, beat in rows}


def mlflow_children(cfg: DictConfig) -> dict[str, dict]:
    """The study's MLflow child runs by run name: status and objective metrics."""
    if not cfg.mlflow.enabled:
        return {}
    import mlflow

    check_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.study)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''",
                              max_results=10000)
    from sorabench.tracking import NAME_TAG

    # by run directory name (`<study>/<cell>`); runs made before that tag existed were named so in MLflow too
    return {r.data.tags.get(NAME_TAG) or r.data.tags.get("mlflow.runName", r.info.run_name):
            {"status": r.info.status, **r.data.metrics} for r in runs}


def status_rows(cfg: DictConfig, sweep: dict, study: optuna.Study, storage) -> list[dict]:
    """One row per grid cell (its latest trial; the cells not queued yet too) or per search trial."""
    from datetime import datetime

    trials = [t for t in study.get_trials(deepcopy=False) if SPARE not in t.user_attrs]
    ages = heartbeat_ages(storage, cfg.study)
    runs = mlflow_children(cfg)
    metric = sweep["objectives"][0]["metric"]
    rows = []
    if sweep["mode"] == "grid":
        keys = list(grid_space(sweep))
        by_cell: dict[str, list] = {}
        for t in trials:
            by_cell.setdefault(trial_cell(t, keys), []).append(t)
        groups = [(cell_id(c), by_cell.get(cell_id(c), [])) for c in grid_cells(sweep)]
        groups += [(c, ts) for c, ts in by_cell.items() if c is not None and c not in dict(groups)]
    else:
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number
        groups = [(f"trial-{t.number if first(t) is None else first(t)}", [t]) for t in trials]
    for cell, ts in groups:
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


def status(cfg: DictConfig) -> int:
    """`sorabench sweep status [sweep=...] [study=...] [storage=...]`: the table of every cell of a study."""
    sweep = to_container(cfg.sweep)
    parse_space(sweep)
    storage = make_storage(cfg)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError as e:
        raise ConfigError(f"study={cfg.study!r}: no such study in {cfg.storage}") from e
    rows = status_rows(cfg, sweep, study, storage)
    title = f"study {cfg.study!r} ({sweep['mode']}) in {cfg.storage}"
    columns = ("cell", "trial", "state", "host", "heartbeat", "retries", "wall", "objective", "mlflow")
    print_table(title, columns, [[str(r[c]) for c in columns] for r in rows])
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def print_results(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        console.print("[red]no trial completed")
        return
    if len(study.directions) > 1:
        console.print("Pareto front:")
        for t in study.best_trials:
            console.print(f"  trial {t.number} {t.user_attrs.get('run_name')}: {t.values}")
    else:
        best = study.best_trial
        console.print(f"best trial {best.number} ({best.user_attrs.get('run_name')}): {best.value:.4g}")
