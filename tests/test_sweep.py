"""Sweeps end to end with tiny trials: grid on SQLite, crash and resume, and two workers on PostgreSQL."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest
from omegaconf import open_dict
from optuna.trial import TrialState

from sorabench.commands.sweep import main as sweep_command
from sorabench.config import ConfigError, compose_config
from sorabench.sweep.run import run_sweep
from sorabench.sweep.space import grid_space, parse_space
from tests.conftest import TINY

pytestmark = pytest.mark.slow

TWO_CELLS = ["sweep.params.conditioning.choices=[adaln_zero,in_context]", "sweep.seeds=[0]"]


def sweep_cli_args(outputs, extra=(), trial_overrides=()):
    overrides = ",".join(json.dumps(o) for o in [*TINY, *trial_overrides])
    return [f"outputs={outputs}", "workers=1", *TWO_CELLS, f"overrides=[{overrides}]", *extra]


@functools.cache
def storage_of(url):
    """One Optuna storage per URL for a test's polling. `optuna.load_study(storage=url)` builds an engine each call,
    and its pooled connection lives until the garbage collector breaks the engine's reference cycle: a test polling
    twice a second held 60+ PostgreSQL connections and CI ran out of them ("too many clients already")."""
    return optuna.storages.RDBStorage(url)


def trials_of(study, url):
    return optuna.load_study(study_name=study, storage=storage_of(url)).trials


def children(tracking_uri, study):
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sorabench.role") == "study"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, kids


def test_search_space_validation():
    with pytest.raises(ConfigError, match="sweep.params.optim.lr"):
        parse_space({"mode": "grid", "params": {"optim.lr": {"low": 1e-4, "high": 1e-3}}})
    with pytest.raises(ConfigError, match="low must be below high"):
        parse_space({"mode": "search", "params": {"optim.lr": {"low": 1e-2, "high": 1e-3}}})
    space = grid_space({"mode": "grid", "params": {"conditioning": {"choices": ["a", "b"]}}, "seeds": [0, 1, 2]})
    assert space == {"conditioning": ["a", "b"], "seed": [0, 1, 2]}


def test_grid_sweep_tracks_parent_and_children_and_reports(tmp_path):
    cfg = compose_config("sweep", [f"outputs={tmp_path}", "workers=1", *TWO_CELLS], command="sweep")
    with open_dict(cfg):
        cfg.overrides = TINY
    assert sweep_command(cfg) == 0  # the command: the sweep, then its report
    client, parents, kids = children(cfg.mlflow.tracking_uri, cfg.study)
    assert len(parents) == 1 and len(kids) == 2
    assert {k.data.tags["sorabench.strategy"] for k in kids} == {"adaln_zero", "in_context"}
    assert {k.info.run_name for k in kids} == {"adaln_zero-seed0", "in_context-seed0"}  # readable in the UI
    for kid in kids:
        assert kid.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert kid.data.tags["optuna.state"] == "COMPLETE" and kid.info.status == "FINISHED"
        assert "eval/fvd" in kid.data.metrics and "eval/acc_all" in kid.data.metrics
        assert "dit.width" in kid.data.params
        assert {a.path for a in client.list_artifacts(kid.info.run_id)} >= {"config.yaml", "samples"}
    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert study.metric_names == ["eval/fvd"]
    assert sorted(t.params["conditioning"] for t in study.trials) == ["adaln_zero", "in_context"]  # the dashboard's
    samples = [a.path for a in client.list_artifacts(kids[0].info.run_id, "samples")]  # every validation's
    gif = next(a.path for a in client.list_artifacts(kids[0].info.run_id, samples[-1]) if a.path.endswith(".gif"))
    from sorabench.data.video_io import probe

    assert probe(client.download_artifacts(kids[0].info.run_id, gif, str(tmp_path / "dl")))["width"] >= 256
    report = tmp_path / "report" / cfg.study / "report.md"  # one report folder per study
    assert report.is_file() and "adaln_zero" in report.read_text()
    # Rerunning a finished sweep runs nothing new.
    assert sweep_command(cfg) == 0
    assert len(optuna.load_study(study_name=cfg.study, storage=cfg.storage).trials) == 2


def start_sweep(outputs, extra=(), trial_overrides=(), **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sorabench.cli", "sweep", *sweep_cli_args(outputs, extra, trial_overrides)]
    # SIGINT back to its default in the child: pytest-xdist's workers ignore it, and an ignored SIGINT is inherited
    # (Python then installs no KeyboardInterrupt handler), so a Ctrl-C test would see no interrupt at all.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def test_killed_sweep_resumes_to_exactly_n_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = start_sweep(tmp_path, extra=["heartbeat_interval=1", "grace_period=3", "report=false"])
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        try:
            trials = trials_of("conditioning_ablation", storage)
        except Exception:
            continue
        if any(t.state == TrialState.RUNNING for t in trials) and any(
            t.state == TrialState.COMPLETE for t in trials
        ):
            os.kill(proc.pid, signal.SIGKILL)  # mid second trial
            killed = True
            break
    proc.wait()
    assert killed, "the sweep finished before it could be killed"
    proc = start_sweep(tmp_path, extra=["heartbeat_interval=1", "grace_period=3", "report=false"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="conditioning_ablation", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    assert sorted(t.user_attrs["cell"]["conditioning"] for t in complete) == ["adaln_zero", "in_context"]
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1  # the killed trial, failed by its stale heartbeat and retried
    _, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", "conditioning_ablation")
    # The retry continued the dead trial's MLflow run: one child per grid cell, none orphaned.
    assert len(parents) == 1 and len(kids) == 2
    assert all(k.info.status == "FINISHED" for k in kids)


def postgres_url():
    url = os.environ.get("SORABENCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
        engine.connect().close()
        engine.dispose()  # no pooled connection left behind for the rest of the session
    except Exception as e:
        reason = f"no PostgreSQL reachable at {url} ({type(e).__name__}); set SORABENCH_TEST_POSTGRES"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}: CI must run the multi-worker tests (CI=true)")  # a skip would hide them
        pytest.skip(reason)
    return url


def test_search_sweep_reports_to_the_pruner_and_stops_at_n_trials(tmp_path):
    cfg = compose_config("sweep", [f"outputs={tmp_path}", "workers=1", "sweep=lr_search", "n_trials=3", "report=false",
                                   "sweep.pruner.n_startup_trials=1"], command="sweep")
    with open_dict(cfg):
        cfg.overrides = [*TINY, "trainer.val_check_interval=2"]
    assert run_sweep(cfg) == 0
    trials = optuna.load_study(study_name="lr_search", storage=cfg.storage).trials
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # val/loss reached Optuna through the callback
    assert len({t.params["optim.lr"] for t in trials}) == 3


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the study may not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_local_workers_die_with_a_sigkilled_sweep(tmp_path):
    """A SIGKILLed sweep takes its spawned local workers with it: orphans would go on training and writing into the
    study; their trials are left as stalled ones that a rerun requeues (the test above)."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = [a if a != "workers=1" else "workers=2" for a in
            sweep_cli_args(tmp_path, ["threads=1", "report=false"], ["trainer.max_steps=2000"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sorabench.cli", "sweep", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def worker_pids():
        trials = trials_of("conditioning_ablation", storage)
        return {int(t.user_attrs["host"].rsplit(":", 1)[-1]) for t in trials if t.state == TrialState.RUNNING}

    try:
        wait_for(lambda: len(worker_pids()) == 2, 300, "both processes inside a trial")
        (worker,) = worker_pids() - {proc.pid}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

        def gone():
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{worker}/stat") as f:  # a zombie awaiting its reaper is gone too
                return f.read().split(")")[-1].split()[0] == "Z"

        wait_for(gone, 20, f"worker {worker} to die with its sweep")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_workers_survive_sigkill_and_ctrl_c_on_postgres(tmp_path):
    """Two workers share one PostgreSQL study (a 2 x 2 grid) and one outputs=: one SIGKILLed and one interrupted
    (Ctrl-C) mid-trial, both restarted. Every cell must end COMPLETE exactly once, with one MLflow child each, the
    parent FINISHED, and a report like that of a sweep never interrupted (tests/soak.py is the longer version)."""
    url = postgres_url()
    study = f"pg-{uuid.uuid4().hex[:8]}"
    extra = [f"storage={url}", f"study={study}", "report=false", "heartbeat_interval=1", "grace_period=4",
             "sweep.seeds=[0,1]"]
    # Trials long enough (seconds, not milliseconds) that both workers are still inside theirs when the signals
    # arrive, however loaded the machine is: with 6-step trials one worker could finish both cells first.
    longer = ["trainer.max_steps=150", "trainer.checkpoint_every_n_steps=25"]
    workers = [start_sweep(tmp_path, extra=extra, trial_overrides=longer) for _ in range(2)]

    def running_hosts():
        trials = trials_of(study, url)
        return {t.user_attrs.get("host", "").rsplit(":", 1)[-1] for t in trials if t.state == TrialState.RUNNING}

    try:
        wait_for(lambda: {str(w.pid) for w in workers} <= running_hosts(), 600, "both workers inside a trial")
        os.kill(workers[0].pid, signal.SIGKILL)
        os.kill(workers[1].pid, signal.SIGINT)  # Ctrl-C
        outs = [w.communicate(timeout=120)[0] for w in workers]
        assert workers[1].returncode == 130, outs[1][-2000:]  # "interrupted; rerun the same command to resume"
        workers = [start_sweep(tmp_path, extra=extra, trial_overrides=longer) for _ in range(2)]
        outs = [w.communicate(timeout=900)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), [o[-2000:] for o in outs]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    trials = trials_of(study, url)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    cells = [(t.user_attrs["cell"]["conditioning"], t.user_attrs["cell"]["seed"]) for t in complete]
    assert len(cells) == 4 == len(set(cells))  # every cell exactly once
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    _, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 4 and len({k.info.run_name for k in kids}) == 4  # no duplicate children
    assert all(k.data.tags["optuna.state"] == "COMPLETE" and k.info.status == "FINISHED" for k in kids)
    from sorabench.commands.report import main as report_main

    rcfg = compose_config("report", [f"outputs={tmp_path}", f"study={study}", f"name={study}"], command="report")
    assert report_main(rcfg) == 0
    import pandas as pd

    summary = pd.read_csv(tmp_path / "report" / study / "summary.csv")
    assert sorted(summary["strategy"]) == ["adaln_zero", "in_context"] and list(summary["n"]) == [2, 2]
    optuna.delete_study(study_name=study, storage=storage_of(url))
