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
