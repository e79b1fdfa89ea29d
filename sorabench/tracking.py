"""MLflow conventions: where runs go, how a resumed run continues the same MLflow run, what every run logs.

The embedded default store is `sqlite:///<outputs>/mlflow.db` (MLflow 3 refuses the old `./mlruns` file store);
an `http(s)://` URI of an `mlflow server` works the same and is checked for reachability up front.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from sorabench.config import ConfigError, flatten, to_container
from sorabench.files import atomic_write_text, naming_full_disk

RUN_ID_FILE = "mlflow_run.json"
# MLflow 3's UI opens an experiment by its kind tag; untagged, sorabench's open in the GenAI view (traces, sessions).
# "custom_model_development" ("Machine learning" in the UI) opens the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


# MLflow 3.17's UI takes the view from the address, not from that tag: `workflowType=machine_learning` opens the runs
# table. `viewStateShareKey=<key>` applies the view state stored in the experiment tag `mlflow.sharedViewState.<key>`
# (what the UI's "Share" button writes): the columns, sort order and expanded rows a reader sees first.
SHARED_VIEW_TAG, SHARED_VIEW_KEY = "mlflow.sharedViewState.", "sorabench"
NAME_TAG = "sorabench.name"  # a run's `name` (its run directory under outputs/), unique where run names are short
PRECISION_TAG = "sorabench.precision"  # what the run computed in (trainer.precision after `auto` was resolved)


def tag_experiment_kind(client, experiment_id: str):
    """Mark an experiment sorabench writes to as model training (every run does it: older experiments get it too)."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def share_runs_view(client, experiment_id: str, metrics: list[str], params: list[str] = (),
                    order_by: str | None = None, ascending: bool = True, group_by_tag: str | None = None,
                    key: str = SHARED_VIEW_KEY):
    """Store a runs-table view of an experiment (opened by `experiment_url(..., view=key)`, listed by name in the
    UI's "Views" menu): these metric and param columns beside the run names, sorted by `order_by`; with
    `group_by_tag`, one row per value of that run tag holding the mean of its runs."""
    state = {"selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params]}
    if order_by:  # sorted by a metric, the UI lists a parent's children as rows of their own
        state.update(orderByKey=f"metrics.`{order_by}`", orderByAsc=ascending)
    if group_by_tag:  # the UI's "Group by" as it stores it: <mode>.<aggregate>.<key>
        state["groupBy"] = f"tag.average.{group_by_tag}"
    # MLflow 3.17's envelope of a saved view; the state inside is a JSON string (the UI may also gzip it)
    now = int(time.time() * 1000)
    envelope = {"name": key, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(envelope))


def ui_base(tracking_uri: str) -> str:
    """Where a user opens the MLflow UI of this store: the server itself, or `mlflow ui`'s default address."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def experiment_url(tracking_uri: str, experiment_id: str, view: str | None = None) -> str:
    """The address of one experiment's runs table (not MLflow 3's GenAI overview), in a stored view if given."""
    url = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def ui_hint(tracking_uri: str) -> str:
    """How to start the UI for this store (nothing to start for a tracking server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then open "


def check_tracking_uri(uri: str, timeout: float = 3.0):
    """Fail fast, naming the URI, if a tracking server cannot be reached (instead of MLflow's long retries)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" or (parsed.scheme == "" and uri):
        raise ConfigError(f"mlflow.tracking_uri={uri!r}: MLflow 3 refuses file stores; use sqlite:///path/mlflow.db")
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as e:
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: cannot reach the tracking server ({e})") from e
    elif parsed.scheme.startswith("sqlite"):
        db = Path(uri.split("///", 1)[-1])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: cannot create its folder {db.parent} ({e.strerror})") from e
        # Several workers sharing one sqlite file would race to create MLflow's tables: create them under a lock.
        import fcntl

        import mlflow

        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def process_rank() -> int:
    """This process's global rank as Lightning's launchers set it (0 outside distributed runs)."""
    import os

    node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", node * 1000 + local if node else local))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("sorabench", "torch", "lightning", "torchmetrics", "mlflow", "optuna", "hydra-core"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_logger(cfg: DictConfig, tags: dict | None = None, parent_run_id: str | None = None):
    """An MLFlowLogger for this run, or None when `mlflow.enabled=false`.

    The run id is stored in the run directory, so running the same command again (a resume after a crash)
    continues the same MLflow run and its metric steps instead of opening a new one.
    """
    if not cfg.mlflow.enabled or process_rank() > 0:
        return None  # under DDP the launcher reruns the command per process: only the first one tracks
    from lightning.pytorch.loggers import MLFlowLogger

    check_tracking_uri(cfg.mlflow.tracking_uri)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    recorded = read_run_id(run_dir)
    fresh = recorded is None
    run_id = None if fresh else recorded["run_id"]
    all_tags = {"command": cfg.command, "git_commit": git_commit(), NAME_TAG: str(cfg.name), **(tags or {})}
    if "trainer" in cfg:  # resolved by the command before it opens the run (training/trainer.py: pin_precision)
        all_tags[PRECISION_TAG] = str(cfg.trainer.precision)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:  # killed between creating the run and writing id_file: continue that run, not a twin
            run_id = orphan_child_run(cfg, parent_run_id)
    logger = MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=str(cfg.mlflow.get("run_name") or cfg.name),  # the name in the UI; a sweep's child: its cell (`adaln_zero-seed0`)
        tracking_uri=cfg.mlflow.tracking_uri,
        tags=all_tags,
        run_id=run_id,
        artifact_location=f"{cfg.mlflow.artifact_location}/{cfg.mlflow.experiment}",
    )
    if fresh:  # logger.run_id creates the run: record it before anything else can be interrupted
        atomic_write_text(id_file, json.dumps({"run_id": logger.run_id, "experiment": cfg.mlflow.experiment}))
        log_config(logger, cfg)
    tag_experiment_kind(logger.experiment, logger.experiment_id)
    return logger


def read_run_id(run_dir: str | Path) -> dict | None:
    """The run directory's mlflow_run.json ({run_id, experiment}), or None if there is none. The file is written
    atomically, but one torn by an older version or a broken disk must not block every resume: it is reported in
    one line and treated as absent (a sweep's child is then found again by name: `orphan_child_run`)."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
        if isinstance(recorded, dict) and isinstance(recorded.get("run_id"), str):
            return recorded
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    warnings.warn(f"{path}: unreadable (torn write?); ignored, the run is looked up again or started anew",
                  stacklevel=2)
    return None


def orphan_child_run(cfg: DictConfig, parent_run_id: str) -> str | None:
    """A child of `parent_run_id` of this run's `name` that no run directory claims, or None: its worker was
    killed between creating it and writing mlflow_run.json, so it was never terminated (still RUNNING)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    name = str(cfg.name).replace("'", "\\'")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{NAME_TAG}` = '{name}'"
        " and attributes.status = 'RUNNING'",
    )
    return runs[0].info.run_id if runs else None


def log_config(logger, cfg: DictConfig):
    """The full resolved config flattened to params, plus the YAML as an artifact."""
    params = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(to_container(cfg)).items()}
    logger.log_hyperparams(params)
    path = Path(cfg.run_dir) / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    with naming_full_disk(path, "uploading"):
        logger.experiment.log_artifact(logger.run_id, str(path))
    logger.experiment.set_tag(logger.run_id, "package_versions", json.dumps(package_versions()))


def log_artifact(logger, path: str | Path, artifact_path: str | None = None):
    """Log a file to the run behind a Lightning logger; a no-op without an MLflow logger."""
    from lightning.pytorch.loggers import MLFlowLogger

    if isinstance(logger, MLFlowLogger):
        with naming_full_disk(path, "uploading"):  # a full artifact store: one line naming the file
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)


def quiet_libraries():
    """Keep the terminal for sorabench's own output: no telemetry (these machines are offline), no tips, and no
    warnings that a user cannot act on."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its own level on import ("Creating tables")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for message in (
        ".*LeafSpec.*",  # a Lightning-internal deprecation
        ".*module\\(s\\) in eval mode.*",  # frozen feature networks and text encoders are eval on purpose
        ".*will save all extracted features in buffer.*",  # KID: bounded by metrics.n_real / n_samples
        ".*smaller than the logging interval.*",
        ".*does not have many workers.*",  # in-memory datasets need no loader workers
    ):
        warnings.filterwarnings("ignore", message=message)


# ---- evaluation ----


def set_run_tags(logger, tags: dict[str, str]):
    """Tag the run behind a Lightning MLflow logger (an evaluation's protocol fields), one tag at a time in order."""
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)


