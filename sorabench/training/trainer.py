"""The Lightning Trainer every command uses: checkpoints that survive a crash, resume by rerunning, a step progress bar.

- `last.ckpt` is rewritten every `trainer.checkpoint_every_n_steps` steps and at the end, always atomically
  (written to a temporary file, then renamed), so a run killed mid-write never leaves a half-written checkpoint.
- Running the same command again finds `<run_dir>/checkpoints/last.ckpt` and resumes from it.
- precision `auto` is resolved once per command by `pin_precision` (`sorabench/precision.py`: bf16-mixed on a GPU,
  on a CPU only where bf16 measurably beats fp32), written back into the config and printed.
"""

from __future__ import annotations

import functools
import math
import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar, WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch.optim.swa_utils import get_ema_multi_avg_fn

from sorabench.config import ConfigError
from sorabench.files import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file, fsync, then os.replace (`sorabench.files`): readers only ever see a complete
    file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)


class EMA(WeightAveraging):
    """Lightning's EMA weight averaging (EMAWeightAveraging's schedule: every step from `start_step`), updating all
    weights with one foreach lerp (torch's `get_ema_multi_avg_fn`). EMAWeightAveraging hard-wires the per-tensor
    `get_ema_avg_fn`, a Python loop over every tensor, several times slower per step (benchmarks/RESULTS.md, 11)."""

    def __init__(self, decay: float, start_step: int = 0):
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.train_ended = False

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)  # the average goes into the module: what is evaluated and sampled
        self.train_ended = True

    def on_fit_end(self, trainer, pl_module):
        # A run resumed from a checkpoint at max_steps (e.g. after a crash in teardown) skips the training loop, so
        # on_train_end never ran and the module still holds the raw weights the checkpoint restored: put the
        # average in, so a resumed run evaluates exactly what an uninterrupted one does.
        if not self.train_ended and self._average_model is not None:
            self._copy_average_to_current(pl_module)


class StepProgressBar(TQDMProgressBar):
    """Lightning's plain tqdm bar, counting optimizer steps out of `trainer.max_steps` in step-based training (an
    epoch count means nothing there), and guarded: an error inside the bar turns it off with a warning and never
    ends the run (Rich's live display once crashed a 9-minute run in its teardown, losing the final evaluation)."""

    def __init__(self):
        super().__init__()
        self.broken = False
        for name in dir(L.Callback):
            if name.startswith("on_") or name in ("setup", "teardown"):
                setattr(self, name, self._guarded(getattr(self, name)))

    def _guarded(self, hook):
        @functools.wraps(hook)
        def run(*args, **kwargs):
            if self.broken:
                return None
            try:
                return hook(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a display must not end a training run
                self.broken = True
                print(f"warning: the progress bar failed ({type(e).__name__}: {e}); training continues without it",
                      file=sys.stderr)
                return None

        return run

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            bar = self.train_progress_bar
            bar.total, bar.n = trainer.max_steps, trainer.global_step
            bar.set_description(f"epoch {trainer.current_epoch}, step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class SeedPerRank(L.Callback):
    """Under DDP every rank draws its own noise, timesteps, caption-dropout masks and posterior samples: when
    training starts, each rank reseeds with `seed * world_size + rank` (as DiT's train.py does). One
    `seed_everything(seed)` in every rank would give the global batch only one rank's worth of distinct draws.
    The model's init stays `seed` in every rank, and Lightning's DistributedSampler keeps its own seed
    (PL_GLOBAL_SEED), so the ranks still split the clips between them. A single process is left as it was."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            seed = self.seed * trainer.world_size + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


def lr_schedule(warmup: int, total: int, final: float = 0.0, schedule: str = "cosine",
                decay_during_warmup: bool = False):
    """The lr factor per step, for LambdaLR: a linear warm-up over `warmup` steps, then a cosine decay to
    `final` x lr at step `total` (`schedule="constant"` stays at 1 after the warm-up). With `decay_during_warmup` the
    cosine runs from step 0 and the warm-up scales it rather than delaying it (the evaluator's recipe)."""
    start = 0 if decay_during_warmup else warmup

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if schedule == "constant" or step < start:
            return ramp
        progress = min(1.0, (step - start) / max(1, total - start))
        return ramp * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    path = checkpoint_dir(run_dir) / "last.ckpt"
    return path if path.is_file() else None


def pin_precision(cfg: DictConfig, quiet: bool = False) -> str:
    """Resolve `cfg.trainer.precision` (`auto` -> what this machine runs best, `sorabench.precision.resolve`) and
    write it back, so that the logged params, the protocol tags and every later step see one value; printed."""
    from omegaconf import open_dict

    from sorabench.precision import resolve

    resolved = resolve(cfg.trainer.precision, cfg.trainer.accelerator)
    with open_dict(cfg):
        cfg.trainer.precision = resolved.precision
    if not quiet and resolved.reason != "set in the config":
        print(f"precision: {resolved}", flush=True)
    return resolved.precision


def build_trainer(
    cfg: DictConfig,
    logger=None,
    callbacks: list | None = None,
    monitor: str | None = None,
    mode: str = "min",
) -> L.Trainer:
    """A Trainer from `cfg.trainer`, checkpointing into `<run_dir>/checkpoints` (last + best by `monitor`)."""
    from sorabench.precision import trainer_precision

    precision, precision_plugins = trainer_precision(pin_precision(cfg, quiet=True), cfg.trainer.accelerator)
    t = cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir(cfg.run_dir),
        filename="best-{step}",
        monitor=monitor,
        mode=mode,
        save_last=True,
        save_top_k=1 if monitor else 0,
        every_n_train_steps=t.checkpoint_every_n_steps,
        enable_version_counter=False,
    )
    callbacks = [checkpoint, *(callbacks or [])]
    val_every = t.val_check_interval
    if isinstance(val_every, int) and t.max_steps > 0:
        val_every = min(val_every, t.max_steps)  # a run shorter than the interval still validates once, at its end
    if t.progress_bar:
        callbacks.append(StepProgressBar())
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        val_check_interval=val_every,
        check_val_every_n_epoch=t.check_val_every_n_epoch if val_every is None else None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        fast_dev_run=t.fast_dev_run,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=bool(t.progress_bar),
        enable_model_summary=False,
        default_root_dir=cfg.run_dir,
        plugins=[AtomicCheckpointIO(), *precision_plugins],
    )


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule, run_dir: str | Path):
    """trainer.fit, resuming from `<run_dir>/checkpoints/last.ckpt` when a previous run left one."""
    ckpt = last_checkpoint(run_dir) if not trainer.fast_dev_run else None
    try:
        # weights_only: a checkpoint is data, never code (sorabench's hparams are plain Python values).
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except RuntimeError as e:
        if ckpt is None or "Error(s) in loading state_dict" not in str(e):
            raise
        mismatch = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise ConfigError(f"{ckpt} was written by an incompatible config ({mismatch[:200]}); "
                          "resume with the config that wrote it, or start a new run with another name=") from e
