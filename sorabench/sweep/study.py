"""The Optuna study of a sweep: its storage and study-wide lock, creating and checking it, queueing what it still needs
(grid cells, reruns of interrupted trials), counting what is done, and the precision every trial computes in."""

from __future__ import annotations

import hashlib
import random
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console

from sorabench.config import ConfigError, require
from sorabench.sweep.space import cell_id, cell_values, grid_cells, grid_space, parse_space, trial_cell
from sorabench.tracking import ensure_parent_run

console = Console(soft_wrap=True)
# Heartbeats and their retry callback are what distributed studies need; Optuna still labels them experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINAL_FAILURE = "final_failure"  # user attr of a trial that failed for a reason a retry cannot fix
SPARE = "spare"  # user attr of a trial that found no queued cell left when it started (two workers raced for it)
PRECISION_ATTR = "sorabench.precision"  # study user attr: the precision every trial computes in
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run


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


def sampler_and_pruner(sweep: dict, objectives: list[dict]):
    seed = sweep.get("sampler_seed", 0)
    if sweep["mode"] == "grid":  # cells are queued (see `schedule`); the sampler only sees spare trials
        return optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    if len(objectives) > 1:  # Optuna prunes single-objective studies only
        return TrialSeededTPESampler(seed=seed, multivariate=True), optuna.pruners.NopPruner()
    require(sweep["mode"] == "search", "sweep.mode", sweep["mode"], "must be grid or search")
    p = sweep.get("pruner") or {}
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=p.get("n_startup_trials", 3), n_warmup_steps=p.get("n_warmup_steps", 1)
    )
    return TrialSeededTPESampler(seed=seed, multivariate=True), pruner


def create_study(cfg: DictConfig, sweep: dict, storage) -> optuna.Study:
    objectives = sweep.get("objectives") or []
    require(bool(objectives), "sweep.objectives", objectives, "needs at least one {metric, direction}")
    for o in objectives:
        require(o.get("direction") in ("minimize", "maximize"), "sweep.objectives.direction", o, "minimize|maximize")
    sampler, pruner = sampler_and_pruner(sweep, objectives)
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


def pin_study_precision(study: optuna.Study, check_cfg: DictConfig) -> str:
    """`trainer.precision: auto` resolved once per study (by whoever creates it) and kept in the study, so that every
    trial, worker and rerun computes in one precision, and the report can pool them (`sorabench.precision`)."""
    from sorabench.precision import resolve

    if PRECISION_ATTR not in study.user_attrs:
        resolved = resolve(check_cfg.trainer.precision, check_cfg.trainer.accelerator)
        study.set_user_attr(PRECISION_ATTR, resolved.precision)
        console.print(f"precision of every trial: {resolved}", markup=False, highlight=False)
    return study.user_attrs[PRECISION_ATTR]


def study_parent_run(cfg: DictConfig, study: optuna.Study) -> str | None:
    """The study's MLflow parent run (one per study, shared by every worker through the study's user attrs)."""
    if not cfg.mlflow.enabled:
        return None
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None:
        run_id = ensure_parent_run(cfg)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id
