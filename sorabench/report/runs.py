"""A study's MLflow runs as a DataFrame: one flat row per run, the study's parent and children apart, each child
labelled by its report row, and the checks that make their numbers comparable (one evaluation protocol).

Every MLflow client call goes through sorabench.tracking; this module only reads what those calls return.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pandas as pd
from omegaconf import OmegaConf

from sorabench import tracking
from sorabench.config import ConfigError, require

COMPLETE = "COMPLETE"
ID_COLUMNS = [
    "run_id", "run_name", "trial", "strategy", "seed", "state", "failure_reason",
    "status", "role", "study", "parent_run_id", "start_time", "end_time",
]
_STATUS_TO_STATE = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "FAIL"}  # without an optuna.state tag


def _to_int(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return pd.NA


def _time(ms) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _state(tags: dict, status: str) -> str:
    state = tags.get("optuna.state")
    if state:  # "COMPLETE", or "TrialState.COMPLETE" from str(TrialState)
        return str(state).rsplit(".", 1)[-1].upper()
    return _STATUS_TO_STATE.get(status, status)


def runs_frame(runs) -> tuple[pd.DataFrame, list[str]]:
    """MLflow `Run`s as one flat row each: ID_COLUMNS, then metrics by their bare key (final values), then
    `params.<key>` and `tags.<key>`. Returns the frame and the metric keys."""
    rows, metrics, params, tags = [], set(), set(), set()
    for run in runs:
        t, p = run.data.tags, run.data.params
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "trial": _to_int(t.get("optuna.trial_number")),
            "strategy": t.get("sorabench.strategy") or p.get("conditioning.name") or "unknown",
            "seed": _to_int(p.get("seed")),
            "state": _state(t, run.info.status),
            "failure_reason": t.get("failure_reason", ""),
            "status": run.info.status,
            "role": t.get("sorabench.role", ""),
            "study": t.get("sorabench.study", ""),
            "parent_run_id": t.get("mlflow.parentRunId", ""),
            "start_time": _time(run.info.start_time),
            "end_time": _time(run.info.end_time),
        }
        row.update({k: v for k, v in run.data.metrics.items() if k not in ID_COLUMNS})
        row.update({f"params.{k}": v for k, v in p.items()})
        row.update({f"tags.{k}": v for k, v in t.items()})
        metrics.update(run.data.metrics)
        params.update(f"params.{k}" for k in p)
        tags.update(f"tags.{k}" for k in t)
        rows.append(row)
    metrics = sorted(metrics - set(ID_COLUMNS))
    frame = pd.DataFrame(rows, columns=ID_COLUMNS + metrics + sorted(params) + sorted(tags))
    frame[["trial", "seed"]] = frame[["trial", "seed"]].astype("Int64")
    return frame, metrics


def select_study_runs(frame: pd.DataFrame, study: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(child runs, parent runs). Parents: runs tagged `sorabench.role=study` (of `study` when given and any is);
    children: their runs via `mlflow.parentRunId`. Without a parent run every other run of the experiment counts."""
    parents = frame[frame.role == "study"]
    if study and (parents.study == study).any():
        parents = parents[parents.study == study]
    if len(parents):
        children = frame[frame.parent_run_id.isin(parents.run_id)]
    else:  # `evaluate ckpt=` runs re-score a run under another protocol: never counted as runs of their own
        children = frame[~frame.role.isin(["study", "evaluation"])]
    return children, parents.sort_values("start_time", na_position="first")


def group_keys(group_by) -> list[str]:
    """`group_by` as a list of keys: `strategy` (the conditioning label, the default) and/or dotted config keys."""
    keys = [group_by] if isinstance(group_by, str) else list(group_by or [])
    require(bool(keys) and all(isinstance(k, str) and k for k in keys), "group_by", group_by,
            "must be a dotted config key (e.g. optim.lr) or a list of them, [strategy,dit.width]")
    return keys


