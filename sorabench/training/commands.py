"""The training commands: `train-vae`, `encode`, `train`, `sample`, `train-evaluator`.

Shared assets are trained once and found again by a key of their config: the VAE (`vae_ckpt: auto`) under
`outputs/train_vae/auto-<key>` and the evaluator under `outputs/train_evaluator/auto-<key>`. Every run resumes from
its `last.ckpt` when started again with the same command, and a finished run (a `result.json` beside it) returns
its recorded result instead of training again.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from sorabench.config import ConfigError, compose_config, config_key, require, to_container
from sorabench.data.module import SkippedSamplesReport, VideoDataModule, build_dataset, clip_fields, dataset_config
from sorabench.files import atomic_save, atomic_write_text, file_lock
from sorabench.latents import LatentDataModule, cache_key, cache_path, load_or_encode
from sorabench.tracking import check_tracking_uri, make_logger
from sorabench.training.dit_module import DiTModule, NonFiniteLossError  # noqa: F401  (re-exported for sweeps)
from sorabench.training.trainer import EMA, SeedPerRank, build_trainer, fit, last_checkpoint

console = Console()
RESULT_FILE = "result.json"

def run_lock(run_dir: Path):
    """An exclusive lock on a run directory, so two sweep workers (on one machine or several sharing `outputs=`)
    never train the same shared asset at once."""
    return file_lock(Path(run_dir) / ".lock")


def finished_result(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(run_dir: str | Path, result: dict):
    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(result, indent=2, default=str))  # a reader never sees half a result


def load_checkpoint_module(cls, path: str | Path, kind: str):
    """Load a LightningModule checkpoint of the expected kind, with a clear error for a missing or wrong file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused to load, it holds objects beyond tensors and plain values "
                          f"(weights_only=True): {str(e).splitlines()[0]}") from e
    found = ckpt.get("sorabench_kind")
    if found != kind:
        raise ConfigError(f"{path} is a {found or 'non-sorabench'} checkpoint, expected a {kind} checkpoint")
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class TagCheckpointKind(L.Callback):
    """Writes `sorabench_kind` into every checkpoint so a VAE checkpoint given as a DiT is caught at load time."""

    def __init__(self, kind: str):
        self.kind = kind

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["sorabench_kind"] = self.kind


# ---- VAE -------------------------------------------------------------------------------------------------------


def build_vae_module(cfg: DictConfig):
    from sorabench.models.vae import build_vae
    from sorabench.training.vae_module import VAEModule

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


def train_vae(cfg: DictConfig) -> int:
    run_vae_training(cfg)
    return 0


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


def shared_asset_config(cfg: DictConfig, config_name: str, key_parts: tuple, settings: dict) -> DictConfig:
    """The config of a run that every trial shares (the VAE, the evaluator): `conf/<config_name>.yaml` under
    `cfg.outputs`, named `auto-<hash of key_parts>` so that no other config reuses it, with the caller's data,
    tracking and progress-bar settings and `settings` (dotted keys) on top."""
    sub = compose_config(config_name, [f"outputs={cfg.outputs}", f"name=auto-{config_key(*key_parts)}"],
                         command=config_name)
    with open_dict(sub):
        sub.data = cfg.data
        sub.mlflow.enabled, sub.mlflow.tracking_uri = cfg.mlflow.enabled, cfg.mlflow.tracking_uri
        sub.trainer.progress_bar = cfg.trainer.progress_bar
        for key, value in settings.items():
            OmegaConf.update(sub, key, value, merge=False)
    return sub


def train_shared_asset(sub: DictConfig, train_fn, what: str) -> Path:
    """Train a shared asset once: concurrent sweep workers wait on a lock, later ones find its result."""
    with run_lock(Path(sub.run_dir)):
        if not finished_result(sub.run_dir):
            console.print(f"training the shared {what} ({sub.trainer.max_steps} steps) in {sub.run_dir}")
        return train_fn(sub)


def load_vae(path: str | Path):
    from sorabench.training.vae_module import VAEModule

    return load_checkpoint_module(VAEModule, path, "vae").eval()


