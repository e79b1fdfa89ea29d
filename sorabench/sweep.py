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
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import traceback
import warnings
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console

from sorabench.config import ConfigError, compose_config, require, to_container
from sorabench.tracking import check_tracking_uri, git_commit, package_versions, tag_experiment_kind

console = Console(soft_wrap=True)
# Heartbeats and their retry callback are what distributed studies need; Optuna still labels them experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINAL_FAILURE = "final_failure"  # user attr of a trial that failed for a reason a retry cannot fix


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
        parts = [str(v) for k, v in values.items() if k != "seed"] + [f"seed{values['seed']}"]
        cell = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))
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
    if sweep["mode"] == "grid":
        sampler = optuna.samplers.GridSampler(grid_space(sweep), seed=0)
        pruner = optuna.pruners.NopPruner()
    elif len(objectives) > 1:  # Optuna prunes single-objective studies only
        sampler, pruner = optuna.samplers.TPESampler(seed=0, multivariate=True), optuna.pruners.NopPruner()
    else:
        require(sweep["mode"] == "search", "sweep.mode", sweep["mode"], "must be grid or search")
        sampler = optuna.samplers.TPESampler(seed=0, multivariate=True)
        p = sweep.get("pruner") or {}
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=p.get("n_startup_trials", 3), n_warmup_steps=p.get("n_warmup_steps", 1)
        )
    return optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        directions=[o["direction"] for o in objectives],
        load_if_exists=True,
    )


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


def trial_config(cfg: DictConfig, sweep: dict, values: dict, name: str) -> DictConfig:
    overrides = [*(sweep.get("fixed") or []), *(cfg.overrides or [])]
    overrides += [f"{k}={v}" for k, v in values.items()]
    overrides += [f"name={name}", f"outputs={cfg.outputs}", f"mlflow.experiment={cfg.study}"]
    overrides += [f"mlflow.enabled={cfg.mlflow.enabled}", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"]
    return compose_config(sweep.get("command", "train"), overrides, command=sweep.get("command", "train"))


def make_objective(cfg: DictConfig, sweep: dict, parent_run_id: str | None):
    from sorabench.training.commands import train

    def objective(trial: optuna.Trial):
        values = suggest(trial, sweep)
        name = run_name(cfg.study, values, sweep, trial)
        tcfg = trial_config(cfg, sweep, values, name)
        trial.set_user_attr("run_name", name)
        callbacks = []
        if sweep["mode"] == "search" and len(sweep["objectives"]) == 1:
            from optuna_integration import PyTorchLightningPruningCallback

            monitor = (sweep.get("pruner") or {}).get("monitor", "val/loss")
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=monitor))
        tags = {
            "optuna.study": cfg.study,
            "optuna.trial_number": str(trial.number),
            "sorabench.strategy": str(tcfg.conditioning.name),
        }
        console.rule(f"trial {trial.number}: {name}")
        try:
            result = train(tcfg, parent_run_id=parent_run_id, callbacks=callbacks, tags=tags, trial=trial)
        except optuna.TrialPruned as e:
            mark_run(tcfg, "PRUNED", str(e) or "pruned by the MedianPruner")
            raise
        except Exception as e:
            # An error inside the trial (a NaN loss, a bad value, a bug) happens again on a retry: record why, mark
            # it final, and let the sweep go on. Only a dead worker's trial (stale heartbeat) is retried.
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr(FINAL_FAILURE, reason)
            mark_run(tcfg, "FAIL", reason)
            console.print(f"[red]trial {trial.number} failed: {reason}")
            console.print(traceback.format_exc(limit=3), style="dim")
            raise
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        mark_run(tcfg, "COMPLETE", None)
        values_out = []
        for o in sweep["objectives"]:
            v = result["metrics"].get(o["metric"])
            if v is None or not math.isfinite(v):
                raise RuntimeError(f"objective {o['metric']} missing or not finite in the trial's metrics")
            values_out.append(float(v))
        return values_out if len(values_out) > 1 else values_out[0]

    return objective


