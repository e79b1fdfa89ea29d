"""A VAE training run: `sorabench train-vae`, and the shared VAE of `vae_ckpt: auto`, trained once per config.

The run directory, result file and checkpoint loading are `sorabench.training.runs`; the LightningModule is
`sorabench.training.vae_module` (which `runs` loads, so this module is apart from both).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from rich.console import Console

from sorabench.config import ConfigError, require, to_container
from sorabench.data.module import VideoDataModule, clip_fields, dataset_config
from sorabench.files import atomic_save
from sorabench.models.vae import build_vae
from sorabench.tracking import make_logger
from sorabench.training.callbacks import SkippedSamplesReport, TagCheckpointKind
from sorabench.training.runs import finished_result, shared_asset_config, train_shared_asset, write_result
from sorabench.training.trainer import build_trainer, fit, last_checkpoint, pin_precision
from sorabench.training.vae_module import VAEModule

console = Console()


def build_vae_module(cfg: DictConfig) -> VAEModule:
    data = dataset_config(to_container(cfg.data))
    vae = to_container(cfg.vae)
    try:
        build_vae(**vae["model"]).latent_shape(data.num_frames, data.height, data.width)
    except ValueError as e:
        raise ConfigError(f"vae/data mismatch: {e}") from e
    return VAEModule(
        vae=vae["model"],
        lr=vae["lr"],
        kl_weight=vae["kl_weight"],
        recon_loss=vae["recon_loss"],
        ssim_weight=vae["ssim_weight"],
        weight_decay=vae["weight_decay"],
        num_frames=data.num_frames,
        height=data.height,
        width=data.width,
    )


def save_untrained_vae(module, run_dir: Path) -> Path:
    """`vae.model.factor: none` has nothing to train: write its checkpoint directly (scale factor 1)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    atomic_save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                 "pytorch-lightning_version": L.__version__, "sorabench_kind": "vae", "global_step": 0}, path)
    return path


def run_vae_training(cfg: DictConfig) -> Path:
    """Train (or resume, or reuse) the VAE of `cfg`; returns its final checkpoint."""
    run_dir = Path(cfg.run_dir)
    if finished_result(run_dir):
        return Path(finished_result(run_dir)["ckpt"])
    L.seed_everything(cfg.seed, workers=True)
    module = build_vae_module(cfg)
    if cfg.vae.model.factor == "none":
        ckpt = save_untrained_vae(module, run_dir)
        write_result(run_dir, {"ckpt": str(ckpt), "metrics": {}, "scale_factor": 1.0, "train_seconds": 0.0})
        return ckpt
    require(cfg.vae.lr > 0, "vae.lr", cfg.vae.lr, "must be > 0")
    pin_precision(cfg)
    logger = make_logger(cfg)
    callbacks = [TagCheckpointKind("vae"), SkippedSamplesReport()]
    trainer = build_trainer(cfg, logger, callbacks, monitor="val/psnr", mode="max")
    t0 = time.time()
    data = {**to_container(cfg.data), "batch_size": cfg.vae.batch_size}
    fit(trainer, module, VideoDataModule(data), run_dir)
    ckpt = last_checkpoint(run_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {"ckpt": str(ckpt), "metrics": metrics, "scale_factor": float(module.scale_factor),
              "train_seconds": time.time() - t0}
    if logger is not None:
        logger.log_metrics({"time/train_seconds": result["train_seconds"], "vae/scale_factor": result["scale_factor"]})
    write_result(run_dir, result)
    console.print(f"VAE: {metrics} scale_factor={result['scale_factor']:.4f} -> {ckpt}")
    return ckpt


def ensure_vae(cfg: DictConfig) -> Path:
    """The checkpoint of the VAE that `cfg.vae` describes on `cfg.data`, training it once if needed (cached)."""
    if cfg.vae_ckpt != "auto":
        path = Path(cfg.vae_ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"vae_ckpt={str(path)!r} does not exist (train one with `sorabench train-vae`)")
        return path
    sub = shared_asset_config(cfg, "train_vae", (to_container(cfg.vae), clip_fields(to_container(cfg.data))),
                              {"vae": cfg.vae, "trainer.max_steps": cfg.vae.max_steps})
    return train_shared_asset(sub, run_vae_training, "VAE")
