"""Issue 16: bad input is one line naming the key or file, before any compute; portable checkpoints; content-keyed
caches; resume reports what an uninterrupted run reports; nothing a progress bar does ends a run."""

import json
import time
from pathlib import Path

import pytest
import torch

from sorabench.cli import main
from sorabench.config import ConfigError, compose_config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def nothing_trained(tiny_overrides) -> bool:
    outputs = Path(tiny_overrides[0].split("=", 1)[1])
    return not (outputs / "train_vae").exists() and not (outputs / "train_evaluator").exists()


# ---- case 3: one typed schema for every numeric (and boolean) key ----------------------------------------------


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("optim.lr=fast", "optim.lr"),
        ("trainer.max_steps=lots", "trainer.max_steps"),
        ("trainer.max_steps=10.5", "trainer.max_steps"),
        ("ema.decay=high", "ema.decay"),
        ("mlflow.enabled=maybe", "mlflow.enabled"),
        ("dit.patch_size=[1,a,4]", "dit.patch_size"),
        ("evaluate.every_n_steps=often", "evaluate.every_n_steps"),
        ("metrics.n_samples=many", "metrics.n_samples"),
    ],
)
def test_wrong_type_in_any_numeric_key_is_one_line(tiny_overrides, capsys, override, culprit):
    t0 = time.time()
    assert main(["train", *tiny_overrides, override]) == 2
    err = one_line_error(capsys)
    assert culprit in err and "must be" in err, err
    assert time.time() - t0 < 20 and nothing_trained(tiny_overrides)


def test_more_real_clips_than_the_split_holds_fails_before_training(tiny_overrides, capsys):
    # Found by running the binding pilot: n_real 512 against val's 256 clips failed only at the first evaluation.
    assert main(["train", *tiny_overrides, "metrics.real_split=val", "data.split_sizes.val=8",
                 "metrics.n_real=16"]) == 2
    err = one_line_error(capsys)
    assert "metrics.n_real/n_samples" in err and "val split has only 8 clips" in err, err
    assert nothing_trained(tiny_overrides)


def test_schema_accepts_what_the_defaults_allow():
    cfg = compose_config("train", ["optim.lr=1", "trainer.val_check_interval=0.5", "evaluate.every_n_steps=100",
                                   "trainer.gradient_clip_val=null", "dit=S"], command="train")
    assert cfg.optim.lr == 1 and cfg.dit.width != 32
    with pytest.raises(ConfigError, match="n=.*must be an integer"):
        compose_config("sample", ["ckpt=x", "n=two"], command="sample")


# ---- a trained tiny DiT, shared by the checkpoint tests --------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sorabench.training.dit_run import train
    from tests.conftest import TINY

    outputs = tmp_path_factory.mktemp("trained") / "outputs"
    cfg = compose_config("train", [f"outputs={outputs}", *TINY, "name=t", "evaluate.enabled=false",
                                   "mlflow.enabled=false"], command="train")
    train(cfg)
    return outputs, Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


# ---- case 1: a DiT checkpoint works alone, from any directory, with its VAE's identity checked ----------------


def test_dit_checkpoint_samples_alone_from_another_directory(trained, tmp_path, monkeypatch, capsys):
    import shutil

    outputs, ckpt = trained
    moved = tmp_path / "other_machine" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    vae_runs = outputs / "train_vae"
    hidden = outputs.parent / "vae_elsewhere"
    vae_runs.rename(hidden)  # the VAE checkpoint the DiT was trained with is gone
    try:
        monkeypatch.chdir(moved.parent)
        out = tmp_path / "samples"
        assert main(["sample", f"ckpt={moved}", "n=1", "steps=2", f"out={out}", f"outputs={tmp_path}"]) == 0
        assert (out / "sample_00.mp4").stat().st_size > 0
        # The embedded VAE is checked against its SHA-256: an edited one is refused, naming the file.
        c = torch.load(moved, weights_only=True)
        name = next(iter(c["sorabench_vae"]["state_dict"]))
        c["sorabench_vae"]["state_dict"][name] = c["sorabench_vae"]["state_dict"][name] + 1
        torch.save(c, moved)
        assert main(["sample", f"ckpt={moved}", "n=1", "steps=2", f"out={out}", f"outputs={tmp_path}"]) == 2
        err = one_line_error(capsys)
        assert str(moved) in err and "SHA-256" in err
    finally:
        hidden.rename(vae_runs)


# ---- case 3: a truncated checkpoint is one line naming the file ------------------------------------------------


