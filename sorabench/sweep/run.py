"""A sweep's main flow (`run_sweep`): check the sweep, open its study and queue its cells, run trials until none is
left here or anywhere, then report. Each trial is one `train` call (`make_objective`)."""

from __future__ import annotations

import math
import os
import socket
import time
import traceback

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState
from rich.console import Console

from sorabench.config import ConfigError, require, to_container
from sorabench.files import DiskFullError
from sorabench.sweep.lease import CellLease, CellLost, end_parent_run, run_one_trial
from sorabench.sweep.space import grid_space, parse_space, record_cell_params, run_name, trial_config, trial_values, \
    view_columns
from sorabench.sweep.study import FINAL_FAILURE, PRECISION_ATTR, SPARE, check_study_compatible, create_study, \
    finished_count, make_storage, pin_study_precision, schedule, study_lock, study_parent_run, target_trials
from sorabench.sweep.tuning import RECIPE, TUNED, deviations, expand_sweep, freeze, picks_tags, recipe_tags, \
    tuned_key
from sorabench.sweep.workers import DDPFollower, die_with_parent, remembered_ctrl_c, start_local_workers, \
    worker_threads
from sorabench.tracking import check_tracking_uri, mark_run, process_rank, quiet_libraries, set_parent_status, \
    set_parent_tags, share_study_view, ui_hint

console = Console(soft_wrap=True)


def run_sweep(cfg: DictConfig, report=None) -> int:
    """`sorabench sweep`: run this worker's share of the study; then `report(cfg, sweep)`, where given, reports on it
    (`report=true`, with MLflow)."""
    sweep = to_container(cfg.sweep)
    sweep = expand_sweep(sweep, make_storage(cfg) if "tuned_from" in sweep else None)  # recipes, picks
    check_cfg, target = check_sweep(cfg, sweep)
    ddp = str(check_cfg.trainer.strategy).startswith("ddp")
    if ddp and check_cfg.trainer.num_nodes > 1:
        raise ConfigError(f"trainer.num_nodes={check_cfg.trainer.num_nodes}: a sweep trial runs DDP on one node; "
                          "start one sweep worker per node instead (same storage=)")
    if ddp and process_rank() > 0:  # a rank started by Lightning's launcher: train what rank 0 sends
        return DDPFollower.follow(cfg, sweep)

    study, parent_run_id, views = open_study(cfg, sweep, check_cfg, target)
    from sorabench.training.dit_run import prepare_shared_assets

    # The VAE, the evaluator and the data caches, once per sweep and before any trial: local workers started
    # below then only read them.
    prepare_shared_assets(check_cfg, caches=True)
    workers = [] if ddp else start_local_workers(cfg, local_worker)
    objective = make_objective(cfg, sweep, parent_run_id, ddp=ddp)
    start = time.time()
    set_parent_status(cfg, parent_run_id, "RUNNING")
    with remembered_ctrl_c() as interrupted:
        run_trials(cfg, sweep, study, objective, target, interrupted)
    for w in workers:
        w.join()
    if ddp:  # (after an interrupt, Lightning's launcher has already stopped the other ranks)
        DDPFollower.stop()
    end_parent_run(cfg, study, parent_run_id, target)  # FINISHED or FAILED once no cell runs or waits anywhere
    console.print(f"study {cfg.study!r}: {target} trials finished; this worker ran for {time.time() - start:.0f} s")
    print_results(study)
    if report is not None and cfg.report and cfg.mlflow.enabled:
        report(cfg, sweep)
    print_views(cfg, sweep, views)
    return 0


