"""End to end through the real commands with tiny configs: train-vae -> encode -> train -> sample -> evaluate."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from sorabench.cli import main
from sorabench.config import ConfigError, compose_config
from sorabench.training.commands import train


def test_train_logs_everything_and_reuses_shared_assets(tiny_overrides, tmp_path):
    cfg = compose_config("train", [*tiny_overrides, "name=a", "conditioning=cross_attention"], command="train")
    result = train(cfg)
    m = result["metrics"]
    for key in ("eval/fvd", "eval/fid", "eval/kid", "eval/acc_all", "eval/acc_colour_seen", "eval/chance_all"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["eval/chance_all"] == pytest.approx(1 / (6 * 3 * 2 * 4 * 2))
    assert Path(result["ckpt"]).is_file()

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["conditioning.name"] == "cross_attention"
    assert run.data.metrics["model/params"] > 0 and run.data.metrics["model/gflops"] > 0
    assert "eval.protocol.feature_sha256" in run.data.tags and run.data.tags["sorabench.strategy"] == "cross_attention"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")][-1] >= 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "samples" in artifacts

    # A second strategy reuses the VAE, the evaluator and the latent caches instead of training/encoding again.
    outputs = Path(cfg.outputs)
    before = {p: p.stat().st_mtime for p in (outputs / "cache" / "latents").iterdir()}
    cfg_b = compose_config("train", [*tiny_overrides, "name=b", "conditioning=in_context"], command="train")
    train(cfg_b)
    assert len(list((outputs / "train_vae").iterdir())) == 1 and len(list((outputs / "train_evaluator").iterdir())) == 1
    assert {p: p.stat().st_mtime for p in (outputs / "cache" / "latents").iterdir()} == before

    # sample: same seed -> same clips; files written
    out = tmp_path / "samples"
    args = ["sample", f"ckpt={result['ckpt']}", "prompt=a red circle moving left", "n=2", "steps=2", f"out={out}",
            f"outputs={cfg.outputs}"]
    assert main(args) == 0
    assert (out / "sample_00.mp4").is_file() and (out / "sample_01.gif").is_file() and (out / "samples.png").is_file()
    first = (out / "sample_00.gif").read_bytes()
    assert main(args) == 0 and (out / "sample_00.gif").read_bytes() == first

    # evaluate a checkpoint: numbers go into the checkpoint's own MLflow run
    assert main(["evaluate", f"ckpt={result['ckpt']}", f"outputs={cfg.outputs}", *[o for o in tiny_overrides
                                                                                    if o.startswith(("metrics.", "data."))]]) == 0


def test_rerun_of_finished_run_returns_its_result(tiny_overrides):
    cfg = compose_config("train", [*tiny_overrides, "name=once", "evaluate.enabled=false", "mlflow.enabled=false"],
                         command="train")
    first = train(cfg)
    again = train(cfg)
    assert again == json.loads((Path(cfg.run_dir) / "result.json").read_text()) == first


def test_resume_from_last_checkpoint(tiny_overrides):
    overrides = [*tiny_overrides, "name=resume", "evaluate.enabled=false", "mlflow.enabled=false"]
    cfg = compose_config("train", [*overrides, "trainer.max_steps=4"], command="train")
    train(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    (Path(cfg.run_dir) / "result.json").unlink()  # as if the run had been killed before finishing
    cfg = compose_config("train", [*overrides, "trainer.max_steps=8"], command="train")
    train(cfg)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8


def test_bad_values_fail_before_training(tiny_overrides, capsys):
    bad = {
        "optim.lr=-1": "optim.lr",
        "dit.patch_size=[1,3,3]": "dit.patch_size",
        "data.num_frames=8 vae.model.temporal_factor=2": "num_frames",
        "sample.guidance_scale=-2": "guidance_scale",
    }
    for override, culprit in bad.items():
        code = main(["train", *tiny_overrides, *override.split()])
        err = capsys.readouterr().err.strip()
        assert code == 2 and culprit in err and len(err.splitlines()) == 1, (override, err)


def test_wrong_checkpoint_kind_is_rejected(tiny_overrides, tmp_path):
    cfg = compose_config("train", [*tiny_overrides, "name=k", "evaluate.enabled=false", "mlflow.enabled=false"],
                         command="train")
    train(cfg)
    vae_ckpt = next(Path(cfg.outputs, "train_vae").glob("*/checkpoints/last.ckpt"))
    from sorabench.training.commands import load_dit

    with pytest.raises(ConfigError, match="is a vae checkpoint, expected a dit checkpoint"):
        load_dit(vae_ckpt)
