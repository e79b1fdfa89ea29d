"""The Lightning Trainer every command uses: checkpoints that survive a crash, resume by rerunning, a step progress bar.

- `last.ckpt` is rewritten every `trainer.checkpoint_every_n_steps` steps and at the end, always atomically
  (written to a temporary file, then renamed), so a run killed mid-write never leaves a half-written checkpoint.
- Running the same command again finds `<run_dir>/checkpoints/last.ckpt` and resumes from it.
- precision `auto` is resolved once per command by `pin_precision` (`sorabench/precision.py`: bf16-mixed on a GPU,
  on a CPU only where bf16 measurably beats fp32), written back into the config and printed.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from sorabench.config import ConfigError
from sorabench.files import atomic_save
from sorabench.training.callbacks import StepProgressBar


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file, fsync, then os.replace (`sorabench.files`): readers only ever see a complete
    file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)


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
