"""One writer per cell (sorabench/sweep/lease.py): a worker stalled past grace_period loses its cell to the retry and
leaves it alone when it wakes up; transient failures are retried within one invocation."""

import os
import signal
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.test_sweep import children, start_sweep

STUDY = "conditioning_ablation"


def wait_for(what, timeout, message, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"a worker exited while waiting for {message}: {p.communicate()[0][-3000:]}"
        try:
            if what():
                return
        except Exception:  # the study not created yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {message}")


def test_a_stalled_worker_leaves_its_taken_over_cell_alone(tmp_path):
    """Two workers, one cell each; worker 2 SIGSTOPped mid-trial (after a checkpoint) until worker 1 failed its
    trial as stale and runs the retry, then continued: worker 2 notices it lost the cell before its next write and
    leaves without a traceback; each cell ends COMPLETE once, with one MLflow child and one eval value per step."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    extra = ["heartbeat_interval=1", "grace_period=3", "report=false", "~sweep.protocol"]  # tiny: no declared budget
    longer = ["trainer.max_steps=200", "trainer.checkpoint_every_n_steps=20"]
    w1 = start_sweep(tmp_path, extra=extra, trial_overrides=longer)
    time.sleep(3)  # w1 queues the cells and trains the shared assets first; w2 then finds them
    w2 = start_sweep(tmp_path, extra=extra, trial_overrides=longer)
    procs = [w1, w2]

    def trials():
        return optuna.load_study(study_name=STUDY, storage=storage).trials

    def running(w):
        return [t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("host", "").endswith(
            f":{w.pid}")]

    try:
        wait_for(lambda: running(w2) and (tmp_path / "train" / running(w2)[0].user_attrs["run_name"] / "checkpoints"
                                          / "last.ckpt").is_file(), 120, "worker 2 mid-trial", procs)
        stale = running(w2)[0]
        os.kill(w2.pid, signal.SIGSTOP)
        cell = stale.user_attrs["cell"]
        wait_for(lambda: [t for t in running(w1) if t.user_attrs.get("cell") == cell], 120,
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
    client, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", STUDY)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    for kid in kids:
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "eval/fvd")]
        assert steps and len(steps) == len(set(steps)), (kid.info.run_name, steps)  # one eval value per step
        value = kid.data.metrics["eval/fvd"]
        trial = next(t for t in final if t.state == TrialState.COMPLETE and t.user_attrs["run_name"].endswith(
            kid.info.run_name))
        assert value == pytest.approx(trial.value)  # MLflow's value is the one Optuna holds
