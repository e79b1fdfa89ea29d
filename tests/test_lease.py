"""One writer per cell (sorabench/sweep/lease.py): a worker stalled past grace_period loses its cell to the retry and
leaves it alone when it wakes up; transient failures are retried within one invocation."""

import os
import signal
import time
import uuid

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweep import children, postgres_url, start_sweep, storage_of, trials_of

STUDY = "conditioning_ablation"


def wait_for(what, timeout, message, procs=()):
    """What `what()` returns once it is truthy (polled; an exception counts as not yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"a worker exited while waiting for {message}: {p.communicate()[0][-3000:]}"
        try:
            found = what()
            if found:
                return found
        except Exception:  # the study not created yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {message}")


@pytest.mark.slow  # two real workers and a takeover: ~1 min on 2 shared cores
@pytest.mark.parametrize("backend", ["postgres"])  # the lease is Optuna-API only; `sqlite` runs it on SQLite
def test_a_stalled_worker_leaves_its_taken_over_cell_alone(tmp_path, backend):
    """Two workers, one cell each; worker 2 SIGSTOPped mid-trial (after a checkpoint) until worker 1 failed its
    trial as stale and runs the retry, then continued: worker 2 notices it lost the cell before its next write and
    leaves without a traceback; each cell ends COMPLETE once, with one MLflow child and one eval value per step."""
    study, storage = STUDY, f"sqlite:///{tmp_path}/optuna.db"
    extra = ["heartbeat_interval=1", "grace_period=3", "report=false", "~sweep.protocol"]  # tiny: no declared budget
    if backend == "postgres":  # the setting: a shared PostgreSQL study
        study, storage = f"pg-{uuid.uuid4().hex[:8]}", postgres_url()
        extra += [f"storage={storage}", f"study={study}"]
    longer = ["trainer.max_steps=120", "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=5"]
    w1 = start_sweep(tmp_path, extra=extra, trial_overrides=longer)
    time.sleep(3)  # w1 queues the cells and trains the shared assets first; w2 then finds them
    w2 = start_sweep(tmp_path, extra=extra, trial_overrides=longer)
    procs = [w1, w2]

    def trials():
        return trials_of(study, storage)

    def running(w):
        return [t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("host", "").endswith(
            f":{w.pid}")]

    try:
        wait_for(lambda: running(w2) and (tmp_path / "train" / running(w2)[0].user_attrs["run_name"] / "checkpoints"
                                          / "last.ckpt").is_file(), 240, "worker 2 mid-trial", procs)
        stale = running(w2)[0]
        os.kill(w2.pid, signal.SIGSTOP)
        cell = stale.user_attrs["cell"]
        wait_for(lambda: [t for t in running(w1) if t.user_attrs.get("cell") == cell], 240,
                 "worker 1 to take the stalled cell over", [w1])
        os.kill(w2.pid, signal.SIGCONT)
        outs = [w.communicate(timeout=120)[0] for w in procs]
    finally:
        for w in procs:
            if w.poll() is None:
                os.kill(w.pid, signal.SIGCONT)
                w.kill()
    assert w1.returncode == 0, outs[0][-3000:]
    assert w2.returncode == 0 and "Traceback" not in outs[1], outs[1][-3000:]
    assert "Cannot tell" not in outs[1] and f"trial {stale.number} lost its cell" in outs[1], outs[1][-3000:]
    final = trials()
    complete = [tuple(sorted(t.user_attrs["cell"].items())) for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 == len(set(complete))  # every cell COMPLETE exactly once
    assert [t.state for t in final if t.number == stale.number] == [TrialState.FAIL]
    client, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    for kid in kids:
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "eval/fvd")]
        assert steps and len(steps) == len(set(steps)), (kid.info.run_name, steps)  # one eval value per step
        value = kid.data.metrics["eval/fvd"]
        trial = next(t for t in final if t.state == TrialState.COMPLETE and t.user_attrs["run_name"].endswith(
            kid.info.run_name))
        assert value == pytest.approx(trial.value)  # MLflow's value is the one Optuna holds
    if backend == "postgres":
        optuna.delete_study(study_name=study, storage=storage_of(storage))


def grid_study(tmp_path, cells):
    from sorabench.sweep.study import schedule

    sweep = {"mode": "grid", "params": {"conditioning": {"choices": cells}}, "seeds": [0]}
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    schedule(study, sweep, len(cells))
    return study, sweep


def test_a_transient_failure_is_retried_in_the_same_invocation_and_a_final_one_is_not(tmp_path):
    """`run_trials` retries a transient failure up to max_retry in the same invocation, never a final one (NaN
    loss), never beyond max_retry; the study then ends with every cell either COMPLETE or failed for good."""
    from omegaconf import OmegaConf

    from sorabench.sweep.run import run_trials
    from sorabench.sweep.study import FINAL_FAILURE, finished_count

    study, sweep = grid_study(tmp_path, ["flaky", "nan", "broken"])
    calls = []

    def objective(trial):
        cell = trial.user_attrs["cell"]["conditioning"]
        calls.append(cell)
        if cell == "nan":
            trial.set_user_attr(FINAL_FAILURE, "loss is nan")
            raise RuntimeError("loss is nan")
        if cell == "broken" or calls.count("flaky") == 1:
            raise OSError("transient")
        return 1.0

    cfg = OmegaConf.create({"heartbeat_interval": 1, "max_retry": 2})
    run_trials(cfg, sweep, study, objective, 3, lambda: False)
    assert sorted(calls) == ["broken"] * 3 + ["flaky"] * 2 + ["nan"]  # broken: 1 try + max_retry retries
    by_cell = {}
    for t in study.trials:
        by_cell.setdefault(t.user_attrs["cell"]["conditioning"], []).append(t.state)
    assert by_cell == {"flaky": [TrialState.FAIL, TrialState.COMPLETE], "nan": [TrialState.FAIL],
                       "broken": [TrialState.FAIL] * 3}
    assert finished_count(study) == (3, 0)


def test_the_parent_run_ends_only_when_every_cell_did_and_the_report_says_what_is_missing(tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    from omegaconf import OmegaConf

    from sorabench.report.markdown import completeness_line
    from sorabench.sweep.lease import end_parent_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create({"mlflow": {"tracking_uri": uri}})
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("s", artifact_location=str(tmp_path / "a"))).info.run_id
    study, _ = grid_study(tmp_path, ["a", "b"])
    first = study.ask()  # cell a runs here; cell b waits
    assert end_parent_run(cfg, study, parent, 2) == "RUNNING"  # another worker still has work: not ended
    assert client.get_run(parent).info.status == "RUNNING"
    first.set_user_attr("run_name", "s/a-seed0")
    study.tell(first, state=TrialState.FAIL)
    second = study.ask()
    study.tell(second, 1.0)
    assert end_parent_run(cfg, study, parent, 2) == "FAILED"
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["sorabench.cells_failed"] == "a-seed0"
    assert run.data.tags["sorabench.cells"] == "2" and run.data.tags["sorabench.cells_complete"] == "1"

    def header(states, cells):
        return completeness_line(SimpleNamespace(children=pd.DataFrame({"state": states}),
                                                 parents=pd.DataFrame({"tags.sorabench.cells": [cells]})))

    assert header(["COMPLETE", "FAIL"], "2") == [
        "**INCOMPLETE STUDY: 1 of 2 cells completed (1 FAIL)**; the tables below count only COMPLETE runs"]
    assert "1 missing" in header(["COMPLETE"], "2")[0]
    assert header(["COMPLETE", "COMPLETE"], "2") == [] == header(["COMPLETE"], None)


@pytest.mark.slow  # a real trial interrupted and resumed: ~1-2 min on 2 shared cores
def test_ctrl_c_during_the_final_evaluation_of_a_real_trial_resumes_to_one_complete_run(tmp_path):
    """Ctrl-C while a real trial evaluates (training done, result.json not yet written): the worker exits 130, the
    rerun evaluates that trial again from its last checkpoint, and the cell ends COMPLETE once, in one MLflow run
    that holds one eval value."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    extra = ["sweep.params.conditioning.choices=[adaln_zero]", "report=false", "~sweep.protocol"]
    slow_eval = ["trainer.max_steps=20", "trainer.checkpoint_every_n_steps=10", "metrics.sample_steps=400"]
    run_dir = tmp_path / "train" / STUDY / "adaln_zero-seed0"
    proc = start_sweep(tmp_path, extra=extra, trial_overrides=slow_eval)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "best-step=20.ckpt").is_file(), 240, "the final evaluation",
                 [proc])
        assert not (run_dir / "result.json").exists(), "the evaluation ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert not (run_dir / "result.json").exists()
    proc = start_sweep(tmp_path, extra=extra, trial_overrides=slow_eval)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    states = sorted(t.state.name for t in trials_of(STUDY, storage))
    assert states == ["COMPLETE", "FAIL"]  # the interrupted trial, and its retry
    client, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", STUDY)
    assert len(kids) == 1 and kids[0].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(kids[0].info.run_id, "eval/fvd")] == [20]


