"""Local sweep workers (`workers=k`): several trials at once on one machine, each matching a trial run alone."""

import mlflow
import pytest
from omegaconf import open_dict

from sorabench.config import ConfigError, compose_config, to_container
from sorabench.sweep.run import run_sweep
from sorabench.sweep.space import trial_config
from sorabench.sweep.workers import worker_threads
from sorabench.training.dit_run import train
from tests.conftest import TINY

TWO_CELLS = ["sweep.params.conditioning.choices=[adaln_zero,in_context]", "sweep.seeds=[0]"]


def test_worker_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cfg = compose_config("sweep", ["workers=2"], command="sweep")
    assert worker_threads(cfg) == 4
    assert worker_threads(compose_config("sweep", ["workers=3", "threads=1"], command="sweep")) == 1
    assert worker_threads(compose_config("sweep", ["workers=16"], command="sweep")) == 1
    with pytest.raises(ConfigError, match="workers"):
        worker_threads(compose_config("sweep", ["workers=0"], command="sweep"))


def loss_curve(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    history = mlflow.MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


@pytest.mark.slow
def test_two_local_workers_run_every_cell_once_and_match_a_trial_run_alone(tmp_path):
    # Two spawned worker processes (one thread each) share a 2-cell grid; each cell's loss curve equals
    # the same trial's config trained alone in this process.
    cfg = compose_config("sweep", [f"outputs={tmp_path}", *TWO_CELLS, "workers=2", "threads=1", "report=false"],
                         command="sweep")
    with open_dict(cfg):
        cfg.overrides = TINY
    assert run_sweep(cfg) == 0
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.study)
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(k.data.tags["sorabench.strategy"] for k in kids) == ["adaln_zero", "in_context"]
    assert all(k.data.tags["optuna.state"] == "COMPLETE" for k in kids)

    for kid in kids:
        strategy = kid.data.tags["sorabench.strategy"]
        solo = trial_config(cfg, to_container(cfg.sweep), {"conditioning": strategy, "seed": 0}, f"solo/{strategy}")
        result = train(solo)
        ours, alone = loss_curve(cfg.mlflow.tracking_uri, kid.info.run_id), loss_curve(
            cfg.mlflow.tracking_uri, result["run_id"])
        assert [s for s, _ in ours] == [s for s, _ in alone] and len(ours) >= 3
        assert [v for _, v in ours] == pytest.approx([v for _, v in alone], rel=1e-5, abs=1e-6)
