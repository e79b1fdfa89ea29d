"""`sorabench sweep [key=value ...]` runs an Optuna study of DiT trials (grid ablation or TPE search), then reports on
it (`report=true`); `sorabench sweep status` prints the table of every cell of one. The library is `sorabench/sweep/`."""

from __future__ import annotations

from omegaconf import DictConfig

from sorabench.config import compose_config
from sorabench.sweep.run import run_sweep
from sorabench.sweep.status import status


def main(cfg: DictConfig, subcommand: str | None = None) -> int:
    if subcommand == "status":
        return status(cfg)
    return run_sweep(cfg, report=report_study)


def report_rows(sweep: dict) -> list[str]:
    """The report's group_by for a sweep: the strategy, and every other axis of a grid but its `replicates` (pooled
    like seeds, e.g. data.seed: another draw of the held-out compositions); a search's parameters are continuous:
    one row per trial would compare nothing."""
    keys = ["strategy"]
    if sweep["mode"] == "grid":
        pooled = ("conditioning", "recipe", *(sweep.get("replicates") or []))
        keys += [k for k in sweep.get("params") or {} if k not in pooled]
    return keys


def report_study(cfg: DictConfig, sweep: dict) -> None:
    """`sorabench report` on the study just run, on its first objective, into `<outputs>/report/<study>/`: one row per
    grid cell less its seed (strategy, and any other axis of a grid, e.g. trainer.precision), never pooling them;
    the recipe axis of a tuned grid is reported recipe by recipe (report/recipes.py)."""
    from sorabench.commands.report import main as report_main

    keys = report_rows(sweep)
    report_main(compose_config("report", [f"outputs={cfg.outputs}", f"study={cfg.study}", f"name={cfg.study}",
                                          f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
                                          f"group_by=[{','.join(keys)}]",
                                          f"metric={sweep['objectives'][0]['metric']}"], command="report"))
