"""End to end through the real commands with tiny configs: train-vae -> encode -> train -> sample -> evaluate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from sorabench.cli import main
from sorabench.config import compose_config
from sorabench.precision import resolve
from sorabench.training.dit_run import train


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
    # ... and trains in bf16 (Lightning's autocast with clipping and fused AdamW), tagged so that no report pools it
    # with the fp32 run
    cfg_b = compose_config("train", [*tiny_overrides, "name=b", "conditioning=in_context",
                                     "trainer.precision=bf16-mixed"], command="train")
    run_b = client.get_run(train(cfg_b)["run_id"])
    assert run_b.data.tags["sorabench.precision"] == run_b.data.tags["eval.protocol.precision"] == "bf16-mixed"
    assert run_b.data.params["trainer.precision"] == "bf16-mixed"
    auto = resolve("auto", "cpu").precision  # what run a's `auto` became on this machine
    assert run.data.tags["sorabench.precision"] == run.data.tags["eval.protocol.precision"] == auto
    assert run.data.params["trainer.precision"] == auto
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


@pytest.mark.slow
def test_two_process_ddp_on_cpu_completes(tmp_path):
    from tests.conftest import TINY

    args = ["train", f"outputs={tmp_path}", "name=ddp", *TINY, "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "evaluate.enabled=false", "sample.log_every_n_val=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sorabench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "train" / "ddp" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6
    result = json.loads((tmp_path / "train" / "ddp" / "result.json").read_text())
    assert result["run_id"] and result["world_size"] == 2


def test_evaluation_during_training_and_between_two_folders(tiny_overrides, tmp_path, capsys):
    from sorabench.data.video_io import write_video
    from tests.test_data import moving_square

    cfg = compose_config("train", [*tiny_overrides, "name=cb", "evaluate.every_n_steps=3", "evaluate.enabled=false",
                                   "trainer.val_check_interval=3"], command="train")
    result = train(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert [h.step for h in client.get_metric_history(result["run_id"], "eval/fvd")] == [3, 6]  # FVD vs step

    real, fake = tmp_path / "real", tmp_path / "fake"
    for i in range(6):
        write_video(real / f"{i}.mp4", moving_square())
        write_video(fake / f"{i}.mp4", moving_square() * 0.5)
    metrics = [o for o in tiny_overrides if o.startswith(("metrics.", "data.", "outputs="))]
    # The shapes-trained evaluator on other videos only when asked for explicitly (tests/test_i3d.py: the default).
    assert main(["evaluate", f"real_root={real}", f"fake_root={fake}", *metrics,
                 "metrics.evaluator_on_other_data=true"]) == 0
    out = capsys.readouterr().out
    assert "eval/fvd" in out and "eval/fid" in out and "eval/kid" in out
