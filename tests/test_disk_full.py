"""Out of disk, on a real size-limited filesystem (a tmpfs mounted for the test): a checkpoint write, a cache write and
an artifact upload fail in one line naming the file, earlier checkpoints stay loadable, and a rerun finishes once
space is back."""

import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import open_dict

from sorabench.config import compose_config
from sorabench.files import DiskFullError, atomic_save
from sorabench.tracking import log_files
from sorabench.training.dit_run import train
from tests.conftest import TINY


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    """Write zeros into `fs` until it is full."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**16)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_in_one_line_keeps_the_last_checkpoint_and_a_rerun_finishes(small_fs, tmp_path):
    cfg = compose_config("train", [f"outputs={small_fs}", "name=full", *TINY, "evaluate.enabled=false",
                                   "mlflow.enabled=false", "sample.log_every_n_val=0"], command="train")
    train(cfg)
    run_dir = Path(cfg.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    (run_dir / "result.json").unlink()  # train 4 steps more: its next checkpoint write meets a full disk
    with open_dict(cfg):
        cfg.trainer.max_steps = 10
    filler = fill(small_fs)
    with pytest.raises(DiskFullError) as failed:
        train(cfg)
    message = str(failed.value)
    assert "\n" not in message and "no space left on the device writing" in message and str(run_dir) in message
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the earlier checkpoint: whole, loadable
    assert not list(run_dir.rglob("*.tmp"))
    # A cache write and an artifact upload into the full filesystem: the same one line, naming the file.
    with pytest.raises(DiskFullError, match=f"writing {small_fs}/cache/x.pt"):
        atomic_save({"x": torch.zeros(2**18)}, small_fs / "cache" / "x.pt")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("e", artifact_location=str(small_fs / "artifacts")))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * 2**20)
    with pytest.raises(DiskFullError, match=f"uploading {big}"):
        log_files(client, run.info.run_id, [big], "x")
    filler.unlink()  # space is back: the rerun continues from step 6 to the end
    result = train(cfg)
    assert torch.load(last, weights_only=True)["global_step"] == 10 and Path(result["ckpt"]) == last
