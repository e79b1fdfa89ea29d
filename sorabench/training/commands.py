"""The training commands: `train-vae`, `encode`, `train`, `sample`, `train-evaluator`.

Shared assets are trained once and found again by a key of their config: the VAE (`vae_ckpt: auto`) under
`outputs/train_vae/auto-<key>` and the evaluator under `outputs/train_evaluator/auto-<key>`. Every run resumes from
its `last.ckpt` when started again with the same command, and a finished run (a `result.json` beside it) returns
its recorded result instead of training again (run directories and checkpoints: `sorabench.training.runs`).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, open_dict
from rich.console import Console

from sorabench.config import ConfigError, require, to_container
from sorabench.data.module import (
    SkippedSamplesReport,
    VideoDataModule,
    attribute_schema,
    check_dataset,
    clip_fields,
    dataset_config,
)
from sorabench.data.video_io import write_clips
from sorabench.files import atomic_save
from sorabench.latents import LatentDataModule, cache_key, cache_path, load_or_encode
from sorabench.models.text import frozen_text_encoder, is_frozen
from sorabench.models.vae import build_vae
from sorabench.pipeline import TextToVideo
from sorabench.tracking import check_tracking_uri, make_logger
from sorabench.training.dit_module import DiTModule, LogSampleVideos, flops_budget_steps
from sorabench.training.evaluator_module import ensure_evaluator, run_evaluator_training
from sorabench.training.runs import (
    EmbedVAE,
    TagCheckpointKind,
    finished_result,
    load_pipeline,
    load_vae,
    shared_asset_config,
    train_shared_asset,
    write_result,
)
from sorabench.training.trainer import EMA, SeedPerRank, build_trainer, fit, last_checkpoint, pin_precision
from sorabench.training.vae_module import VAEModule

console = Console()


# ---- VAE -------------------------------------------------------------------------------------------------------


def build_vae_module(cfg: DictConfig):
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


def evaluating(cfg: DictConfig) -> bool:
    """Whether this run evaluates: after training (`evaluate.enabled`) or during it (`evaluate.every_n_steps`)."""
    return bool(cfg.evaluate.enabled or cfg.evaluate.every_n_steps)


MAX_CUT_SHARE = 0.01  # of the training captions: more cut by the text encoder's max_length is an error


def check_caption_lengths(cfg: DictConfig):
    """`shapes` captions against the frozen text encoder's `max_length`: a cut caption loses its last clause, so a
    model would be asked to draw an object its text never names (3 objects need ~48 MiniLM word pieces)."""
    if cfg.data.name != "shapes" or cfg.data.get("num_objects", 1) == 1 or not is_frozen(cfg.text_encoder.name):
        return  # single-object captions are ~20 word pieces
    from sorabench.data.shapes import split_captions

    encoder = frozen_text_encoder(**to_container(cfg.text_encoder))
    lengths = [encoder.num_tokens(c) for c in split_captions(dataset_config(to_container(cfg.data)), "train")]
    limit, cut = int(cfg.text_encoder.max_length), sum(n > int(cfg.text_encoder.max_length) for n in lengths)
    if cut > MAX_CUT_SHARE * len(lengths):
        raise ConfigError(f"text_encoder.max_length={limit} cuts {cut} of {len(lengths)} training captions of "
                          f"data.num_objects={cfg.data.num_objects} (the longest is {max(lengths)} word pieces): set "
                          f"text_encoder.max_length={max(lengths)} or more")


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
    from sorabench.precision import check_precision

    check_precision(cfg.trainer.precision)
    if evaluating(cfg):
        from sorabench.metrics.evaluate import check_guidance_axis, check_metrics_config

        check_guidance_axis(cfg.metrics)
        check_metrics_config(cfg)
    from sorabench.models.dit import check_patch_size

    data = dataset_config(to_container(cfg.data))
    check_dataset(to_container(cfg.data))  # e.g. a folder indexes and probes its files now, not minutes into training
    check_caption_lengths(cfg)
    labelled = bool(attribute_schema(to_container(cfg.data)))  # the evaluator needs the dataset's attribute labels
    if evaluating(cfg) and cfg.metrics.features == "evaluator" and not labelled:
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
    # The DiT itself, built once on that latent (milliseconds): a bad strategy option (conditioning.timestep=bogus)
    # fails here, before the shared VAE trains, not minutes later.
    try:
        build_dit_module(cfg, latent, vocab=None, vae_ckpt=None)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"conditioning={cfg.conditioning.name} / dit: {e}") from e
    if cfg.get("budget") == "flops":
        from sorabench.config import CONF_DIR

        ref = cfg.get("budget_reference")
        require((CONF_DIR / "conditioning" / f"{ref}.yaml").is_file(), "budget_reference", ref,
                "names no conditioning (conf/conditioning/<name>.yaml)")
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


def training_callbacks(cfg: DictConfig, val_cache: dict, vae=None) -> list:
    # Callbacks run in list order, and the EMA callback swaps the training weights back in its own
    # `on_validation_epoch_end`: everything that samples with the validated (EMA) weights comes before it.
    callbacks = [TagCheckpointKind("dit"), SeedPerRank(cfg.seed)]
    if cfg.sample.log_every_n_val > 0 and cfg.mlflow.enabled:
        callbacks.append(LogSampleVideos(val_cache, to_container(cfg.sample), vae))
    if cfg.evaluate.every_n_steps:
        from sorabench.metrics.evaluate import EvaluateCallback

        callbacks.append(EvaluateCallback(cfg, every_n_steps=cfg.evaluate.every_n_steps, vae=vae))
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
    pin_precision(cfg)  # printed, logged as a param and tagged; the shared VAE and evaluator resolve their own
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
    frozen_text = None
    if is_frozen(cfg.text_encoder.name):  # every caption embedded once, kept on disk beside the latents
        frozen_text = frozen_text_encoder(**to_container(cfg.text_encoder))
        frozen_text.precompute([*train_cache["captions"], *val_cache["captions"]], cache_dir=cfg.cache_dir)
    if evaluating(cfg) and cfg.metrics.get("evaluator_min_accuracy") is not None:
        ensure_evaluator(cfg)  # the instrument's floor is checked before the DiT trains, not at its first evaluation
    L.seed_everything(cfg.seed, workers=True)  # model init independent of how much the caching consumed
    module = build_dit_module(cfg, train_cache["mean"].shape[1:], vocab, vae_ckpt)
    if cfg.budget == "flops":  # equal training FLOPs: max_steps scaled by forward GFLOPs at real caption lengths
        with open_dict(cfg):
            cfg.trainer.max_steps = flops_budget_steps(module, train_cache["captions"], cfg.budget_reference,
                                                       int(cfg.trainer.max_steps))
    from sorabench.models.conditioning import strategy_label

    label = strategy_label(cfg.conditioning.name, cfg.conditioning.get("timestep"))
    logger = make_logger(cfg, tags={**(tags or {}), "sorabench.strategy": label},
                         parent_run_id=parent_run_id)
    callbacks = [EmbedVAE(vae_ckpt, vae), *training_callbacks(cfg, val_cache, vae), *callbacks]
    trainer = build_trainer(cfg, logger, callbacks, monitor="val/loss")
    t0 = time.time()
    fit(trainer, module, LatentDataModule(train_cache, val_cache, cfg.data.batch_size, text_encoder=frozen_text),
        run_dir)
    train_seconds = time.time() - t0
    if trial is not None and trial.should_prune():
        import optuna

        raise optuna.TrialPruned(f"pruned at step {trainer.global_step} (val/loss)")
    if not trainer.is_global_zero:  # DDP: the other processes only helped train
        return {"run_id": None, "ckpt": str(last_checkpoint(run_dir)), "metrics": {}}
    metrics = {"time/train_seconds": train_seconds}
    if cfg.evaluate.enabled:
        from sorabench.metrics.evaluate import evaluate_module

        metrics.update(evaluate_module(module.pipeline(vae), cfg, logger, step=trainer.global_step))
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
        if is_frozen(cfg.text_encoder.name):
            frozen_text_encoder(**to_container(cfg.text_encoder)).precompute(captions, cache_dir=cfg.cache_dir)
    if evaluating(cfg) and (cfg.metrics.features == "evaluator" or attribute_schema(to_container(cfg.data))):
        ensure_evaluator(cfg)


def warn_truncated_prompts(pipeline: TextToVideo, prompts: list[str]):
    """Say so when a prompt is longer than the text encoder reads (text_encoder.max_length tokens): the rest is cut."""
    import sys

    limit = int(pipeline.text_encoder.max_length)
    for p in sorted(set(prompts)):
        n = pipeline.text_encoder.num_tokens(p)
        if n > limit:
            print(f"warning: prompt {p[:40]!r}... is {n} tokens long; the text encoder reads only the first {limit} "
                  f"(text_encoder.max_length of this checkpoint), the rest is ignored", file=sys.stderr)


def sample(cfg: DictConfig) -> int:
    """`sorabench sample ckpt=... prompt="..." n=4 steps=25 cfg=4 seed=0 out=<dir>`: mp4 and gif per clip."""
    require(cfg.cfg >= 0, "cfg", cfg.cfg, "the guidance scale must be >= 0")
    require(cfg.n >= 1 and cfg.steps >= 1, "n/steps", (cfg.n, cfg.steps), "must be >= 1")
    prompts = [cfg.prompt] * cfg.n if isinstance(cfg.prompt, str) else list(cfg.prompt)
    for p in prompts:
        require(isinstance(p, str) and p.strip() != "", "prompt", p,
                "is empty: give a caption, e.g. prompt=\"a red circle moving left\" (an empty caption is not the "
                "model's learned unconditional (null) condition)")
    pipeline = load_pipeline(cfg.ckpt)
    warn_truncated_prompts(pipeline, prompts)
    videos = pipeline.sample_videos(prompts, steps=cfg.steps, guidance_scale=cfg.cfg, seed=cfg.seed)
    out = Path(cfg.out)
    write_clips(out, videos, [f"sample_{i:02d}" for i in range(len(prompts))], prompts, scale=cfg.scale,
                sheet="samples.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    console.print(f"wrote {len(prompts)} samples (.mp4, .gif) and samples.png to {out}")
    return 0


# ---- evaluator --------------------------------------------------------------------------------------------------


def train_evaluator(cfg: DictConfig) -> int:
    run_evaluator_training(cfg)
    return 0