def test_the_lease_is_lost_to_the_storage_or_to_a_newer_owner_and_then_guards_every_write(tmp_path):
    """The fencing token, without processes: lost when Optuna no longer has the trial RUNNING, or when a newer
    trial owns the run directory; once lost, checkpoint saves and metric logs raise, and the run's status is left
    alone."""
    from sorabench.sweep.lease import CellLease, CellLost

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db")
    first, second = study.ask(), study.ask()
    lease = CellLease(first, tmp_path / "cell").claim()
    lease.check(force=True)  # owned
    study._storage.set_trial_state_values(first._trial_id, TrialState.FAIL)  # another worker failed it as stale
    with pytest.raises(CellLost, match=f"trial {first.number} lost its cell cell: Optuna set it FAIL"):
        lease.check(force=True)
    retry = CellLease(second, tmp_path / "cell").claim()
    third = study.ask()
    CellLease(third, tmp_path / "cell").claim()  # a newer trial took the directory over
    with pytest.raises(CellLost, match=f"trial {third.number} owns its run directory now"):
        retry.check(force=True)

    class Logger:
        finalized = []

        def log_metrics(self, metrics, step=None):
            raise AssertionError("a lost cell logged a metric")

        def finalize(self, status="success"):
            self.finalized.append(status)

    logger = retry.wrap_logger(Logger())
    with pytest.raises(CellLost):
        logger.log_metrics({"eval/fvd": 1.0}, step=1)
    with pytest.raises(CellLost):
        retry.callback().on_save_checkpoint(None, None, {})
    logger.finalize("failed")
    assert Logger.finalized == []  # the retry's MLflow run keeps its status