def encode(cfg: DictConfig) -> int:
    """`sorabench encode vae=<ckpt> data=<...> splits=[train,val]`: write the latent caches."""
    vae = load_vae(cfg.vae)
    data = to_container(cfg.data)
    for split in cfg.splits:
        key = cache_key(cfg.vae, data, split)
        existed = cache_path(cfg.cache_dir, key).is_file()
        t0 = time.time()
        cache = load_or_encode(vae, cfg.vae, data, split, cfg.cache_dir)
        what = "reused" if existed else f"encoded in {time.time() - t0:.1f} s"
        console.print(f"{split}: {len(cache['captions'])} clips {tuple(cache['mean'].shape[1:])} {what} "
                      f"-> {cache_path(cfg.cache_dir, key)}")
    return 0


# ---- DiT -------------------------------------------------------------------------------------------------------


def validate_train_config(cfg: DictConfig):
    """Reject bad values before any data is rendered or any model is trained."""
    require(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    require(0 <= cfg.caption_dropout < 1, "caption_dropout", cfg.caption_dropout, "must be in [0, 1)")
    require(cfg.sample.guidance_scale >= 0, "sample.guidance_scale", cfg.sample.guidance_scale, "must be >= 0")
    require(cfg.sample.steps >= 1, "sample.steps", cfg.sample.steps, "must be >= 1")
    require(isinstance(cfg.compile, bool), "compile", cfg.compile, "must be true or false")
    require(cfg.trainer.max_steps > 0 or cfg.trainer.fast_dev_run, "trainer.max_steps", cfg.trainer.max_steps,
            "must be > 0")
    if cfg.mlflow.enabled:
        check_tracking_uri(cfg.mlflow.tracking_uri)
    if (cfg.evaluate.enabled or cfg.evaluate.every_n_steps) and cfg.metrics.features == "torchscript":
        for net in ("fvd", "fid"):
            path = Path(cfg.metrics[net].path)
            if not path.is_file():
                raise FileNotFoundError(f"metrics.{net}.path={str(path)!r}: no such TorchScript feature network file")
    from sorabench.models.dit import check_patch_size
    from sorabench.models.vae import build_vae

    data = dataset_config(to_container(cfg.data))
    if cfg.data.name == "folder":  # index and probe the user's files now (cheap), not minutes into training
        for split in ("train", "val"):
            build_dataset(to_container(cfg.data), split)
    try:
        latent = build_vae(**to_container(cfg.vae.model)).latent_shape(data.num_frames, data.height, data.width)
    except ValueError as e:
        raise ConfigError(f"data.num_frames/height/width vs vae: {e}") from e
    try:
        check_patch_size(latent[1:], tuple(cfg.dit.patch_size))
    except ValueError as e:
        raise ConfigError(f"dit.patch_size={list(cfg.dit.patch_size)}: {e}") from e


def build_dit_module(cfg: DictConfig, latent_shape, vocab, vae_ckpt) -> DiTModule:
    return DiTModule(
        latent_shape=tuple(latent_shape),
        dit=to_container(cfg.dit),
        conditioning=to_container(cfg.conditioning),
        text_encoder=to_container(cfg.text_encoder),
        diffusion=to_container(cfg.diffusion),
        optim=to_container(cfg.optim),
        caption_dropout=cfg.caption_dropout,
        vocab=vocab,
        sample=to_container(cfg.sample),
        vae_ckpt=str(vae_ckpt),
        compile=cfg.compile,
    )


def training_callbacks(cfg: DictConfig, val_cache: dict) -> list:
    from sorabench.training.dit_module import LogSampleVideos

    callbacks = [TagCheckpointKind("dit"), SeedPerRank(cfg.seed)]
    if cfg.sample.log_every_n_val > 0 and cfg.mlflow.enabled:
        callbacks.append(LogSampleVideos(val_cache, to_container(cfg.sample)))  # before EMA: see its docstring
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=cfg.ema.decay, start_step=cfg.ema.start_step))
    if cfg.evaluate.every_n_steps:
        from sorabench.metrics.evaluate import EvaluateCallback

        callbacks.append(EvaluateCallback(cfg, every_n_steps=cfg.evaluate.every_n_steps))
    return callbacks


