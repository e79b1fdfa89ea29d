import os

import pytest
import torch

# Tiny models run fastest on one thread, and a test suite shares the machine's two cores with whatever else runs.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Overrides that shrink every stage of `sorabench train` to seconds: for end-to-end tests of the plumbing.
TINY = [
    "data.split_sizes.train=64",
    "data.split_sizes.val=16",
    "data.split_sizes.test=32",
    "data.split_sizes.unseen=8",
    "data.split_sizes.final=32",
    "data.batch_size=16",
    "data.num_workers=0",  # no DataLoader worker forked from a test process that has decoded with PyAV (it can hang)
    "vae.max_steps=4",
    "vae.model.base_channels=8",
    "dit.width=32",
    "dit.depth=1",
    "dit.heads=2",
    "trainer.max_steps=6",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "optim.warmup_steps=2",
    "ema.start_step=0",
    "sample.steps=2",
    "sample.log_prompts=1",
    "metrics.n_real=16",
    "metrics.n_samples=16",
    "metrics.num_seeds=1",
    "metrics.sample_steps=2",
    "metrics.batch_size=16",
    "metrics.kid_subsets=5",
    "metrics.evaluator.max_steps=4",
    "metrics.evaluator.width=8",
    "metrics.evaluator_min_accuracy=null",  # a 4-step evaluator is weak by design here; the ablations hold it to 0.95
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [f"outputs={tmp_path / 'outputs'}", *TINY]


def replace_training(monkeypatch, fake):
    """A sweep with `fake` standing in for `training.dit_run.train` and no shared assets to make: the scheduling
    logic alone, in seconds (tests/test_sweep_scale.py, tests/test_tuning.py)."""
    import sorabench.training.dit_run as dit_run

    monkeypatch.setattr(dit_run, "train", fake)
    monkeypatch.setattr(dit_run, "prepare_shared_assets", lambda cfg, caches=False: None)
    return fake