# ---- sweeps ----
# A sweep's study is one MLflow experiment named after it: a parent run for the study, a child run per trial (made
# by `train`, under `sorabench.name` = `<study>/<cell>`), runs-table views shared through experiment tags.


def ensure_parent_run(cfg: DictConfig) -> str:
    """The parent run of the study `cfg.study` (the one tagged `sorabench.role=study`, or a new one), in the
    experiment of that name (made if missing)."""
    import mlflow

    check_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.study)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(cfg.study, artifact_location=f"{cfg.mlflow.artifact_location}/{cfg.study}")
    )
    tag_experiment_kind(client, experiment_id)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`sorabench.role` = 'study' and tags.`sorabench.study` = '{cfg.study}'"
    )
    if existing:
        return existing[0].info.run_id
    tags = {
        "sorabench.role": "study",
        "sorabench.study": cfg.study,
        "mlflow.runName": f"study-{cfg.study}",
        "git_commit": git_commit(),
        "package_versions": str(package_versions()),
        "sweep_yaml": OmegaConf.to_yaml(cfg.sweep)[:5000],
    }
    return client.create_run(experiment_id, tags=tags).info.run_id


def share_study_view(cfg: DictConfig, parent_run_id: str, metrics: list[str], params: list[str] = (),
                     ascending: bool = True) -> dict[str, str]:
    """Store two runs-table views of the study's experiment and return their addresses: `runs`, every run with
    `metrics` and `params` as columns, sorted by the first metric; and `by_strategy`, one row per conditioning
    strategy (the run tag `sorabench.strategy`) holding the mean over its runs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    views = {"runs": SHARED_VIEW_KEY, "by_strategy": f"{SHARED_VIEW_KEY}-by-strategy"}
    share_runs_view(client, experiment_id, metrics, params, order_by=metrics[0], ascending=ascending)
    share_runs_view(client, experiment_id, metrics, order_by=metrics[0], ascending=ascending,
                    group_by_tag="sorabench.strategy", key=views["by_strategy"])
    return {name: experiment_url(cfg.mlflow.tracking_uri, experiment_id, view=key) for name, key in views.items()}


def set_parent_status(cfg: DictConfig, run_id: str | None, status: str):
    """The study's parent run is RUNNING while workers have trials to run, FINISHED when the study is done."""
    if run_id is None:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def set_parent_tags(cfg: DictConfig, run_id: str | None, tags: dict[str, str]):
    """Tags of the study's parent run that the sweep knows only once its study is open (its protocol hash, picks)."""
    if run_id is None or not tags:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:5000])


