"""Sweeps that scale: shared assets under concurrent writers, growing studies, distinct search trials,
interrupts, DDP trials. Fast tests here; end-to-end ones are marked slow."""

import threading
import time

import pytest
import torch

import sorabench.latents as latents


def test_concurrent_writers_of_one_latent_cache_all_succeed(tmp_path, monkeypatch):
    """Two sweep workers encoding the same split at once: both must get the cache, neither may crash (a fixed
    `<key>.pt.tmp` made one worker's rename fail with FileNotFoundError)."""
    barrier = threading.Barrier(4)

    def fake_encode(vae, data_cfg, split):
        barrier.wait()  # every writer finishes encoding at the same moment
        return {"mean": torch.zeros(2, 3), "captions": ["a", "b"]}

    monkeypatch.setattr(latents, "encode_split", fake_encode)
    monkeypatch.setattr(latents, "cache_key", lambda *a: "k")
    errors, results = [], []

    def work():
        try:
            results.append(latents.load_or_encode(None, "vae.ckpt", {}, "train", tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and torch.load(latents.cache_path(tmp_path, "k"), weights_only=True)["key"] == "k"
    assert [p.name for p in (tmp_path / "latents").iterdir()] == ["k.pt"]  # no temporary file left behind


# ---- sweeps with a stand-in for training: the scheduling logic alone, in seconds ---------------------------------

import json  # noqa: E402
import math  # noqa: E402

import mlflow  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import sorabench.training.dit_run as dit_run  # noqa: E402
from sorabench.config import ConfigError, compose_config  # noqa: E402
from sorabench.sweep.run import run_sweep  # noqa: E402
from tests.conftest import replace_training  # noqa: E402


def sweep_cfg(tmp_path, *overrides, mlflow_on=False):
    return compose_config("sweep", [f"outputs={tmp_path}", "workers=1", "report=false", "heartbeat_interval=1",
                                    f"mlflow.enabled={str(mlflow_on).lower()}", *overrides], command="sweep")


class FakeTrain:
    """Stands in for `training.dit_run.train`: records the cells it is asked for, opens the MLflow child run the
    way the real one does (run id file in the run directory), and fails or is interrupted where told to."""

    def __init__(self, fail=None, fvd=1.0):
        self.calls, self.fail, self.fvd = [], dict(fail or {}), fvd

    def __call__(self, cfg, parent_run_id=None, callbacks=(), tags=None, trial=None, guard=None):
        cell = (str(cfg.conditioning.name), int(cfg.seed))
        self.calls.append(cell)
        if cfg.mlflow.enabled:
            from sorabench.tracking import RUN_ID_FILE

            run_dir = dit_run.Path(cfg.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
            if not (run_dir / RUN_ID_FILE).is_file():
                exp = client.get_experiment_by_name(cfg.mlflow.experiment)
                run = client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": parent_run_id,
                                                                 "mlflow.runName": cfg.name, **(tags or {}),
                                                                 # train's own tag (training/dit_run.py)
                                                                 "sorabench.strategy": str(cfg.conditioning.name)})
                (run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": run.info.run_id}))
            run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
            client.set_terminated(run_id, "FINISHED")  # what Lightning's logger does when fit ends
        if cell in self.fail:
            raise self.fail.pop(cell)  # once: a rerun succeeds
        return {"run_id": None, "metrics": {"eval/fvd": self.fvd * float(cfg.optim.lr)}}


@pytest.fixture
def fake_train(monkeypatch):
    return replace_training(monkeypatch, FakeTrain())


def cells(cfg):
    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
    return study, sorted((t.user_attrs["cell"]["conditioning"], t.user_attrs["cell"]["seed"]) for t in study.trials
                         if t.state == TrialState.COMPLETE)


def test_extending_a_grid_runs_exactly_the_new_cells(tmp_path, fake_train):
    two = "sweep.params.conditioning.choices=[adaln_zero,in_context]"
    assert run_sweep(sweep_cfg(tmp_path, two, "sweep.seeds=[0]")) == 0
    assert sorted(fake_train.calls) == [("adaln_zero", 0), ("in_context", 0)]
    fake_train.calls.clear()
    assert run_sweep(sweep_cfg(tmp_path, two, "sweep.seeds=[0,1]")) == 0  # more seeds
    assert sorted(fake_train.calls) == [("adaln_zero", 1), ("in_context", 1)]
    fake_train.calls.clear()
    three = "sweep.params.conditioning.choices=[adaln_zero,in_context,cross_attention]"
    cfg = sweep_cfg(tmp_path, three, "sweep.seeds=[0,1]")  # one more strategy
    assert run_sweep(cfg) == 0
    assert sorted(fake_train.calls) == [("cross_attention", 0), ("cross_attention", 1)]
    study, done = cells(cfg)
    assert len(done) == 6 == len(set(done)) and len(study.trials) == 6  # every cell once, nothing failed
    fake_train.calls.clear()
    assert run_sweep(cfg) == 0 and fake_train.calls == []  # a finished study runs nothing
    # A change that the finished cells cannot honour: one clear error, before any trial.
    with pytest.raises(ConfigError, match=r"sweep.params: study 'conditioning_ablation' was created with"):
        run_sweep(sweep_cfg(tmp_path, three, "+sweep.params.caption_dropout={choices:[0.1]}"))
    assert fake_train.calls == []


def test_search_restarts_propose_distinct_trials_and_stay_reproducible(tmp_path, fake_train):
    runs = []
    for outputs in (tmp_path / "a", tmp_path / "b"):
        for n in (2, 4):  # a restart (a second process on the same study) asks for two more
            cfg = sweep_cfg(outputs, "sweep=lr_search", f"n_trials={n}")
            assert run_sweep(cfg) == 0
        study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
        runs.append([t.params["optim.lr"] for t in study.trials])
    assert len(runs[0]) == 4 and len(set(runs[0])) == 4, runs[0]  # the restart did not repeat trials 0 and 1
    assert runs[0] == runs[1]  # the same sweep, run again from scratch, proposes the same trials


def test_interrupt_during_evaluation_leaves_the_cell_to_the_rerun(tmp_path, fake_train):
    cfg = sweep_cfg(tmp_path, "sweep.params.conditioning.choices=[adaln_zero,in_context]", "sweep.seeds=[0]",
                    mlflow_on=True)
    fake_train.fail = {("in_context", 0): KeyboardInterrupt()}  # Ctrl-C after fit, during evaluation
    with pytest.raises(KeyboardInterrupt):
        # in_context runs first or second; either way the interrupt stops the command
        run_sweep(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.study)
    kids = {r.data.tags["sorabench.strategy"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mlflow.parentRunId")}
    assert kids["in_context"].data.tags["optuna.state"] == "FAIL"  # never counted as a complete run
    assert kids["in_context"].info.status == "FAILED"
    fake_train.calls.clear()
    assert run_sweep(cfg) == 0
    assert ("in_context", 0) in fake_train.calls and len(fake_train.calls) <= 2
    study, done = cells(cfg)
    assert done == [("adaln_zero", 0), ("in_context", 0)]
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(runs) == 2  # the rerun continued the interrupted cell's MLflow run, no duplicate
    assert all(r.data.tags["optuna.state"] == "COMPLETE" and r.info.status == "FINISHED" for r in runs)
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sorabench.role") == "study"]
    assert parent[0].info.status == "FINISHED"  # the parent run ends when the study does


def test_a_failure_outside_the_model_runs_again_on_rerun(tmp_path, fake_train):
    # with no retries left in the invocation (max_retry=0), the rerun of the command runs it again
    cfg = sweep_cfg(tmp_path, "sweep.params.conditioning.choices=[adaln_zero,in_context]", "sweep.seeds=[0]",
                    "max_retry=0")
    fake_train.fail = {("adaln_zero", 0): FileNotFoundError("latents/k.pt.tmp")}  # the shared-cache race
    assert run_sweep(cfg) == 0
    study, done = cells(cfg)
    assert done == [("in_context", 0)]
    assert run_sweep(cfg) == 0
    study, done = cells(cfg)
    assert done == [("adaln_zero", 0), ("in_context", 0)]


def test_a_non_finite_objective_is_final_and_never_complete_in_mlflow(tmp_path, fake_train):
    cfg = sweep_cfg(tmp_path, "sweep.params.conditioning.choices=[adaln_zero]", "sweep.seeds=[0]", mlflow_on=True)
    fake_train.fvd = float("nan")
    assert run_sweep(cfg) == 0
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.study)
    kid = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId"))
    assert kid.data.tags["optuna.state"] == "FAIL" and kid.info.status == "FAILED"
    fake_train.calls.clear()
    assert run_sweep(cfg) == 0 and fake_train.calls == []  # would fail the same way: not rerun


def test_postgres_test_fails_on_ci_without_a_server(monkeypatch):
    from tests.test_sweep import postgres_url

    monkeypatch.setenv("SORABENCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:9/none")
    monkeypatch.setenv("CI", "true")
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as caught:
        postgres_url()
    assert caught.type is pytest.fail.Exception and "127.0.0.1:9" in str(caught.value)  # on CI: fail, not skip
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        postgres_url()


def test_ddp_ranks_draw_different_noise():
    """Case 2: with one seed_everything(seed) in every rank, the global batch had one rank's worth of draws."""
    from types import SimpleNamespace

    from sorabench.training.dit_run import training_callbacks
    from sorabench.training.callbacks import SeedPerRank

    cfg = compose_config("train", ["sample.log_every_n_val=0", "ema.enabled=false"], command="train")
    seeders = [c for c in training_callbacks(cfg, {}) if isinstance(c, SeedPerRank)]
    assert len(seeders) == 1 and seeders[0].seed == cfg.seed

    def draws(rank, world_size=2):
        torch.manual_seed(cfg.seed)  # what seed_everything(cfg.seed) leaves in every rank
        seeders[0].on_train_start(SimpleNamespace(world_size=world_size, global_rank=rank), None)
        return torch.randn(8), torch.rand(8)  # noise and timesteps / caption-dropout draws

    (n0, t0), (n1, t1) = draws(0), draws(1)
    assert not torch.equal(n0, n1) and not torch.equal(t0, t1)
    assert torch.equal(draws(1)[0], n1)  # reproducible per rank
    torch.manual_seed(cfg.seed)
    expected = torch.randn(8)
    assert torch.equal(draws(0, world_size=1)[0], expected)  # one process: unchanged


def test_sweep_status_lists_every_cell(tmp_path, fake_train, capsys):
    from sorabench.cli import main as cli_main

    two = ["sweep.params.conditioning.choices=[adaln_zero,in_context]", "sweep.seeds=[0]"]
    fake_train.fail = {("in_context", 0): OSError("disk full")}
    assert run_sweep(sweep_cfg(tmp_path, *two, "max_retry=0")) == 0  # no retry in the invocation: left for a rerun
    capsys.readouterr()
    assert cli_main(["sweep", "status", f"outputs={tmp_path}", "mlflow.enabled=false", *two,
                     "sweep.seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    for cell in ("adaln_zero-seed0", "in_context-seed0", "adaln_zero-seed1", "in_context-seed1"):
        assert cell in out
    assert "COMPLETE" in out and "FAIL (reruns)" in out and "NOT QUEUED" in out
    assert "1 COMPLETE, 1 FAIL (reruns), 2 NOT QUEUED" in out
    assert cli_main(["sweep", "status", f"outputs={tmp_path}", "study=nope"]) == 2  # one line, exit 2


@pytest.mark.slow
def test_ddp_trials_inside_a_sweep_train_the_same_cell_on_every_rank(tmp_path):
    """Case 1: Lightning's DDP launcher reruns the command line for rank 1; it used to ask Optuna for a trial of its
    own and join rank 0 with a different model. Two CPU processes (gloo), two strategies."""
    import os
    import subprocess
    import sys

    from tests.conftest import TINY
    from tests.test_sweep import children

    overrides = ",".join(json.dumps(o) for o in [*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    cmd = [sys.executable, "-m", "sorabench.cli", "sweep", f"outputs={tmp_path}", "report=false",
           "sweep.params.conditioning.choices=[adaln_zero,cross_attention]", "sweep.seeds=[0]",
           f"overrides=[{overrides}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "DDP expects same model" not in out
    study = optuna.load_study(study_name="conditioning_ablation", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for cell in ("adaln_zero-seed0", "cross_attention-seed0"):
        result = json.loads((tmp_path / "train" / "conditioning_ablation" / cell / "result.json").read_text())
        assert result["world_size"] == 2
    _, parents, kids = children(f"sqlite:///{tmp_path}/mlflow.db", "conditioning_ablation")
    assert len(parents) == 1 and len(kids) == 2  # rank 1 never opened a run of its own
    assert parents[0].info.status == "FINISHED"


def test_a_ctrl_c_swallowed_inside_a_destructor_still_stops_the_worker():
    """Python drops a KeyboardInterrupt raised while a __del__ runs (it prints "Exception ignored in"); the sweep
    must still see that Ctrl-C was pressed and start no further trial."""
    import signal

    from sorabench.sweep.workers import remembered_ctrl_c

    class InterruptedWhileCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__: its exception is dropped

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore SIGINT
    try:
        with remembered_ctrl_c() as interrupted:
            assert not interrupted()
            InterruptedWhileCollected()  # collected at once (refcount 0)
            assert interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on the way out
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_sweep_report_keeps_every_grid_axis_apart():
    """The report after a sweep has one row per grid cell less its seed: a second axis (precision_parity's
    trainer.precision) is a group_by key, never pooled into the strategy's row; a search's continuous parameters and
    a tuned grid's recipe (reported recipe by recipe) are not."""
    from omegaconf import OmegaConf

    from sorabench.commands.sweep import report_rows
    from sorabench.config import CONF_DIR

    def rows(name):
        return report_rows(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sweep" / f"{name}.yaml")))

    assert rows("precision_parity") == ["strategy", "trainer.precision"]
    replicated = {"mode": "grid", "params": {"conditioning": {}, "data.seed": {}, "dit.width": {}},
                  "replicates": ["data.seed"]}
    assert report_rows(replicated) == ["strategy", "dit.width"]  # a replicate axis is pooled like the seeds
    assert rows("conditioning_ablation") == rows("lr_search") == rows("conditioning_ablation_tuned") == ["strategy"]
