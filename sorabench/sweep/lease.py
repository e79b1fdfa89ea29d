"""One writer per cell, and one trial at a time with retries inside the invocation.

**The lease.** A grid cell's trials share one run directory (same run name: a retry resumes the checkpoint and MLflow
run of the trial it retries). A worker that stalls past `grace_period` (SIGSTOP, a long GC or NFS pause, a frozen VM)
has its trial failed by another worker (`fail_stale_trials`) and the cell retried, possibly while the stalled one
wakes up and goes on writing. The fencing token is the Optuna trial that owns the cell:

- `CellLease.claim` writes `owner.json` (the trial's number) into the run directory when a trial starts;
- `CellLease.check` reads, from the Optuna storage, whether this trial is still RUNNING and, from `owner.json`,
  whether it still owns the directory; either failing raises `CellLost` (and the lease stays lost).

It is checked before every write that matters: each checkpoint save and validation (`LeaseCallback`), each MLflow
metric log and the logger's final status (`wrap_logger`), the final evaluation and `result.json` (`train`), and
the Optuna tell (`run_one_trial`, which also tells with `skip_if_finished`). The check reads the storage at most
once per `min_interval` seconds unless forced; a stall is time passing, so the first write after one always
reads it. A stalled owner thus notices before its next write and leaves: no MLflow status, no tell, one line.
What this cannot close is a stall between a check and the write right after it (milliseconds wide): a lease
without the storage itself refusing stale writes can only narrow that window.

**The trial loop.** `run_one_trial` is `study.optimize(n_trials=1, catch=(Exception,))` done by hand (ask,
heartbeat, objective, tell) so that a lost cell ends quietly, and a transient failure is queued again in the same
invocation (before its tell, so that no worker sees the study empty in between), up to `max_retry` retries; a
final failure (`FINAL_FAILURE`: a NaN loss, a missing objective) or a Ctrl-C is not.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import lightning as L
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses (no public equivalent)
from optuna.trial import TrialState
from rich.console import Console

from sorabench.files import atomic_write_text
from sorabench.sweep.study import FINAL_FAILURE, SPARE, retried_numbers
from sorabench.tracking import set_parent_status, set_parent_tags

console = Console(soft_wrap=True)
OWNER_FILE = "owner.json"
# study.ask() warns that heartbeats are meant for study.optimize: run_one_trial runs the heartbeat thread itself.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class CellLost(Exception):
    """This trial no longer owns its cell: another worker failed it as stale and took the cell over."""


class CellLease:
    def __init__(self, trial: optuna.Trial, run_dir: str | Path, min_interval: float = 1.0):
        self.trial, self.run_dir, self.min_interval = trial, Path(run_dir), min_interval
        self.lost: str | None = None  # why, once lost
        self._checked = 0.0

    def claim(self) -> "CellLease":
        """Make this trial the owner of the run directory (a retry always has a higher number than what it
        retries)."""
        atomic_write_text(self.run_dir / OWNER_FILE, json.dumps(
            {"trial": self.trial.number, "host": f"{socket.gethostname()}:{os.getpid()}"}))
        self._checked = time.monotonic()
        return self

    def owner(self) -> int | None:
        try:
            return json.loads((self.run_dir / OWNER_FILE).read_text())["trial"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # gone or unreadable: the storage check decides

    def check(self, force: bool = False) -> None:
        """Raise `CellLost` if this trial lost its cell (reads the storage at most every `min_interval` s)."""
        if self.lost is None and (force or time.monotonic() - self._checked >= self.min_interval):
            study = self.trial.study
            state = study._storage.get_trial(self.trial._trial_id).state
            owner = self.owner()
            if state != TrialState.RUNNING:
                self.lost = f"Optuna set it {state.name} (stalled past grace_period?)"
            elif owner is not None and owner != self.trial.number:
                self.lost = f"trial {owner} owns its run directory now"
            self._checked = time.monotonic()
        if self.lost is not None:
            raise CellLost(f"trial {self.trial.number} lost its cell {self.run_dir.name}: {self.lost}; it leaves "
                           "the cell to the trial that took it over")

    def callback(self) -> L.Callback:
        return LeaseCallback(self)

    def wrap_logger(self, logger):
        """The MLflow logger, checking the lease before each metric log and ending the run only while owned."""
        if logger is None:
            return None
        log_metrics, finalize = logger.log_metrics, logger.finalize

        def guarded_log_metrics(metrics, step=None):
            self.check()
            return log_metrics(metrics, step)

        def guarded_finalize(status: str = "success"):
            if self.lost is None:  # a lost cell's run belongs to the retry now: leave its status alone
                return finalize(status)

        logger.log_metrics, logger.finalize = guarded_log_metrics, guarded_finalize
        return logger


class LeaseCallback(L.Callback):
    """The lease inside `fit`: before each checkpoint save (forced), each validation, and every training batch
    (throttled)."""

    def __init__(self, lease: CellLease):
        self.lease = lease

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lease.check()

    def on_validation_start(self, trainer, pl_module):
        self.lease.check(force=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # called before the file is written
        self.lease.check(force=True)


def run_one_trial(study: optuna.Study, objective, max_retry: int) -> None:
    """Ask, run `objective` under the trial's heartbeat, tell (see the module docstring). Raises KeyboardInterrupt;
    any other failure is recorded on the trial, and retried when transient."""
    trial = study.ask()
    values, state, interrupt = None, TrialState.FAIL, None
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            values, state = objective(trial), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except CellLost as e:
            console.print(f"[yellow]{e}", markup=True, highlight=False)
            end_lost(study, trial, str(e))
            return
        except KeyboardInterrupt as e:
            interrupt = e
        except Exception:  # noqa: BLE001 - recorded on the trial (train_trial printed it); the sweep goes on
            pass
    if state == TrialState.FAIL and interrupt is None:
        retry_failed(study, study._storage.get_trial(trial._trial_id), max_retry)
    study.tell(trial, values, state=state, skip_if_finished=True)
    if interrupt is not None:
        raise interrupt


def end_lost(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """A lost trial that Optuna still has RUNNING (a newer trial took its directory without failing it: a cell
    queued twice) ends FAIL as a spare, never retried; one failed as stale is left as it is."""
    try:
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            trial.set_user_attr(SPARE, reason)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except (RuntimeError, ValueError):  # finished meanwhile (UpdateFinishedTrialError): nothing left to end
        pass


def retry_failed(study: optuna.Study, frozen, max_retry: int) -> bool:
    """Queue a retry of a trial that failed for a transient reason, unless it was retried `max_retry` times."""
    if FINAL_FAILURE in frozen.user_attrs or SPARE in frozen.user_attrs or frozen.state != TrialState.RUNNING:
        return False
    history = frozen.system_attrs.get("retry_history", [])
    if len(history) >= max_retry:
        console.print(f"[red]trial {frozen.number} failed after {len(history)} retries; rerun the command to try "
                      "again", highlight=False)
        return False
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)
    console.print(f"trial {frozen.number} failed; retrying it ({len(history) + 1} of {max_retry})", highlight=False)
    return True


def end_parent_run(cfg, study: optuna.Study, parent_run_id: str | None, target: int) -> str:
    """End the study's MLflow parent run honestly, once nothing runs or waits anywhere (else leave it RUNNING for
    the worker that finishes last): FINISHED when every cell completed, FAILED when some failed for good; the
    parent's tags `sorabench.cells`, `sorabench.cells_complete` and `sorabench.cells_failed` say which (the
    report's header reads them). Returns the status set (or RUNNING)."""
    trials = study.get_trials(deepcopy=False)
    if parent_run_id is None or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return "RUNNING"
    retried = retried_numbers(trials)
    ended = [t for t in trials if SPARE not in t.user_attrs and t.number not in retried]
    complete = [t for t in ended if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t.user_attrs.get("run_name", f"trial-{t.number}").rsplit("/", 1)[-1] for t in ended
              if t.state == TrialState.FAIL]
    status = "FINISHED" if len(complete) >= target else "FAILED"
    set_parent_tags(cfg, parent_run_id, {"sorabench.cells": target, "sorabench.cells_complete": len(complete),
                                         "sorabench.cells_failed": ", ".join(failed) or "none"})
    set_parent_status(cfg, parent_run_id, status)
    return status