def test_truncated_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys):
    _, ckpt = trained
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    assert main(["sample", f"ckpt={cut}", "n=1", "steps=2", f"out={tmp_path}", f"outputs={tmp_path}"]) == 2
    err = one_line_error(capsys)
    assert str(cut) in err and "truncated or corrupt" in err


# ---- case 4: no silent surprises in sampling -------------------------------------------------------------------


def test_empty_prompt_is_an_error_and_a_long_one_a_warning(trained, tmp_path, capsys):
    _, ckpt = trained
    base = [f"ckpt={ckpt}", "n=1", "steps=2", f"out={tmp_path}", f"outputs={tmp_path}"]
    assert main(["sample", *base, "prompt="]) == 2
    assert "prompt=''" in one_line_error(capsys)
    long_prompt = " ".join(["a red circle moving left"] * 40)
    assert main(["sample", *base, f"prompt={long_prompt}"]) == 0
    err = capsys.readouterr().err
    assert "warning: prompt" in err and "text_encoder.max_length" in err
    assert main(["sample", *base, "prompt=a red circle moving left"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---- cases 4 and 8: the progress bar counts steps, and nothing it does ends a run ------------------------------


def test_progress_bar_counts_steps_and_cannot_end_a_run(tiny_overrides, capsys, monkeypatch):
    from sorabench.training.dit_run import train
    from sorabench.training.callbacks import StepProgressBar

    overrides = [*tiny_overrides, "evaluate.enabled=false", "mlflow.enabled=false", "trainer.progress_bar=true"]
    train(compose_config("train", [*overrides, "name=bar"], command="train"))
    out = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "step" in out and "6/6" in out and "/-" not in out, out[-2000:]

    def broken(self, *args, **kwargs):
        raise IndexError("pop from empty list")  # what Rich's live display raised in teardown

    monkeypatch.setattr(StepProgressBar, "on_train_end", broken)
    monkeypatch.setattr(StepProgressBar, "teardown", broken)
    result = train(compose_config("train", [*overrides, "name=broken_bar"], command="train"))
    assert Path(result["ckpt"]).is_file() and "progress bar failed (IndexError" in capsys.readouterr().err


@pytest.mark.slow
def test_resumed_run_reports_exactly_what_an_uninterrupted_run_reports(tiny_overrides, monkeypatch):
    """A run that crashed after its last step (as the Rich bar made one do) and is resumed evaluates the same (EMA)
    weights as a run that did not crash; the periodic evaluation at that step evaluates them too."""
    import lightning as L

    import sorabench.metrics.evaluate as ev
    from sorabench.training.dit_run import train

    calls = []
    original = ev.evaluate_module

    def recording(module, cfg, logger=None, step=0):
        metrics = original(module, cfg, logger, step)
        calls.append((cfg.name, step, {k: v for k, v in metrics.items() if k == "eval/fvd" or "acc_" in k}))
        return metrics

    monkeypatch.setattr(ev, "evaluate_module", recording)

    class CrashAfterLastStep(L.Callback):
        def on_train_end(self, trainer, pl_module):
            raise RuntimeError("simulated crash after the last step")

    base = [*tiny_overrides, "mlflow.enabled=false", "evaluate.every_n_steps=6"]
    train(compose_config("train", [*base, "name=straight"], command="train"))
    crashed = compose_config("train", [*base, "name=crashed"], command="train")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, callbacks=[CrashAfterLastStep()])
    train(crashed)  # the rerun resumes at max_steps: nothing left to train, only the final evaluation
    by = {(name, step, i): m for i, (name, step, m) in enumerate(calls)}
    straight = [m for (name, step, _), m in by.items() if name == "straight"]
    crashed_runs = [m for (name, step, _), m in by.items() if name == "crashed"]
    # The periodic evaluation skips the last step when the final evaluation follows (the same EMA weights; that
    # the periodic one sees them is tests/test_training.py::test_periodic_evaluation_sees_the_ema_weights).
    assert len(straight) == 1 and len(crashed_runs) == 1, calls
    assert crashed_runs[-1] == straight[-1]  # the resumed run reports what the uninterrupted one reports


# ---- case 2: every path a command needs is checked before any compute ------------------------------------------


def test_evaluate_missing_folders_fail_before_the_evaluator_trains(tiny_overrides, tmp_path, capsys):
    t0 = time.time()
    assert main(["evaluate", tiny_overrides[0], f"real_root={tmp_path / 'no_real'}", f"fake_root={tmp_path}"]) == 2
    assert "real_root" in one_line_error(capsys) and nothing_trained(tiny_overrides)
    assert main(["evaluate", tiny_overrides[0], f"real_root={tmp_path}", f"fake_root={tmp_path / 'no_fake'}"]) == 2
    assert "no_fake" in one_line_error(capsys) and nothing_trained(tiny_overrides)
    assert time.time() - t0 < 20


# ---- case 9: your own videos: what to change, before any compute; every checkpoint load weights_only ------------


@pytest.fixture
def four_videos(tmp_path):
    from sorabench.data.video_io import write_video
    from tests.test_data import moving_square

    root = tmp_path / "mine"
    root.mkdir()
    rows = []
    for i in range(4):
        write_video(root / f"clip{i}.mp4", moving_square())
        rows.append({"video": f"clip{i}.mp4", "caption": f"a red square number {i}"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_own_videos_fail_before_compute_saying_what_to_change(tiny_overrides, four_videos, capsys, caplog):
    import logging

    # data=folder defaults to metrics=i3d, which has no `evaluator` settings
    overrides = [o for o in tiny_overrides if not o.startswith(("data.split_sizes", "metrics.evaluator."))]
    # 12-frame clips: the default metrics (I3D, 16 frames) need more than data=folder's default 8 frames, an error
    # of its own (tests/test_reliability.py); here the clips are long enough for a 12-frame protocol.
    # data.num_workers=0: a DataLoader worker forked from this process, which has decoded with PyAV (`data check`),
    # hung inside libav in the suite (see the closing note of 2026-12-07)
    folder = ["data=folder", f"data.root={four_videos}", "data.num_frames=12", "data.num_workers=0"]
    assert main(["data", "check", *folder]) == 0
    assert "warning" in capsys.readouterr().out
    overrides.append("metrics.num_frames=12")
    assert main(["train", *overrides, *folder]) == 2
    err = one_line_error(capsys)
    assert "data.val_fraction" in err and "split 'val'" in err and nothing_trained(tiny_overrides)
    folder += ["data.val_fraction=0.5", "data.test_fraction=0"]
    assert main(["train", *overrides, *folder, "metrics=evaluator"]) == 2  # it cannot read folder videos
    assert "data=folder with metrics=evaluator" in one_line_error(capsys) and nothing_trained(tiny_overrides)
    # Checkpoints are written and read as data only: Lightning never falls back to weights_only=False.
    with caplog.at_level(logging.INFO):
        assert main(["train", *overrides, *folder, "evaluate.enabled=false", "mlflow.enabled=false"]) == 0
    assert "weights_only` was not set" not in caplog.text


def test_evaluator_on_other_data_takes_effect_in_train(tiny_overrides, four_videos, capsys):
    """`metrics.evaluator_on_other_data=true` is one check, the same in `train` as in `evaluate`: your own videos are
    scored with an evaluator trained on shapes, which an unlabelled dataset cannot train, so it is given."""
    outputs = tiny_overrides[0]
    overrides = [o for o in tiny_overrides if not o.startswith(("data.split_sizes", "metrics."))]
    folder = ["data=folder", f"data.root={four_videos}", "data.num_frames=12", "data.val_fraction=0.5",
              "data.test_fraction=0", "data.batch_size=2", "data.num_workers=0"]  # no fork after PyAV (above)
    evaluator = ["metrics=evaluator", "metrics.evaluator_on_other_data=true", "metrics.num_frames=12",
                 "metrics.real_split=val", "metrics.n_real=2", "metrics.n_samples=2", "metrics.batch_size=2",
                 "metrics.num_seeds=1", "metrics.sample_steps=2", "metrics.kid_subsets=2"]
    assert main(["train", *overrides, *folder, *evaluator]) == 2  # nothing to train an evaluator on: say so first
    assert "metrics.evaluator_checkpoint" in one_line_error(capsys) and nothing_trained(tiny_overrides)
    shapes = [outputs, *[o for o in tiny_overrides if o.startswith("data.split_sizes")], "metrics.evaluator.width=8",
              "metrics.evaluator.max_steps=4", "trainer.progress_bar=false", "mlflow.enabled=false"]
    assert main(["train-evaluator", *shapes]) == 0
    ckpt = Path(outputs.split("=", 1)[1]) / "train_evaluator" / "default" / "checkpoints" / "last.ckpt"
    assert main(["train", *overrides, *folder, *evaluator, f"metrics.evaluator_checkpoint={ckpt}", "name=own",
                 "mlflow.enabled=false"]) == 0
    result = json.loads((Path(outputs.split("=", 1)[1]) / "train" / "own" / "result.json").read_text())
    assert {"eval/fvd", "eval/fid"} <= set(result["metrics"])  # the evaluator's features, on the folder's clips
    assert not any("acc_" in k for k in result["metrics"])  # no labels: nothing to read the clips' attributes against


# ---- case 5: caches of folder data are keyed by content --------------------------------------------------------


def test_replacing_a_video_in_place_invalidates_latents_and_real_statistics(four_videos, tmp_path):
    import os

    from sorabench.data.video_io import write_video
    from sorabench.latents import cache_key
    from sorabench.metrics.fvd import load_real_statistics, save_real_statistics
    from tests.test_data import moving_square

    data = {"name": "folder", "root": str(four_videos), "val_fraction": 0.5, "test_fraction": 0.0}
    vae_ckpt = tmp_path / "vae.ckpt"
    vae_ckpt.write_bytes(b"stands in for a VAE checkpoint: only its hash enters the key")

    def fields():
        from sorabench.config import config_key
        from sorabench.data.module import clip_fields

        return {"feature_net": "evaluator", "feature_sha256": "0", "n_real": 4, "n_generated": 4, "num_frames": 8,
                "frame_stride": 1, "clip_start": "first", "resolution": 32, "real_split": f"folder:{config_key(clip_fields(data))}/val",
                "seed": 0}

    stats = {"sum": torch.zeros(3), "outer": torch.zeros(3, 3), "n": torch.tensor(4)}
    before = cache_key(vae_ckpt, data, "train")
    save_real_statistics(tmp_path / "stats", fields(), stats)
    assert cache_key(vae_ckpt, data, "train") == before and load_real_statistics(tmp_path / "stats", fields())
    clip = four_videos / "clip0.mp4"
    stat = clip.stat()
    write_video(clip, -moving_square())  # other pixels, same name
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert clip.stat().st_size != stat.st_size
    assert cache_key(vae_ckpt, data, "train") != before
    assert load_real_statistics(tmp_path / "stats", fields()) is None


# ---- case 7: MLflow 3 opens sorabench's experiments as model training (the runs table) ---------------------------


@pytest.mark.slow
def test_experiments_are_tagged_as_model_training(tmp_path):
    import mlflow
    from omegaconf import open_dict

    from sorabench.tracking import make_logger

    cfg = compose_config("train", [f"outputs={tmp_path}", "name=k"], command="train")
    logger = make_logger(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("train")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    with open_dict(cfg):
        cfg.name = "k2"
    make_logger(cfg)  # a second run of an existing experiment keeps it so
    assert client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert logger.run_id


# ---- case 4: a database path that cannot be created names its key --------------------------------------------


@pytest.mark.parametrize("override, key", [("storage=sqlite:////proc/nope/x.db", "storage"),
                                           ("mlflow.tracking_uri=sqlite:////proc/nope/m.db", "mlflow.tracking_uri")])
def test_uncreatable_database_folder_names_the_key(tmp_path, override, key):
    import subprocess
    import sys

    args = ["sweep", f"outputs={tmp_path}", override, *(["mlflow.enabled=false"] if key == "storage" else [])]
    proc = subprocess.run([sys.executable, "-m", "sorabench.cli", *args], capture_output=True, text=True)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {key}=") and "/proc/nope" in err


def test_sweep_with_no_workers_fails_before_anything_is_trained(tmp_path, capsys):
    from sorabench.cli import main

    assert main(["sweep", f"outputs={tmp_path}", "workers=0", "mlflow.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: workers=0"), err
    assert not (tmp_path / "train_vae").exists() and not (tmp_path / "optuna.db").exists()


# ---- found on the way: `encode vae=<ckpt>` could not work (`vae` is a config group) -----------------------------


def test_encode_takes_the_vae_checkpoint_as_vae_ckpt(trained, capsys):
    from tests.conftest import TINY

    outputs, _ = trained
    vae = next((outputs / "train_vae").glob("*/checkpoints/last.ckpt"))
    sizes = [o for o in TINY if o.startswith("data.split_sizes")]
    assert main(["encode", f"vae_ckpt={vae}", f"outputs={outputs}", *sizes]) == 0
    assert "train: 64 clips" in capsys.readouterr().out


def test_sweep_replicates_must_be_grid_axes(tmp_path, capsys):
    """`replicates:` names grid axes pooled like seeds (data.seed); one that is no axis fails in one line, first."""
    from sorabench.cli import main

    assert main(["sweep", f"outputs={tmp_path}", "sweep=conditioning_ablation", "+sweep.replicates=[data.seed]",
                 "mlflow.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: sweep.replicates=['data.seed']"), err
    assert not (tmp_path / "train_vae").exists() and not (tmp_path / "optuna.db").exists()
