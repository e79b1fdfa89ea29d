"""The guidance axis: evaluation at several classifier-free guidance scales, and the report's view of it."""

import lightning as L
import pytest
import torch

from sorabench.config import ConfigError, compose_config
from sorabench.data.module import build_dataset
from sorabench.data.shapes import ATTRIBUTES
from sorabench.metrics.evaluate import check_guidance_axis, evaluate_module, guidance_key
from sorabench.training.evaluator_module import EvaluatorModule

from tests.conftest import TINY


class StubSampler:
    """Stands in for a DiT: at guidance scale 2 it returns real clips of its prompts, at any other scale pure noise.
    Records (number of prompts, scale) of every sampling call."""

    training = False
    vae = None  # a pipeline without a VAE: no ceiling reference point

    def __init__(self, clips: dict[str, torch.Tensor]):
        self.clips, self.calls = clips, []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def sample_videos(self, captions, steps, guidance_scale, seed, batch_size=64):
        self.calls.append((len(captions), float(guidance_scale)))
        real = torch.stack([self.clips[c] for c in captions])
        if guidance_scale == 2:
            return real
        return torch.rand(real.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def evaluate_cfg(tmp_path, *overrides):
    # An untrained evaluator checkpoint stands in for the trained one: these tests check plumbing, not quality.
    module = EvaluatorModule({k: len(v) for k, v in ATTRIBUTES.items()}, width=8)
    ckpt = tmp_path / "evaluator.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__, "sorabench_kind": "evaluator"}, ckpt)
    tiny = [o for o in TINY if o.startswith(("data.", "metrics."))]
    return compose_config("evaluate", [f"outputs={tmp_path / 'out'}", *tiny, f"metrics.evaluator_checkpoint={ckpt}",
                                       *overrides], command="evaluate")


def stub_for(cfg) -> StubSampler:
    data = dict(cfg.data)
    clips = {}
    for split in ("val", "test"):
        ds = build_dataset(data, split, train=False)
        for i in range(len(ds)):
            clips.setdefault(ds[i]["caption"], ds[i]["video"])
    return StubSampler(clips)


def test_per_scale_metrics_are_logged_beside_the_unchanged_default(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    cfg = evaluate_cfg(tmp_path, "metrics.cfg=4", "metrics.guidance_scales=[1,2,4]", "metrics.guidance_n_samples=8")
    stub = stub_for(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="guidance", tracking_uri=uri)
    m = evaluate_module(stub, cfg, logger)

    # One sampling of all 16 prompts at the default scale; the test axis reuses its first 8 clips at scale 4 and
    # samples 8 at the other scales; the val (selection) prompts are sampled at every scale.
    assert stub.calls == [(16, 4.0), (8, 1.0), (8, 2.0), (8, 1.0), (8, 2.0), (8, 4.0)]
    for prefix in ("eval", "eval_val"):
        for scale in (1, 2, 4):
            for metric in ("fvd", "fid", "kid", "acc_all", "acc_colour", "acc_all_unseen"):
                assert guidance_key(metric, scale, prefix) in m, (prefix, scale, metric)
    assert guidance_key("acc_all", 4) == "eval/cfg4/acc_all"
    # Real clips at scale 2, noise elsewhere: the axis must tell them apart, on both splits.
    for prefix in ("eval", "eval_val"):
        assert m[f"{prefix}/cfg2/fvd"] < m[f"{prefix}/cfg1/fvd"] and m[f"{prefix}/cfg2/fvd"] < m[f"{prefix}/cfg4/fvd"]
    # The unsuffixed metrics are still those of all 16 clips at metrics.cfg (noise here), not of a subset.
    assert m["eval/fvd"] > m["eval/cfg2/fvd"] and "eval/acc_all" in m and "eval/cfg4/chance_all" not in m

    run = MlflowClient(tracking_uri=uri).get_run(logger.run_id)
    assert run.data.metrics["eval/cfg2/fvd"] == pytest.approx(m["eval/cfg2/fvd"])
    assert run.data.metrics["eval_val/cfg1/acc_all"] == pytest.approx(m["eval_val/cfg1/acc_all"])
    assert run.data.tags["eval.protocol.guidance_scales"] == "1,2,4"
    assert run.data.tags["eval.protocol.guidance_select_split"] == "val"
    # every ranked key carries its metric's own direction; the label schema its order (the report reads both)
    tags = run.data.tags
    assert tags["eval.higher_is_better.fvd"] == tags["eval.higher_is_better.kid"] == "False"
    assert tags["eval.higher_is_better.acc_all"] == tags["eval.higher_is_better.acc_shape_unseen"] == "True"
    assert "eval.higher_is_better.kid_std" not in tags and "eval.higher_is_better.chance_all" not in tags
    assert tags["eval.attributes"] == "colour,shape,size,direction,speed"


def test_no_axis_by_default_and_oracle_without_a_selection_split(tmp_path):
    cfg = evaluate_cfg(tmp_path)
    stub = stub_for(cfg)
    m = evaluate_module(stub, cfg)
    assert stub.calls == [(16, 4.0)] and not any("/cfg" in k for k in m)  # the default costs what it did

    cfg = evaluate_cfg(tmp_path, "metrics.guidance_scales=[2,7]", "metrics.guidance_n_samples=4",
                       "metrics.guidance_select_split=null")
    stub = stub_for(cfg)
    m = evaluate_module(stub, cfg)
    assert stub.calls == [(16, 4.0), (4, 2.0), (4, 7.0)] and not any(k.startswith("eval_") for k in m)


@pytest.mark.parametrize("override, key", [
    ("metrics.guidance_scales=[1,-2]", "metrics.guidance_scales"),
    ("metrics.guidance_n_samples=999", "metrics.guidance_n_samples"),
    ("metrics.guidance_select_split=test", "metrics.guidance_select_split"),
])
def test_bad_guidance_axis_is_a_clear_error(tmp_path, override, key):
    cfg = compose_config("evaluate", [f"outputs={tmp_path}", "metrics.guidance_scales=[1,4]", override],
                         command="evaluate")
    with pytest.raises(ConfigError, match=key):
        check_guidance_axis(cfg.metrics)


# ------------------------------------------------------------------------------------------------------ report

SCALES = (1.0, 2.0, 4.0, 7.0)
# acc_all on the test prompts peaks at 4 for a, at 7 for b; on val the FVD is best at 2 for a (not 4), at 7 for b.
TEST_ACC = {"a": (0.10, 0.20, 0.30, 0.25), "b": (0.05, 0.10, 0.15, 0.20)}
TEST_FVD = {"a": (400.0, 300.0, 200.0, 250.0), "b": (500.0, 450.0, 400.0, 350.0)}
VAL_FVD = {"a": (380.0, 190.0, 210.0, 260.0), "b": (520.0, 460.0, 410.0, 340.0)}


def axis_runs(select: bool = True):
    import pandas as pd

    rows = []
    for strategy in TEST_ACC:
        for seed in range(3):
            jitter = 0.01 * (seed - 1)  # seeds 0,1,2 spread symmetrically: the mean is the table's value
            row = {"strategy": strategy, "seed": seed, "params.metrics.cfg": "4.0",
                   "eval/acc_all": TEST_ACC[strategy][2] + jitter, "eval/fvd": TEST_FVD[strategy][2] * 0.9}
            for i, s in enumerate(SCALES):
                row[guidance_key("acc_all", s)] = TEST_ACC[strategy][i] + jitter
                row[guidance_key("fvd", s)] = TEST_FVD[strategy][i] * (1 + jitter)
                if select:
                    row[guidance_key("fvd", s, "eval_val")] = VAL_FVD[strategy][i]
            rows.append(row)
    return pd.DataFrame(rows)


def test_best_scale_is_chosen_on_val_and_reported_on_test():
    from sorabench.report.guidance import best_scales, default_scale, guidance_summary

    runs = axis_runs()
    g = guidance_summary(runs)
    a4 = g[(g.strategy == "a") & (g.prefix == "eval") & (g.metric == "acc_all") & (g.scale == 4.0)].iloc[0]
    assert a4["mean"] == pytest.approx(0.30) and a4["n"] == 3 and a4["ci95"] > 0
    assert default_scale(runs) == 4.0

    best = best_scales(runs, "fvd", "minimize", 4.0).set_index("strategy")
    # a: val FVD is best at 2 although test FVD would pick 4; the table reports the *test* numbers at 2.
    assert best.loc["a", "best_scale"] == 2.0 and best.loc["a", "chosen_on"] == "val prompts"
    assert best.loc["a", "acc_all_best_mean"] == pytest.approx(0.20)
    assert best.loc["a", "fvd_best_mean"] == pytest.approx(300.0)
    assert best.loc["a", "acc_all_default_mean"] == pytest.approx(0.30) and best.loc["a", "default_from"] == "axis"
    assert best.loc["b", "best_scale"] == 7.0 and best.loc["b", "fvd_best_mean"] == pytest.approx(350.0)

    # Without a selection split the choice is made on the test prompts and says it is an oracle.
    oracle = best_scales(axis_runs(select=False), "acc_all", "maximize", 4.0).set_index("strategy")
    assert oracle.loc["a", "best_scale"] == 4.0 and "oracle" in oracle.loc["a", "chosen_on"]
    # A default scale off the axis falls back to the unsuffixed eval/* numbers, and says so.
    off = best_scales(runs, "fvd", "minimize", 3.0).set_index("strategy")
    assert off.loc["a", "fvd_default_mean"] == pytest.approx(180.0) and off.loc["a", "default_from"] != "axis"


def test_report_plots_the_axis_and_tables_the_best_scale(tmp_path, capsys):
    import time

    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from sorabench.commands.report import main

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("g", artifact_location=str(tmp_path / "mlartifacts"))
    parent = client.create_run(exp, tags={"sorabench.role": "study", "sorabench.study": "g"}).info.run_id
    now = int(time.time() * 1000)
    for i, row in axis_runs().iterrows():
        tags = {"mlflow.parentRunId": parent, "sorabench.strategy": row.strategy, "optuna.trial_number": str(i),
                "optuna.state": "COMPLETE", "eval.protocol.guidance_scales": "1,2,4,7",
                "eval.protocol.guidance_n_samples": "128", "eval.protocol.guidance_select_split": "val"}
        run = client.create_run(exp, tags=tags).info.run_id
        metrics = [Metric(k, float(v), now, 10) for k, v in row.items() if k.startswith("eval")]
        client.log_batch(run, metrics=metrics, params=[Param("seed", str(row.seed)), Param("metrics.cfg", "4.0")])
        client.set_terminated(run, "FINISHED")
    cfg = compose_config("report", [f"outputs={tmp_path}", "study=g", "name=g"], command="report")
    assert main(cfg) == 0
    out = tmp_path / "report" / "g"
    for f in ("guidance_acc_all.png", "guidance_fvd.png", "guidance.csv", "guidance_best.csv"):
        assert (out / f).stat().st_size > 0, f
    best = pd.read_csv(out / "guidance_best.csv").set_index("strategy")
    assert best.loc["a", "best_scale"] == 2.0 and best.loc["b", "best_scale"] == 7.0  # headline eval/fvd, on val
    md = (out / "report.md").read_text()
    assert "## Guidance" in md and "![guidance: acc_all](guidance_acc_all.png)" in md and "val prompts" in md
    assert "oracle" not in md and "guidance_n_samples: 128" in md
    all_metrics = md.split("## All metrics")[1].split("## Pairwise tests")[0]
    assert "cfg2" not in all_metrics and "eval/acc_all" in all_metrics  # the axis has its own section
    assert not (out / "eval_cfg2_fvd.png").exists()


def test_evaluate_ckpt_logs_into_a_child_run_never_the_checkpoints_own(tmp_path):
    import json

    from mlflow import MlflowClient

    from sorabench.commands.evaluate import evaluation_logger

    cfg = evaluate_cfg(tmp_path, "name=recheck")
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "art"))
    trained = client.create_run(exp, tags={"mlflow.runName": "adaln_zero-seed0"}).info.run_id
    client.log_metric(trained, "eval/fvd", 60.0, step=1500)
    run_dir = tmp_path / "train" / "study" / "adaln_zero-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": trained, "experiment": "study"}))
    logger = evaluation_logger(cfg, run_dir)
    logger.log_metrics({"eval/fvd": 99.0}, step=1500)
    run = client.get_run(logger.run_id)
    assert logger.run_id != trained and run.data.tags["mlflow.parentRunId"] == trained
    assert run.data.tags["sorabench.role"] == "evaluation" and run.info.run_name == "evaluate-recheck"
    assert [m.value for m in client.get_metric_history(trained, "eval/fvd")] == [60.0]  # the run's own number stays
    assert evaluation_logger(cfg, run_dir).run_id == logger.run_id  # the same name continues the same run
    assert evaluation_logger(cfg, tmp_path / "no_run") is None