def check_sweep(cfg: DictConfig, sweep: dict) -> tuple[DictConfig, int]:
    """Every check that can fail before the study is touched: the sweep YAML, `workers=`/`threads=`, one trial's
    composed config (a typo in the sweep YAML or overrides fails now, not after hours) and the tracking URI (a bad
    one leaves no half-made study behind). Returns (that trial's config, the number of trials to run)."""
    require(sweep.get("mode") in ("grid", "search"), "sweep.mode", sweep.get("mode"), "must be grid or search")
    parse_space(sweep)
    replicates = sweep.get("replicates") or []
    require(isinstance(replicates, list) and all(k in (sweep.get("params") or {}) and k not in ("conditioning", "recipe")
                                                 for k in replicates) and (not replicates or sweep["mode"] == "grid"),
            "sweep.replicates", replicates, "must list grid axes of `params` (e.g. data.seed) other than "
            "conditioning and recipe: they are pooled in the report as replicates, like seeds")
    target = target_trials(cfg, sweep)
    worker_threads(cfg)  # checked now, not after the shared VAE has trained
    probe = grid_space(sweep) if sweep["mode"] == "grid" else {}
    first = {k: v[0] for k, v in probe.items()}
    check_cfg = trial_config(cfg, sweep, first, f"{cfg.study}/config-check")
    per = tuned_key(sweep)
    for strategy in sweep.get("picks") or {}:  # every tuned recipe composes too (a pick's override may be stale)
        trial_config(cfg, sweep, {**first, per: strategy, RECIPE: TUNED}, f"{cfg.study}/config-check")
    for line in deviations(sweep, int(check_cfg.trainer.max_steps)):
        console.print(f"[yellow]this sweep deviates from its declared protocol: {line}", highlight=False)
    if cfg.mlflow.enabled:
        check_tracking_uri(cfg.mlflow.tracking_uri)
    return check_cfg, target


def open_study(cfg: DictConfig, sweep: dict, check_cfg: DictConfig, target: int):
    """Create (or load) the study and queue what it still needs. Returns (study, its MLflow parent run id or None,
    the addresses of its runs-table views or {})."""
    storage = make_storage(cfg)
    study = create_study(cfg, sweep, storage)
    check_study_compatible(study, sweep)
    digest = freeze(study, sweep, list(cfg.overrides or []))
    with study_lock(cfg, storage):  # workers starting at once: one queues the cells and one makes the parent run
        reruns, new = schedule(study, sweep, target if sweep["mode"] == "grid" else None)
        parent_run_id = study_parent_run(cfg, study)
        views = {} if parent_run_id is None else share_study_view(cfg, parent_run_id, *view_columns(sweep))
        deviation = "; ".join(deviations(sweep, int(check_cfg.trainer.max_steps))) or "none"
        set_parent_tags(cfg, parent_run_id, {"sorabench.protocol_hash": digest, **picks_tags(sweep),
                                             "sorabench.protocol_deviations": deviation})
        axis = (sweep.get("params") or {}).get("trainer.precision")
        if axis:  # every cell names its precision (sweep=precision_parity): nothing to pin for the study
            console.print(f"precision: a grid axis, each trial computes in its cell's ({', '.join(axis['choices'])})",
                          markup=False, highlight=False)
        else:
            pin_study_precision(study, check_cfg)
    console.print(f"study {cfg.study!r} ({sweep['mode']}, {target} trials) in {cfg.storage}: queued {new} new "
                  f"cells and {reruns} reruns of interrupted trials")
    if views:
        console.print(f"MLflow runs table of this study: {views['runs']}", markup=False, highlight=False)
    return study, parent_run_id, views


def print_views(cfg: DictConfig, sweep: dict, views: dict[str, str]):
    """Where to look at the study's runs (nothing without MLflow)."""
    if views:
        console.print(f"MLflow UI: {ui_hint(cfg.mlflow.tracking_uri)}{views['runs']} (every run, by "
                      f"{sweep['objectives'][0]['metric']}; per strategy: {views['by_strategy']})",
                      markup=False, highlight=False)


def local_worker(cfg_yaml: str) -> None:
    """Entry point of a local worker process (`start_local_workers`, spawn): the same study, one trial at a time."""
    die_with_parent()
    quiet_libraries()
    cfg = OmegaConf.create(cfg_yaml)
    try:
        run_sweep(cfg)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent says how to resume
        pass


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
            run_one_trial(study, objective, int(cfg.max_retry))  # a transient failure is retried now
        else:  # everything left is running elsewhere (or died there): wait for it to finish or go stale
            time.sleep(cfg.heartbeat_interval)
        if interrupted():  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way: start no further trial
            raise KeyboardInterrupt("interrupted between trials")


