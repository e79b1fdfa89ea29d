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


def test_schema_accepts_what_the_defaults_allow():
    cfg = compose_config("train", ["optim.lr=1", "trainer.val_check_interval=0.5", "evaluate.every_n_steps=100",
                                   "trainer.gradient_clip_val=null", "dit=S"], command="train")
    assert cfg.optim.lr == 1 and cfg.dit.width != 32
    with pytest.raises(ConfigError, match="n=.*must be an integer"):
        compose_config("sample", ["ckpt=x", "n=two"], command="sample")