def group_labels(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    """The report row of each run: its strategy and/or the values of config keys (logged as params), so that runs of
    different configurations are never pooled into one row: ["strategy", "optim.lr"] -> 'adaln_zero, optim.lr=0.001'."""
    parts = []
    for key in keys:
        if key == "strategy":
            parts.append(runs["strategy"].astype(str))
            continue
        if f"params.{key}" not in runs:
            logged = ", ".join(sorted(c.removeprefix("params.") for c in runs if c.startswith("params."))) or "none"
            raise ConfigError(f"group_by={key!r}: no run logged this config key; logged: {logged}")
        parts.append(key + "=" + runs[f"params.{key}"].fillna("?").astype(str))
    label = parts[0]
    for part in parts[1:]:
        label = label + ", " + part
    return label


# What makes two runs' numbers comparable: the evaluation protocol each run tags (feature network and its weights,
# clips, frames, guidance, sampler steps, split, ...) and the numeric precision it trained and sampled in.
PROTOCOL_TAG_PREFIX, PROTOCOL_PARAMS = "tags.eval.protocol.", ("params.trainer.precision",)


def check_protocols(runs: pd.DataFrame, keys: list[str], exempt: tuple[str, ...] = (),
                    replicates: tuple[str, ...] = ()) -> str:
    """The hash of the protocol the runs share; a ConfigError naming the first field on which they differ (their
    numbers must not be pooled or ranked together), unless that field is a `group_by` key (then rows differ by it
    on purpose) or `exempt` (a tuned recipe sets its own guidance scale: `cfg`). With `replicates` (data.seed: the
    data drawn again), the real split may differ between replicates, and only as they do: runs of one replicate
    value must share it."""
    columns = sorted(c for c in runs if c.startswith(PROTOCOL_TAG_PREFIX) or c in PROTOCOL_PARAMS)
    if "trainer.precision" in keys:  # the evaluation's precision tag is the run's trainer.precision
        exempt = (*exempt, "precision")
    by_replicate = [f"params.{k}" for k in replicates if f"params.{k}" in runs]
    shared = {}
    for col in columns:
        values = sorted(set(runs[col].dropna().astype(str)))
        field = col.removeprefix(PROTOCOL_TAG_PREFIX).removeprefix("params.")
        if field == "real_split" and by_replicate and len(values) > 1:
            within = runs.groupby(by_replicate, dropna=False)[col].nunique()
            if (within <= 1).all():  # the split's data differs exactly as the replicates do: pooled on purpose
                shared[field] = values
                continue
        if len(values) > 1 and col.removeprefix("params.") not in keys and field not in exempt:
            counts = ", ".join(f"{v!r} ({int((runs[col].astype(str) == v).sum())} runs)" for v in values[:4])
            raise ConfigError(f"eval protocol {field}: the runs were evaluated differently ({counts}); their numbers "
                              "cannot be pooled or ranked together: report each protocol on its own (experiment=, or "
                              f"group_by=[strategy,{field}] for a logged config key)")
        shared[field] = values
    return hashlib.sha256(repr(sorted(shared.items())).encode()).hexdigest()[:12] if shared else "none logged"


def replicate_labels(runs: pd.DataFrame, replicates: tuple[str, ...] = ()) -> pd.Series:
    """Each run's replicate within its report row: its seed ('seed 0'), and the values of the sweep's `replicates`
    axes ('seed 0, data.seed 1'): the per-seed tables' columns."""
    label = "seed " + runs["seed"].astype(str) if "seed" in runs else pd.Series("run", index=runs.index)
    for key in replicates:
        if f"params.{key}" in runs:
            label = label + f", {key} " + runs[f"params.{key}"].fillna("?").astype(str)
    return label


def sweep_config(parents: pd.DataFrame) -> dict:
    """The sweep YAML the study's parent run records (tag `sweep_yaml`); {} when there is none or it is cut off."""
    if parents.empty or "tags.sweep_yaml" not in parents or not isinstance(parents["tags.sweep_yaml"].iloc[-1], str):
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.create(parents["tags.sweep_yaml"].iloc[-1]))
    except Exception:  # noqa: BLE001 - a cut-off tag (MLflow keeps 5000 characters): nothing declared
        return {}


def sweep_objectives(parents: pd.DataFrame) -> list[tuple[str, str]]:
    """The (metric, direction) objectives of the study, from the sweep config its parent run records."""
    objectives = sweep_config(parents).get("objectives") or []
    return [(str(o["metric"]), str(o["direction"])) for o in objectives if isinstance(o, dict)]


def declared_protocol(parents: pd.DataFrame) -> dict:
    """The study's pre-registered protocol (`protocol:` of its sweep YAML, recorded on the parent run): alpha and the
    equivalence margin of each tested metric. {} when none was declared."""
    return dict(sweep_config(parents).get("protocol") or {})


def parse_margins(value, key: str = "margins", positive: bool = True) -> dict[str, float]:
    """Equivalence margins as {metric: margin > 0}: a mapping (YAML), or a list of "metric:margin" strings (what a
    command line can pass: Hydra's dict keys cannot hold the / of a metric name)."""
    if value is None:
        return {}
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        pairs = [str(v).rsplit(":", 1) for v in value]
        require(all(len(p) == 2 for p in pairs), key, value, 'must be a list of "metric:margin" strings')
        value = dict(pairs)
    require(isinstance(value, dict), key, value, 'must map metrics to margins, or list "metric:margin" strings')
    out = {}
    for metric, margin in value.items():
        try:
            out[str(metric)] = float(margin)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{metric}={margin!r}: must be a number") from None
        require(not positive or out[str(metric)] > 0, f"{key}.{metric}", margin, "a margin must be > 0")
    return out


# ---------------------------------------------------------------------------------------------- one study