def make_objective(cfg: DictConfig, sweep: dict, parent_run_id: str | None, ddp: bool = False):
    """Optuna's objective: train the trial's cell (or TPE's suggestion) and return its objective value(s)."""

    def objective(trial: optuna.Trial):
        values = trial_values(trial, sweep)
        if values is None:  # another worker popped the last queued cell between our look and our ask
            trial.set_user_attr(SPARE, "no queued grid cell was left when this trial started")
            raise optuna.TrialPruned("spare trial: no grid cell left")
        if sweep["mode"] == "grid":
            record_cell_params(trial, values, sweep)
        name = run_name(cfg.study, values, sweep, trial)
        tcfg = start_trial(cfg, sweep, trial, values, name)
        lease = CellLease(trial, tcfg.run_dir).claim()  # one writer per cell (sweep/lease.py)
        callbacks = []
        if sweep["mode"] == "search" and len(sweep["objectives"]) == 1:
            from optuna_integration import PyTorchLightningPruningCallback

            monitor = (sweep.get("pruner") or {}).get("monitor", "val/loss")
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=monitor))
        tags = {"optuna.study": cfg.study, "optuna.trial_number": str(trial.number),  # `train` tags the strategy
                **recipe_tags(values, sweep)}
        console.rule(f"trial {trial.number}: {name}")
        if ddp:
            DDPFollower.announce({"values": values, "name": name, "precision": str(tcfg.trainer.precision)})
        result = train_trial(tcfg, trial, parent_run_id, [*callbacks, lease.callback()], tags, lease)
        lease.check(force=True)  # before the run is marked COMPLETE and the trial told
        trial.set_user_attr("mlflow_run_id", result.get("run_id"))
        # what a later sweep may select on (tuned_from reads the guidance axis' eval/cfg<s>/* of a tuning study)
        trial.set_user_attr("metrics", {k: float(v) for k, v in result["metrics"].items() if k.startswith("eval")
                                        and isinstance(v, (int, float)) and math.isfinite(v)})
        return objective_values(tcfg, trial, sweep, result)

    return objective


def start_trial(cfg: DictConfig, sweep: dict, trial: optuna.Trial, values: dict, name: str) -> DictConfig:
    """The trial's config, in the study's precision, and what `sweep status` shows of it (run name, host)."""
    tcfg = trial_config(cfg, sweep, values, name)
    if tcfg.trainer.precision == "auto":  # the study's, resolved once (pin_study_precision)
        with open_dict(tcfg):
            tcfg.trainer.precision = trial.study.user_attrs.get(PRECISION_ATTR, "auto")
    trial.set_user_attr("run_name", name)
    trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
    if "failure_reason" in trial.user_attrs:  # a retry starts clean (the failed trial keeps its reason)
        trial.set_user_attr("failure_reason", None)
    return tcfg


def train_trial(tcfg: DictConfig, trial: optuna.Trial, parent_run_id: str | None, callbacks: list,
                tags: dict, lease: CellLease | None = None) -> dict:
    """`train` the trial's config; a failure is recorded on the trial and its MLflow run, and re-raised."""
    from sorabench.training.dit_run import train
    from sorabench.training.dit_module import NonFiniteLossError

    try:
        return train(tcfg, parent_run_id=parent_run_id, callbacks=callbacks, tags=tags, trial=trial, guard=lease)
    except CellLost:  # the cell is another trial's now: record nothing on it (sweep/lease.py)
        raise
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
        # race) may not: the trial fails now and is retried, in this invocation up to max_retry (sweep/lease.py).
        reason = f"{type(e).__name__}: {e}"
        trial.set_user_attr("failure_reason", reason[:2000])
        if isinstance(e, NonFiniteLossError):
            trial.set_user_attr(FINAL_FAILURE, reason[:2000])
        mark_run(tcfg, "FAIL", reason)
        console.print(f"[red]trial {trial.number} failed: {reason}")
        if not isinstance(e, DiskFullError):  # one line: it names the file
            console.print(traceback.format_exc(limit=3), style="dim")
        raise


def objective_values(tcfg: DictConfig, trial: optuna.Trial, sweep: dict, result: dict):
    """The objectives read from the trained run's metrics; one that is missing or not finite fails the trial for
    good (it would again on a retry)."""
    values = []
    for o in sweep["objectives"]:
        v = result["metrics"].get(o["metric"])
        if v is None or not math.isfinite(v):
            reason = f"objective {o['metric']}={v} missing or not finite in the trial's metrics"
            trial.set_user_attr(FINAL_FAILURE, reason)
            mark_run(tcfg, "FAIL", reason)  # never COMPLETE in MLflow while Optuna says FAIL
            raise RuntimeError(reason)
        values.append(float(v))
    mark_run(tcfg, "COMPLETE", None)
    return values if len(values) > 1 else values[0]


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