def mark_run(tcfg: DictConfig, state: str, reason: str | None):
    """Record the Optuna state (and a failure reason) on the trial's MLflow child run."""
    from sorabench.tracking import RUN_ID_FILE

    id_file = Path(tcfg.run_dir) / RUN_ID_FILE
    if not tcfg.mlflow.enabled or not id_file.is_file():
        return
    import json

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tcfg.mlflow.tracking_uri)
    run_id = json.loads(id_file.read_text())["run_id"]
    client.set_tag(run_id, "optuna.state", state)
    if reason:
        client.set_tag(run_id, "failure_reason", reason[:5000])
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[state]
    client.set_terminated(run_id, status=status)


def finished_count(study: optuna.Study) -> tuple[int, int]:
    """(trials that need no more work, trials running now).

    A failed trial needs no more work unless the heartbeat callback queued a retry of it (a dead worker's trial);
    a trial that failed by itself (NaN loss, bad value, bug) would fail again, and its cell counts as done."""
    trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials} - {None}
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    done += sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)


def target_trials(cfg: DictConfig, sweep: dict) -> int:
    if sweep["mode"] == "grid":
        n_cells = math.prod(len(v) for v in grid_space(sweep).values())
        return int(cfg.n_trials or n_cells)
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


def _local_worker(cfg_yaml: str) -> None:
    """Entry point of a local worker process (multiprocessing, spawn): the same study, one trial at a time."""
    from sorabench.cli import quiet_libraries

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


def main(cfg: DictConfig) -> int:
    sweep = to_container(cfg.sweep)
    require(sweep.get("mode") in ("grid", "search"), "sweep.mode", sweep.get("mode"), "must be grid or search")
    parse_space(sweep)
    target = target_trials(cfg, sweep)
    # Compose one trial's config up front: a typo in the sweep YAML or overrides fails now, not after hours.
    probe = grid_space(sweep) if sweep["mode"] == "grid" else {}
    first = {k: v[0] for k, v in probe.items()}
    check_cfg = trial_config(cfg, sweep, first, f"{cfg.study}/config-check")
    if cfg.mlflow.enabled:  # before the study is created: a bad tracking URI leaves no half-made study behind
        check_tracking_uri(cfg.mlflow.tracking_uri)

    storage = make_storage(cfg)
    study = create_study(cfg, sweep, storage)
    parent_run_id = ensure_parent_run(cfg, study)
    console.print(f"study {cfg.study!r} ({sweep['mode']}, {target} trials) in {cfg.storage}")

    from sorabench.training.commands import prepare_shared_assets

    # The VAE, the evaluator and the data caches, once per sweep and before any trial: local workers started
    # below then only read them.
    prepare_shared_assets(check_cfg, caches=True)
    workers = start_local_workers(cfg)
    objective = make_objective(cfg, sweep, parent_run_id)
    start = time.time()
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> FAIL -> requeued by the callback
        done, running = finished_count(study)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if done >= target:
            break
        if done + running < target or waiting:
            study.optimize(objective, n_trials=1, catch=(Exception,))
        else:  # everything left is running elsewhere (or died there): wait for it to finish or go stale
            time.sleep(cfg.heartbeat_interval)
    for w in workers:
        w.join()
    console.print(f"study {cfg.study!r}: {target} trials finished; this worker ran for {time.time() - start:.0f} s")
    print_results(study)
    if cfg.report and cfg.mlflow.enabled:
        from sorabench.report import main as report_main

        rcfg = compose_config("report", [f"outputs={cfg.outputs}", f"study={cfg.study}", f"name={cfg.study}",
                                         f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
                                         f"metric={sweep['objectives'][0]['metric']}"], command="report")
        report_main(rcfg)
        console.print(f"MLflow UI: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri} --host 127.0.0.1, then open "
                      "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (runs tables, not GenAI)")
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