def find_experiment(client, name: str | None, asked: str, uri: str) -> str:
    """The id of the active MLflow experiment `name`; a ConfigError listing the store's experiments otherwise.
    `asked` is the setting that named it, for the message (`study` or `experiment`)."""
    def existing() -> str:
        return ", ".join(sorted(tracking.experiment_names(client))) or "none"

    if name is None:
        raise ConfigError(f"study=None: set study=<name> or experiment=<name>; experiments in {uri}: {existing()}")
    experiment_id = tracking.active_experiment_id(client, name)
    if experiment_id is None:
        raise ConfigError(f"{asked}={name!r}: no such MLflow experiment in {uri}; existing experiments: {existing()}")
    return experiment_id


@dataclass
class Study:
    """The runs one report reads: the study's parent run(s) and its children, each child labelled by its report row
    in the column `by` (the strategy itself by default; the label of the `group_by` keys in a column of its own,
    `group`, otherwise, so that `strategy` keeps each run's conditioning)."""

    experiment: str
    name: str | None  # the study; None: every run of the experiment
    children: pd.DataFrame  # every child run, by trial, with `group` (the row label) added
    parents: pd.DataFrame
    metrics: list[str]  # every metric key any run of the experiment logged
    keys: list[str]  # group_by
    protocol_hash: str

    @property
    def by(self) -> str:
        return "strategy" if self.keys == ["strategy"] else "group"

    @property
    def row(self) -> str:
        """What one report row is, in words: `strategy`, `strategy × dit.width`."""
        return " × ".join(self.keys)

    @property
    def complete(self) -> pd.DataFrame:
        return self.children[self.children.state == COMPLETE]

    @property
    def excluded(self) -> pd.DataFrame:
        return self.children[self.children.state != COMPLETE]

    @property
    def parent_id(self) -> str | None:
        return self.parents.run_id.iloc[-1] if len(self.parents) else None


def load_study(runs, experiment: str, study: str | None, keys: list[str], asked: str) -> Study:
    """The `Study` in an experiment's MLflow runs; a ConfigError when their protocols differ or none completed."""
    frame, metrics = runs_frame(runs)
    children, parents = select_study_runs(frame, study)
    complete = children[children.state == COMPLETE]
    tuned = "tags.sorabench.recipe" in complete and (complete["tags.sorabench.recipe"] == "tuned").any()
    replicates = tuple(k for k in sweep_config(parents).get("replicates") or [] if k not in keys)
    groups = group_labels(children, keys)  # a group_by key no run logged (a typo) is named before any protocol check
    protocol_hash = check_protocols(complete, keys, exempt=("cfg",) if tuned else (), replicates=replicates)
    children = children.sort_values(["trial", "start_time"], na_position="last", kind="stable")
    children = children.assign(group=groups, replicate=replicate_labels(children, replicates))  # aligned by index
    out = Study(experiment, study, children, parents, metrics, keys, protocol_hash)
    if out.complete.empty:
        detail = ", ".join(f"{n} {s}" for s, n in out.excluded.state.value_counts().items()) or "none"
        raise ConfigError(f"{asked}={experiment!r}: no completed runs in experiment {experiment!r} "
                          f"(child runs: {detail})")
    return out


def fetch_histories(client, runs: pd.DataFrame, metrics, by: str = "strategy") -> dict[str, pd.DataFrame]:
    """{metric: DataFrame(by, run_id, step, timestamp, value)}: every logged point of the runs' metric histories."""
    out = {}
    for m in metrics:
        rows = [
            (label, run_id, point.step, point.timestamp, point.value)
            for run_id, label, value in zip(runs.run_id, runs[by], runs[m])
            if pd.notna(value)
            for point in tracking.metric_history(client, run_id, m)
        ]
        if rows:
            out[m] = pd.DataFrame(rows, columns=[by, "run_id", "step", "timestamp", "value"])
    return out


# Logged on the study's parent run per row (`summary/<row>/<metric>`, the mean over seeds), beside the headline.
SUMMARY_METRICS = ["eval/acc_all", "eval/acc_seen", "eval/acc_unseen", "eval/bind_all", "eval/bind_twins", "eval/fvd",
                   "eval/fid", "val/loss"]


def summary_metrics(summary: pd.DataFrame, metrics: list[str]) -> dict[str, float]:
    """The report's per-row means as parent-run metrics, `summary/<row>/<metric>`: its page compares the rows."""
    safe = {row: re.sub(r"[^\w\-. /]+", "_", str(row)) for row in summary.index}  # MLflow's allowed key characters
    return {f"summary/{safe[row]}/{m}": float(summary.at[row, f"{m}_mean"])
            for m in dict.fromkeys(metrics) if f"{m}_mean" in summary
            for row in summary.index if pd.notna(summary.at[row, f"{m}_mean"])}
