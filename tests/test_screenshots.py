"""The README's "Comparing runs" pictures, checked as a browser shows them: from the address a sweep prints, MLflow's
runs table names each child by strategy and seed and shows the objective; optuna-dashboard shows each trial's cell.
Needs Debian's chromium and `pip install -e '.[screenshots]'`; skipped without them."""

import importlib.util
import shutil

import pytest
from omegaconf import open_dict

from sorabench.config import compose_config
from sorabench.sweep.run import run_sweep
from tests.conftest import TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None or shutil.which("optuna-dashboard") is None
                       and importlib.util.find_spec("optuna_dashboard") is None,
                       reason="pip install -e '.[screenshots]'"),
]


def test_a_study_reads_at_a_glance_in_the_browser(tmp_path):
    from sorabench.devtools.screenshots import main as screenshots

    cfg = compose_config("sweep", [f"outputs={tmp_path}", "workers=1", "report=false", "sweep.seeds=[0]",
                                   "sweep.params.conditioning.choices=[adaln_zero,in_context]"], command="sweep")
    with open_dict(cfg):
        cfg.overrides = TINY
    assert run_sweep(cfg) == 0
    assert screenshots(["--outputs", str(tmp_path), "--out", str(tmp_path / "img")]) == 0
    runs = (tmp_path / "img" / "mlflow_runs.txt").read_text()
    assert "adaln_zero-seed0" in runs and "in_context-seed0" in runs  # no cut-off `conditioning_ab...`
    assert "eval/fvd" in runs and "eval/acc_all" in runs and "Sort: eval/fvd" in runs  # without adding columns
    assert "Group by: sorabench.strategy" in (tmp_path / "img" / "mlflow_by_strategy.txt").read_text()
    trials = (tmp_path / "img" / "optuna_dashboard.txt").read_text()
    assert "conditioning adaln_zero" in trials or "conditioning in_context" in trials
    for name in ("mlflow_runs", "mlflow_by_strategy", "mlflow_samples", "optuna_dashboard", "optuna_history"):
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 10_000, name
