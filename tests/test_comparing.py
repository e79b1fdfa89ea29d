"""What a researcher comparing runs sees: short child names, the study's runs-table view and its address, grid cells
as Optuna params with named objectives (optuna-dashboard), `sweep status` at any width, previews sized for eyes."""

import io
import json

import torch
from rich.console import Console

from sorabench.config import compose_config
from sorabench.data.video_io import probe, view_scale, write_gif, write_video
from sorabench.sweep.space import record_cell_params, trial_config, trial_values, view_columns
from sorabench.sweep.status import print_table
from sorabench.sweep.study import create_study, make_storage, schedule
from sorabench.tracking import SHARED_VIEW_KEY, SHARED_VIEW_TAG, experiment_url, share_study_view

COLUMNS = ("cell", "trial", "state", "host", "objective", "mlflow")
ROW = ["cross_attention-seed2", "5", "COMPLETE", "worker-host-with-a-long-name:123456", "312.4567",
       "FINISHED eval/fvd=312.5"]


def sweep_cfg(tmp_path, *overrides):
    return compose_config("sweep", [f"outputs={tmp_path}", "sweep.seeds=[0,1]", *overrides], command="sweep")


def test_status_table_is_whole_in_a_pipe_and_in_a_narrow_terminal():
    pipe = io.StringIO()
    print_table("study 'x' (grid) in sqlite:////a/long/path/to/outputs/optuna.db", COLUMNS, [ROW],
                Console(file=pipe, width=80))  # a pipe: rich would squeeze it to 80 columns
    assert all(value in pipe.getvalue() for value in ROW)
    narrow = io.StringIO()
    print_table("t", COLUMNS, [ROW], Console(file=narrow, width=50, force_terminal=True, color_system=None))
    lines = narrow.getvalue().splitlines()
    assert all(len(line) <= 50 for line in lines)
    assert "cell: cross_attention-seed2" in lines and "  host: worker-host-with-a-long-name:123456" in lines
    wide = io.StringIO()
    print_table("t", COLUMNS, [ROW], Console(file=wide, width=200, force_terminal=True, color_system=None))
    assert "┃ cell" in wide.getvalue()  # a terminal that fits it gets the table


def test_child_runs_are_named_after_their_cell_and_keep_their_directory(tmp_path):
    cfg = sweep_cfg(tmp_path)
    sweep = dict(cfg.sweep)
    tcfg = trial_config(cfg, sweep, {"conditioning": "adaln_zero", "seed": 1}, "conditioning_ablation/adaln_zero-seed1")
    assert tcfg.mlflow.run_name == "adaln_zero-seed1"
    assert tcfg.run_dir.endswith("train/conditioning_ablation/adaln_zero-seed1")


def test_grid_cells_are_optuna_params_and_objectives_are_named(tmp_path):
    cfg = sweep_cfg(tmp_path, "mlflow.enabled=false")
    from sorabench.config import to_container

    sweep = to_container(cfg.sweep)
    study = create_study(cfg, sweep, make_storage(cfg))
    assert study.metric_names == ["eval/fvd"]  # optuna-dashboard's axis title
    schedule(study, sweep)
    seen = set()
    for _ in range(6):
        trial = study.ask()
        values = trial_values(trial, sweep)
        record_cell_params(trial, values, sweep)
        assert trial.params == values  # what the dashboard plots, equal to the cell the trial runs
        seen.add((values["conditioning"], values["seed"]))
        study.tell(trial, 1.0)
    assert len(seen) == 6
    # a grid that gains a choice keeps running: its new cells lack the param, nothing fails
    sweep["params"]["conditioning"]["choices"].append("mmdit")
    schedule(study, sweep)
    trial = study.ask()
    values = trial_values(trial, sweep)
    record_cell_params(trial, values, sweep)
    assert values["conditioning"] == "mmdit" and "conditioning" not in trial.params and trial.params["seed"] in (0, 1)


def test_study_opens_on_its_runs_table_with_the_comparison_columns(tmp_path):
    import mlflow

    cfg = sweep_cfg(tmp_path)
    from sorabench.config import to_container

    sweep = to_container(cfg.sweep)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.create_experiment(cfg.study, artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp).info.run_id
    urls = share_study_view(cfg, parent, *view_columns(sweep))
    assert urls["runs"] == f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=" \
                  f"{SHARED_VIEW_KEY}"
    envelope = json.loads(client.get_experiment(exp).tags[SHARED_VIEW_TAG + SHARED_VIEW_KEY])
    assert envelope["name"] == SHARED_VIEW_KEY and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"][:2] == ["metrics.`eval/fvd`", "metrics.`eval/acc_all`"]
    assert state["orderByKey"] == "metrics.`eval/fvd`" and state["orderByAsc"] is True
    grouped = json.loads(json.loads(client.get_experiment(exp).tags[SHARED_VIEW_TAG + SHARED_VIEW_KEY + "-by-strategy"])
                         ["state"])
    assert grouped["groupBy"] == "tag.average.sorabench.strategy" and urls["by_strategy"].endswith("-by-strategy")
    assert experiment_url("http://mlflow.lab:5000/", "7") == \
        "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_previews_are_upscaled_for_viewing(tmp_path):
    assert view_scale(32, 32) == 8 and view_scale(64, 48) == 6 and view_scale(512, 512) == 1
    video = torch.rand(3, 4, 32, 32) * 2 - 1
    s = view_scale(32, 32)
    for path in (write_video(tmp_path / "a.mp4", video, scale=s), write_gif(tmp_path / "a.gif", video, scale=s)):
        meta = probe(path)
        assert (meta["width"], meta["height"]) == (256, 256), path



def test_grid_cells_run_seed_by_seed_so_a_cut_grid_stays_balanced():
    from sorabench.sweep.space import cell_id, grid_cells

    sweep = {"mode": "grid", "params": {"conditioning": {"choices": ["a", "b", "c"]}, "x": {"choices": [1, 2]}},
             "seeds": [5, 6]}
    cells = grid_cells(sweep)
    assert len(cells) == 12 and len({cell_id(c) for c in cells}) == 12
    assert [c["seed"] for c in cells] == [5] * 6 + [6] * 6  # every configuration's first seed comes first
    assert {(c["conditioning"], c["x"]) for c in cells[:6]} == {(a, x) for a in "abc" for x in (1, 2)}
    assert list(cells[0]) == ["conditioning", "x", "seed"] and cell_id(cells[0]) == "a-1-seed5"  # names unchanged
