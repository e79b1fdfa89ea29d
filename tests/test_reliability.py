"""Reliability: nothing lost on a crash, a clear one-line error for bad input before any long work, safe loading.

Other cases live beside the code they exercise: bad video folders (corrupt, truncated, too short, empty, missing
caption field, unknown path) in test_data.py, unknown config keys in test_cli.py, a missing TorchScript file in
test_metrics.py, a sweep killed mid-trial in test_sweep.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch


from omegaconf import open_dict

from sorabench.cli import main
from sorabench.config import ConfigError, compose_config
from sorabench.data.video_io import write_video
from sorabench.sweep.space import cell_values
from sorabench.training.dit_run import train
from sorabench.training.runs import load_checkpoint_module, load_dit
from sorabench.training.dit_module import DiTModule
from tests.conftest import TINY
from tests.test_data import moving_square


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("optim.lr=-1", "optim.lr"),
        ("dit.patch_size=[1,3,3]", "dit.patch_size"),
        ("data.num_frames=8 vae.model.temporal_factor=2", "num_frames"),
        ("sample.guidance_scale=-2", "guidance_scale"),
        ("caption_dropout=1.5", "caption_dropout"),
        ("data.bogus=1", "bogus"),
        ("trainer.precision=fp8", "trainer.precision=fp8: must be one of auto, "),
        ("conditioning=mmdit conditioning.timestep=bogus", "conditioning.timestep='bogus'"),
        ("budget=flops budget_reference=nonexistent", "budget_reference='nonexistent'"),
    ],
)
def test_bad_values_fail_before_training(tiny_overrides, capsys, override, culprit):
    t0 = time.time()
    assert main(["train", *tiny_overrides, *override.split()]) == 2
    assert culprit in one_line_error(capsys)
    assert time.time() - t0 < 20
    assert not (Path(tiny_overrides[0].split("=", 1)[1]) / "train_vae").exists()  # nothing was trained


def test_evaluate_with_too_few_frames_for_i3d_fails_before_the_evaluator_trains(tmp_path, capsys):
    """Standard FVD needs 16 frames; on 8-frame `shapes` clips that is one line before the evaluator (minutes)
    is trained for the alignment scores or a checkpoint is read."""
    assert main(["evaluate", f"outputs={tmp_path}", "ckpt=never-read.ckpt", "metrics=i3d"]) == 2
    assert "data.num_frames=8" in one_line_error(capsys)
    assert not (tmp_path / "train_evaluator").exists()


def test_unreachable_tracking_server_fails_fast_naming_the_url(tiny_overrides, capsys):
    t0 = time.time()
    assert main(["train", *tiny_overrides, "mlflow.tracking_uri=http://127.0.0.1:9"]) == 2
    assert "http://127.0.0.1:9" in one_line_error(capsys) and time.time() - t0 < 20


def test_unreachable_postgres_storage_fails_fast_naming_the_url(tmp_path, capsys):
    t0 = time.time()
    url = "postgresql+psycopg2://nobody@127.0.0.1:9/optuna"
    assert main(["sweep", f"outputs={tmp_path}", f"storage={url}", "mlflow.enabled=false"]) == 2
    assert url in one_line_error(capsys) and time.time() - t0 < 30


def test_missing_feature_network_file_fails_before_training(tiny_overrides, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("metrics.")]  # torchscript has other fields
    assert main(["train", *overrides, "metrics=torchscript", "metrics.fvd.path=/nowhere/i3d.pt"]) == 2
    assert "/nowhere/i3d.pt" in one_line_error(capsys)


def test_corrupt_and_missing_videos_fail_before_training(tiny_overrides, tmp_path, capsys):
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(30):
        write_video(root / f"v{i}.mp4", moving_square())
    (root / "bad.mp4").write_bytes(b"definitely not a video")
    rows = [{"video": f"v{i}.mp4", "caption": "a red square"} for i in range(30)]
    rows.append({"video": "bad.mp4", "caption": "broken"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = ["data=folder", f"data.root={root}", "data.val_fraction=0.3", "data.test_fraction=0.0",
              "evaluate.enabled=false"]
    # data=folder defaults to metrics=i3d, which has no `evaluator` settings
    overrides = [o for o in tiny_overrides if not o.startswith(("data.split_sizes", "metrics.evaluator."))]
    assert main(["train", *overrides, *folder]) == 2
    assert "bad.mp4" in one_line_error(capsys)
    (root / "captions.jsonl").write_text(json.dumps({"video": "gone.mp4", "caption": "x"}))
    assert main(["train", *overrides, *folder]) == 2
    assert "gone.mp4" in one_line_error(capsys)


def test_wrong_checkpoint_kind_and_unsafe_pickles_are_refused(tiny_overrides, tmp_path):
    cfg = compose_config("train", [*tiny_overrides, "name=k", "evaluate.enabled=false", "mlflow.enabled=false"],
                         command="train")
    train(cfg)
    vae_ckpt = next(Path(cfg.outputs, "train_vae").glob("*/checkpoints/last.ckpt"))
    with pytest.raises(ConfigError, match="is a vae checkpoint, expected a dit checkpoint"):
        load_dit(vae_ckpt)
    evil = tmp_path / "evil.ckpt"
    torch.save({"sorabench_kind": "dit", "payload": Path("/etc/passwd")}, evil)  # a non-tensor object
    with pytest.raises(ConfigError, match="weights_only"):
        load_checkpoint_module(DiTModule, evil, "dit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dit(tmp_path / "missing.ckpt")


def test_checkpoint_from_an_incompatible_config_is_refused(tiny_overrides):
    cfg = compose_config("train", [*tiny_overrides, "name=c", "evaluate.enabled=false", "mlflow.enabled=false"],
                         command="train")
    train(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    # Resuming this run with another model width is an incompatible config: the error names the mismatched tensor.
    (Path(cfg.run_dir) / "result.json").unlink()
    wider = compose_config("train", [*tiny_overrides, "name=c", "evaluate.enabled=false", "mlflow.enabled=false",
                                     "dit.width=64", "trainer.max_steps=10"], command="train")
    with pytest.raises(ConfigError, match="incompatible config .*size mismatch"):
        train(wider)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6  # the old checkpoint is untouched


def run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sorabench.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkilled_training_resumes_same_mlflow_run_and_step_count(tmp_path):
    steps = 2000  # long enough (~20 s) to be killed mid-run
    args = ["train", f"outputs={tmp_path}", "name=crash", *TINY, f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=5", "evaluate.enabled=false", "sample.log_every_n_val=0"]
    run_dir = tmp_path / "train" / "crash"
    proc = run_cli(args)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            step = torch.load(ckpt, weights_only=True)["global_step"]
            if step >= 20:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.2)
    proc.wait()
    assert killed_at is not None and killed_at < steps, "training ended before it could be killed"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    # Whatever instant the kill hit, last.ckpt is whole (atomic write) and resumable.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= killed_at

    steps = killed_at + 20  # the rerun resumes and finishes soon after the kill (a shorter budget, not a new run)
    proc = run_cli([*args, f"trainer.max_steps={steps}"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the same run continued, no second one
    history = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert max(history) >= steps - 2 and min(history) <= 5  # logged before and after the crash, on one step axis


def test_a_sweep_child_killed_before_recording_its_run_id_is_continued_not_duplicated(tmp_path):
    """A worker SIGKILLed between MLflow creating a trial's run and mlflow_run.json being written: the retry
    continues that (still RUNNING) child instead of opening a twin; a terminated one is never adopted."""
    from sorabench.tracking import RUN_ID_FILE, make_logger

    cfg = compose_config("train", [f"outputs={tmp_path}", "name=cell-a", "mlflow.experiment=study"], command="train")
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment_id = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id).info.run_id
    first = make_logger(cfg, parent_run_id=parent).run_id
    (Path(cfg.run_dir) / RUN_ID_FILE).unlink()  # as if killed before the write
    assert make_logger(cfg, parent_run_id=parent).run_id == first
    client.set_terminated(first, status="FAILED")  # terminated runs had their id file: a new folder is a new run
    (Path(cfg.run_dir) / RUN_ID_FILE).unlink()
    assert make_logger(cfg, parent_run_id=parent).run_id != first


@pytest.mark.slow
def test_nan_loss_fails_only_that_trial_with_its_reason(tmp_path, monkeypatch):
    original = DiTModule.training_step

    def nan_for_in_context(self, batch, batch_idx):
        if self.hparams.conditioning["name"] == "in_context":
            batch = {**batch, "latent": batch["latent"] * float("nan")}
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiTModule, "training_step", nan_for_in_context)
    from sorabench.sweep.run import run_sweep

    cfg = compose_config("sweep", [f"outputs={tmp_path}", "workers=1", "sweep.params.conditioning.choices=[adaln_zero,in_context]",
                                   "sweep.seeds=[0]", "report=false"], command="sweep")
    with open_dict(cfg):
        cfg.overrides = TINY
    assert run_sweep(cfg) == 0
    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
    by_strategy = {cell_values(t)["conditioning"]: t for t in study.trials}
    assert by_strategy["adaln_zero"].state == optuna.trial.TrialState.COMPLETE
    failed = by_strategy["in_context"]
    assert failed.state == optuna.trial.TrialState.FAIL and "NonFiniteLossError" in failed.user_attrs["final_failure"]
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.study).experiment_id],
                              filter_string="tags.`sorabench.strategy` = 'in_context'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "loss is nan" in runs[0].data.tags["failure_reason"]


def test_a_torn_run_id_file_never_blocks_a_resume(tmp_path):
    """mlflow_run.json is written atomically; one torn by a crash of an older version (or a broken disk) is
    reported and ignored, so the rerun opens (or, in a sweep, finds again by name) its MLflow run instead of failing
    on a JSONDecodeError at every resume."""
    from sorabench.tracking import RUN_ID_FILE, make_logger, read_run_id

    cfg = compose_config("train", [f"outputs={tmp_path}", "name=torn", *TINY], command="train")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_ID_FILE).write_text('{"run_id": "3f2a')  # cut mid-write
    with pytest.warns(UserWarning, match=f"{RUN_ID_FILE}: unreadable"):
        assert read_run_id(run_dir) is None
    with pytest.warns(UserWarning, match="unreadable"):
        logger = make_logger(cfg)
    recorded = json.loads((run_dir / RUN_ID_FILE).read_text())  # rewritten whole, naming the new run
    assert recorded["run_id"] == logger.run_id and read_run_id(run_dir) == recorded
    assert not list(run_dir.glob("*.tmp*"))  # the atomic write left no temporary file behind