def mark_run(tcfg: DictConfig, state: str, reason: str | None):
    """Record a trial's Optuna state (and a failure reason) on its MLflow child run, and end that run."""
    recorded = read_run_id(tcfg.run_dir) if tcfg.mlflow.enabled else None
    if recorded is None:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tcfg.mlflow.tracking_uri)
    run_id = recorded["run_id"]
    client.set_tag(run_id, "optuna.state", state)
    client.set_tag(run_id, "failure_reason", (reason or "")[:5000])  # a resumed, completed run clears the old one
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[state]
    client.set_terminated(run_id, status=status)


def mlflow_children(cfg: DictConfig) -> dict[str, dict]:
    """The study's child runs by `sorabench.name` (`<study>/<cell>`): status and metrics ({} without MLflow)."""
    if not cfg.mlflow.enabled:
        return {}
    import mlflow

    check_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.study)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''",
                              max_results=10000)
    # runs made before NAME_TAG existed were named so in MLflow too
    return {r.data.tags.get(NAME_TAG) or r.data.tags.get("mlflow.runName", r.info.run_name):
            {"status": r.info.status, **r.data.metrics} for r in runs}


# ---- report ----
# `sorabench report` reads one experiment's runs and metric histories, and logs its files and per-row means to the
# study's parent run.


def open_store(uri: str):
    """A client of an existing store: a report reads runs, so a missing sqlite file is an error, not a new store."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite"):
        db = Path(uri.split("///", 1)[-1])
        if not db.is_file():
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: no MLflow database at {db} (run a sweep first, "
                              "or point outputs= / mlflow.tracking_uri at the study's store)")
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_names(client) -> list[str]:
    return [e.name for e in client.search_experiments()]


def active_experiment_id(client, name: str) -> str | None:
    """The id of the experiment `name`, None if there is none or it was deleted."""
    experiment = client.get_experiment_by_name(name)
    return None if experiment is None or experiment.lifecycle_stage != "active" else experiment.experiment_id


def search_all_runs(client, experiment_id: str) -> list:
    """Every run of an experiment, page by page."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def metric_history(client, run_id: str, metric: str) -> list:
    """Every logged point (step, timestamp, value) of one metric of one run."""
    return client.get_metric_history(run_id, metric)


def log_files(client, run_id: str, paths: list[Path], artifact_path: str):
    for path in paths:
        with naming_full_disk(path, "uploading"):
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_metric_values(client, run_id: str, values: dict[str, float]):
    """Log {key: value} on a run at step 0, now, in batches of MLflow's limit of 1000."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in values.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