def train(cfg: DictConfig, parent_run_id=None, callbacks=(), tags=None, trial=None) -> dict:
    """Train the DiT of `cfg` on cached latents, then evaluate it; returns {run_id, ckpt, metrics}."""
    validate_train_config(cfg)
    run_dir = Path(cfg.run_dir)
    if finished_result(run_dir):
        console.print(f"{run_dir} already finished; reusing its result")
        return finished_result(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    vae_ckpt = ensure_vae(cfg)
    vae = load_vae(vae_ckpt)
    data = to_container(cfg.data)
    train_cache = load_or_encode(vae, vae_ckpt, data, "train", cfg.cache_dir)
    val_cache = load_or_encode(vae, vae_ckpt, data, "val", cfg.cache_dir)
    vocab = None
    if cfg.text_encoder.name == "learned":
        from sorabench.models.text import LearnedTextEncoder

        vocab = LearnedTextEncoder.from_captions(train_cache["captions"]).vocab
    L.seed_everything(cfg.seed, workers=True)  # model init independent of how much the caching consumed
    module = build_dit_module(cfg, train_cache["mean"].shape[1:], vocab, vae_ckpt)
    module.attach_vae(vae)
    module.precompute_text([*train_cache["captions"], *val_cache["captions"]], cache_dir=cfg.cache_dir)
    logger = make_logger(cfg, tags={**(tags or {}), "sorabench.strategy": cfg.conditioning.name},
                         parent_run_id=parent_run_id)
    trainer = build_trainer(cfg, logger, [*training_callbacks(cfg, val_cache), *callbacks], monitor="val/loss")
    t0 = time.time()
    fit(trainer, module, LatentDataModule(train_cache, val_cache, cfg.data.batch_size), run_dir)
    train_seconds = time.time() - t0
    if trial is not None and trial.should_prune():
        import optuna

        raise optuna.TrialPruned(f"pruned at step {trainer.global_step} (val/loss)")
    if not trainer.is_global_zero:  # DDP: the other processes only helped train
        return {"run_id": None, "ckpt": str(last_checkpoint(run_dir)), "metrics": {}}
    metrics = {"time/train_seconds": train_seconds}
    if cfg.evaluate.enabled:
        from sorabench.metrics.evaluate import evaluate_module

        metrics.update(evaluate_module(module, cfg, logger, step=trainer.global_step))
    for k, v in trainer.callback_metrics.items():
        metrics.setdefault(k, float(v))
    if logger is not None:
        logger.log_metrics({"time/train_seconds": train_seconds}, step=trainer.global_step)
    result = {"run_id": getattr(logger, "run_id", None), "ckpt": str(last_checkpoint(run_dir)), "metrics": metrics,
              "world_size": trainer.world_size}
    write_result(run_dir, result)
    return result


def prepare_shared_assets(cfg: DictConfig):
    """Train what every trial of a sweep shares (VAE, evaluator) before the trials start."""
    validate_train_config(cfg)
    ensure_vae(cfg)
    evaluating = cfg.evaluate.enabled or cfg.evaluate.every_n_steps
    if evaluating and (cfg.metrics.features == "evaluator" or cfg.data.name == "shapes"):
        from sorabench.metrics.evaluate import ensure_evaluator

        ensure_evaluator(cfg)


def load_dit(path: str | Path) -> DiTModule:
    module = load_checkpoint_module(DiTModule, path, "dit").eval()
    module.attach_vae(load_vae(module.hparams.vae_ckpt))
    return module


def sample(cfg: DictConfig) -> int:
    """`sorabench sample ckpt=... prompt="..." n=4 steps=25 cfg=4 seed=0 out=<dir>`: mp4 and gif per clip."""
    from sorabench.data.video_io import write_gif, write_video

    require(cfg.cfg >= 0, "cfg", cfg.cfg, "the guidance scale must be >= 0")
    require(cfg.n >= 1 and cfg.steps >= 1, "n/steps", (cfg.n, cfg.steps), "must be >= 1")
    module = load_dit(cfg.ckpt)
    prompts = [cfg.prompt] * cfg.n if isinstance(cfg.prompt, str) else list(cfg.prompt)
    videos = module.sample_videos(prompts, steps=cfg.steps, guidance_scale=cfg.cfg, seed=cfg.seed)
    out = Path(cfg.out)
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        stem = f"sample_{i:02d}"
        write_video(out / f"{stem}.mp4", video, scale=cfg.scale)
        write_gif(out / f"{stem}.gif", video, scale=cfg.scale)
    from sorabench.data.commands import contact_sheet

    contact_sheet(out / "samples.png", list(videos), prompts)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    console.print(f"wrote {len(prompts)} samples (.mp4, .gif) and samples.png to {out}")
    return 0


# ---- evaluator --------------------------------------------------------------------------------------------------


def train_evaluator(cfg: DictConfig) -> int:
    from sorabench.metrics.evaluate import run_evaluator_training

    run_evaluator_training(cfg)
    return 0

