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


def read_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """A sorabench checkpoint's contents (tensors and plain values only), or a one-line error naming the file: missing,
    truncated or corrupt, holding objects beyond tensors, or of another kind than expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind or 'the'} checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused to load, it holds objects beyond tensors and plain values "
                          f"(weights_only=True): {str(e).splitlines()[0]}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a cut-off zip archive, a file that is no checkpoint
        raise ConfigError(f"{path}: not a readable checkpoint, truncated or corrupt "
                          f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: not a sorabench checkpoint (holds a {type(ckpt).__name__})")
    found = ckpt.get("sorabench_kind")
    if kind is not None and found != kind:
        raise ConfigError(f"{path} is a {found or 'non-sorabench'} checkpoint, expected a {kind} checkpoint")
    return ckpt


def load_checkpoint_module(cls, path: str | Path, kind: str):
    """Load a LightningModule checkpoint of the expected kind, with a clear error for a missing or wrong file."""
    read_checkpoint(path, kind)
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class TagCheckpointKind(L.Callback):
    """Writes `sorabench_kind` into every checkpoint so a VAE checkpoint given as a DiT is caught at load time."""

    def __init__(self, kind: str):
        self.kind = kind

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["sorabench_kind"] = self.kind


class EmbedVAE(L.Callback):
    """Writes the VAE that decodes a DiT's latents into every DiT checkpoint (its weights, its hyperparameters and
    two SHA-256s: of the VAE checkpoint file, the identity that keys the latent caches, and of the weights, checked
    on load), so `sample`/`evaluate` need only the DiT checkpoint, from any directory and on any machine. The VAE is
    small (a few MB) next to what a lost or moved VAE file costs."""

    def __init__(self, vae_ckpt: str | Path, vae):
        from sorabench.metrics.features import file_sha256, state_dict_sha256

        self.embedded = {"state_dict": {k: v.detach().cpu().clone() for k, v in vae.state_dict().items()},
                         "hyper_parameters": dict(vae.hparams), "file_sha256": file_sha256(vae_ckpt),
                         "weights_sha256": state_dict_sha256(vae), "source": str(vae_ckpt)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["sorabench_vae"] = self.embedded


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
    """`sorabench encode vae_ckpt=<ckpt> data=<...> splits=[train,val]`: write the latent caches."""
    vae = load_vae(cfg.vae_ckpt)
    data = to_container(cfg.data)
    for split in cfg.splits:
        key = cache_key(cfg.vae_ckpt, data, split)
        existed = cache_path(cfg.cache_dir, key).is_file()
        t0 = time.time()
        cache = load_or_encode(vae, cfg.vae_ckpt, data, split, cfg.cache_dir)
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
    require(cfg.get("budget", "steps") in ("steps", "flops"), "budget", cfg.get("budget"), "must be steps or flops")
    require(cfg.trainer.max_steps > 0 or cfg.trainer.fast_dev_run, "trainer.max_steps", cfg.trainer.max_steps,
            "must be > 0")
    if cfg.evaluate.enabled or cfg.evaluate.every_n_steps:
        from sorabench.metrics.evaluate import check_guidance_axis, check_metrics_config

        check_guidance_axis(cfg.metrics)
        check_metrics_config(cfg)
    from sorabench.models.dit import check_patch_size
    from sorabench.models.vae import build_vae

    data = dataset_config(to_container(cfg.data))
    if cfg.data.name == "folder":  # index and probe the user's files now (cheap), not minutes into training
        for split in ("train", "val"):
            build_dataset(to_container(cfg.data), split)
    evaluating = cfg.evaluate.enabled or cfg.evaluate.every_n_steps
    if evaluating and cfg.metrics.features == "evaluator" and cfg.data.name != "shapes":
        raise ConfigError(f"metrics=evaluator needs data=shapes (its attribute labels); with data={cfg.data.name} use "
                          "metrics=i3d (standard FVD), metrics=torchscript (your feature network files) or "
                          "evaluate.enabled=false")
    try:
        latent = build_vae(**to_container(cfg.vae.model)).latent_shape(data.num_frames, data.height, data.width)
    except ValueError as e:
        raise ConfigError(f"data.num_frames/height/width vs vae: {e}") from e
    try:
        check_patch_size(latent[1:], tuple(cfg.dit.patch_size))
    except ValueError as e:
        raise ConfigError(f"dit.patch_size={list(cfg.dit.patch_size)}: {e}") from e
    if cfg.mlflow.enabled:  # last: the only check that may reach out to a server
        check_tracking_uri(cfg.mlflow.tracking_uri)


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

    # Callbacks run in list order, and the EMA callback swaps the training weights back in its own
    # `on_validation_epoch_end`: everything that samples with the validated (EMA) weights comes before it.
    callbacks = [TagCheckpointKind("dit"), SeedPerRank(cfg.seed)]
    if cfg.sample.log_every_n_val > 0 and cfg.mlflow.enabled:
        callbacks.append(LogSampleVideos(val_cache, to_container(cfg.sample)))
    if cfg.evaluate.every_n_steps:
        from sorabench.metrics.evaluate import EvaluateCallback

        callbacks.append(EvaluateCallback(cfg, every_n_steps=cfg.evaluate.every_n_steps))
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=cfg.ema.decay, start_step=cfg.ema.start_step))
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
    if cfg.budget == "flops":  # equal training FLOPs: max_steps scaled by forward GFLOPs at real caption lengths
        from sorabench.training.dit_module import flops_budget_steps

        with open_dict(cfg):
            cfg.trainer.max_steps = flops_budget_steps(module, train_cache["captions"], cfg.budget_reference,
                                                       int(cfg.trainer.max_steps))
    from sorabench.models.conditioning import strategy_label

    label = strategy_label(cfg.conditioning.name, cfg.conditioning.get("timestep"))
    logger = make_logger(cfg, tags={**(tags or {}), "sorabench.strategy": label},
                         parent_run_id=parent_run_id)
    callbacks = [EmbedVAE(vae_ckpt, vae), *training_callbacks(cfg, val_cache), *callbacks]
    trainer = build_trainer(cfg, logger, callbacks, monitor="val/loss")
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


def prepare_shared_assets(cfg: DictConfig, caches: bool = False):
    """Train what every trial of a sweep shares (VAE, evaluator) before the trials start; with `caches`, also
    encode the latent caches and embed the captions, so that workers running trials at once only read them."""
    validate_train_config(cfg)
    vae_ckpt = ensure_vae(cfg)
    if caches:
        vae, data = load_vae(vae_ckpt), to_container(cfg.data)
        captions = []
        for split in ("train", "val"):
            captions += load_or_encode(vae, vae_ckpt, data, split, cfg.cache_dir)["captions"]
        if cfg.text_encoder.name != "learned":
            from sorabench.training.dit_module import frozen_text_encoder

            text_cfg = {k: v for k, v in to_container(cfg.text_encoder).items() if k != "name"}
            frozen_text_encoder(cfg.text_encoder.name, **text_cfg).precompute(captions, cache_dir=cfg.cache_dir)
    evaluating = cfg.evaluate.enabled or cfg.evaluate.every_n_steps
    if evaluating and (cfg.metrics.features == "evaluator" or cfg.data.name == "shapes"):
        from sorabench.metrics.evaluate import ensure_evaluator

        ensure_evaluator(cfg)


def embedded_vae(embedded: dict, path: str | Path):
    """The VAE a DiT checkpoint carries (`EmbedVAE`), after checking its weights against their SHA-256."""
    from sorabench.metrics.features import state_dict_sha256
    from sorabench.training.vae_module import VAEModule

    vae = VAEModule(**embedded["hyper_parameters"])
    vae.load_state_dict(embedded["state_dict"])
    found = state_dict_sha256(vae)
    if found != embedded["weights_sha256"]:
        raise ConfigError(f"{path}: the embedded VAE's weights have SHA-256 {found[:12]}..., the checkpoint records "
                          f"{embedded['weights_sha256'][:12]}...: the file is corrupt or was edited")
    return vae.eval()


def load_dit(path: str | Path) -> DiTModule:
    """A DiT checkpoint with its VAE attached: the embedded one, or (checkpoints from before embedding) the VAE
    checkpoint its hyperparameters name."""
    ckpt = read_checkpoint(path, "dit")
    module = DiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    if "sorabench_vae" in ckpt:
        module.attach_vae(embedded_vae(ckpt["sorabench_vae"], path))
    else:
        vae_ckpt = Path(module.hparams.vae_ckpt)
        if not vae_ckpt.is_file():
            raise FileNotFoundError(f"{path} names its VAE checkpoint {vae_ckpt}, which does not exist from "
                                    f"{Path.cwd()} (checkpoints written since the VAE is embedded need no such file)")
        module.attach_vae(load_vae(vae_ckpt))
    return module


def warn_truncated_prompts(module: DiTModule, prompts: list[str]):
    """Say so when a prompt is longer than the text encoder reads (text_encoder.max_length tokens): the rest is cut."""
    import sys

    limit = int(module.hparams.text_encoder.get("max_length", 32))
    for p in sorted(set(prompts)):
        if module.learned_text is not None:
            n = 1 + len(module.learned_text.words(p))  # [CLS] + words
        else:
            n = len(module.frozen_text().tokenizer(p)["input_ids"])
        if n > limit:
            print(f"warning: prompt {p[:40]!r}... is {n} tokens long; the text encoder reads only the first {limit} "
                  f"(text_encoder.max_length of this checkpoint), the rest is ignored", file=sys.stderr)


def sample(cfg: DictConfig) -> int:
    """`sorabench sample ckpt=... prompt="..." n=4 steps=25 cfg=4 seed=0 out=<dir>`: mp4 and gif per clip."""
    from sorabench.data.video_io import write_gif, write_video

    require(cfg.cfg >= 0, "cfg", cfg.cfg, "the guidance scale must be >= 0")
    require(cfg.n >= 1 and cfg.steps >= 1, "n/steps", (cfg.n, cfg.steps), "must be >= 1")
    prompts = [cfg.prompt] * cfg.n if isinstance(cfg.prompt, str) else list(cfg.prompt)
    for p in prompts:
        require(isinstance(p, str) and p.strip() != "", "prompt", p,
                "is empty: give a caption, e.g. prompt=\"a red circle moving left\" (an empty caption is not the "
                "model's learned unconditional (null) condition)")
    module = load_dit(cfg.ckpt)
    warn_truncated_prompts(module, prompts)
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

