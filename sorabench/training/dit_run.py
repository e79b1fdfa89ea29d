"""A DiT training run: validate the config, train on cached latents, evaluate; what `sorabench train` and every sweep
trial call (`train`), and what a sweep trains once before its trials (`prepare_shared_assets`).

Shared assets are trained once and found again by a key of their config: the VAE (`vae_ckpt: auto`,
`sorabench.training.vae_run`) and the evaluator (`sorabench.training.evaluator_module`). A run resumes from its
`last.ckpt` when started again, and a finished run (a `result.json` beside it) returns its recorded result instead
of training again (`sorabench.training.runs`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import lightning as L
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from rich.console import Console

from sorabench.config import ConfigError, compose_config, require, to_container
from sorabench.data.module import check_dataset, dataset_config
from sorabench.latents import LatentDataModule, load_or_encode
from sorabench.models.text import frozen_text_encoder, is_frozen
from sorabench.models.vae import build_vae
from sorabench.tracking import check_tracking_uri, make_logger
from sorabench.training.callbacks import (
    EMA,
    EmbedVAE,
    EvaluateCallback,
    LogSampleVideos,
    SeedPerRank,
    TagCheckpointKind,
)
from sorabench.training.dit_module import DiTModule, flops_budget_steps
from sorabench.training.evaluator_module import ensure_evaluator
from sorabench.training.runs import finished_result, load_vae, write_result
from sorabench.training.trainer import build_trainer, fit, last_checkpoint, pin_precision
from sorabench.training.vae_run import ensure_vae

console = Console()


def evaluating(cfg: DictConfig) -> bool:
    """Whether this run evaluates: after training (`evaluate.enabled`) or during it (`evaluate.every_n_steps`)."""
    return bool(cfg.evaluate.enabled or cfg.evaluate.every_n_steps)


# ---- the config, checked before anything is rendered or trained ------------------------------------------------

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


def budget_reference(cfg: DictConfig) -> dict:
    """`budget=flops`: the conditioning config that `budget_reference` names, composed as `conditioning=<name>` is
    (the run's plugins and their configs included)."""
    ref = cfg.get("budget_reference")
    plugins = [f"plugins=[{','.join(cfg.plugins)}]"] if cfg.get("plugins") else []
    try:
        return to_container(compose_config("train", [f"conditioning={ref}", *plugins], command="train").conditioning)
    except HydraException as e:  # no such option, or not a name at all
        raise ConfigError(f"budget_reference={ref!r}: names no conditioning (conf/conditioning/<name>.yaml)") from e


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
    if evaluating(cfg):  # metrics=evaluator on unlabelled data included (metrics.evaluator_on_other_data)
        from sorabench.metrics.evaluate import check_guidance_axis, check_metrics_config

        check_guidance_axis(cfg.metrics)
        check_metrics_config(cfg)
    from sorabench.models.dit import check_patch_size

    data = dataset_config(to_container(cfg.data))
    check_dataset(to_container(cfg.data))  # e.g. a folder indexes and probes its files now, not during training
    check_caption_lengths(cfg)
    try:
        latent = build_vae(**to_container(cfg.vae.model)).latent_shape(data.num_frames, data.height, data.width)
    except ValueError as e:
        raise ConfigError(f"data.num_frames/height/width vs vae: {e}") from e
    try:
        check_patch_size(latent[1:], tuple(cfg.dit.patch_size))
    except ValueError as e:
        raise ConfigError(f"dit.patch_size={list(cfg.dit.patch_size)}: {e}") from e
    # The DiT itself, built once on that latent (milliseconds): a bad strategy option (conditioning.timestep=bogus)
    # fails here, before the shared VAE trains.
    try:
        build_dit_module(cfg, latent, vocab=None, vae_ckpt=None)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"conditioning={cfg.conditioning.name} / dit: {e}") from e
    if cfg.get("budget") == "flops":
        budget_reference(cfg)
    if cfg.mlflow.enabled:  # last: the only check that may reach out to a server
        check_tracking_uri(cfg.mlflow.tracking_uri)


# ---- the run -----------------------------------------------------------------------------------------------------


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


def evaluate(cfg: DictConfig, vae, module: DiTModule, logger, step: int) -> dict[str, float]:
    """Score the weights `module` holds now (the EMA average at validation and after training), decoded by `vae`."""
    from sorabench.metrics.evaluate import evaluate_module

    return evaluate_module(module.pipeline(vae), cfg, logger, step=step)


def training_callbacks(cfg: DictConfig, val_cache: dict, vae=None) -> list:
    # Callbacks run in list order, and the EMA callback swaps the training weights back in its own
    # `on_validation_epoch_end`: everything that samples with the validated (EMA) weights comes before it.
    callbacks = [TagCheckpointKind("dit"), SeedPerRank(cfg.seed)]
    if cfg.sample.log_every_n_val > 0 and cfg.mlflow.enabled:
        callbacks.append(LogSampleVideos(val_cache, to_container(cfg.sample), vae))
    if cfg.evaluate.every_n_steps:
        callbacks.append(EvaluateCallback(partial(evaluate, cfg, vae), cfg.evaluate.every_n_steps,
                                          final_follows=bool(cfg.evaluate.enabled)))
    if cfg.ema.enabled:
        callbacks.append(EMA(decay=cfg.ema.decay, start_step=cfg.ema.start_step))
    return callbacks


class Inputs(NamedTuple):
    """What a DiT trains on, read or made once: the VAE, the latent caches, the text side."""
    vae_ckpt: Path
    vae: object
    train_cache: dict
    val_cache: dict
    vocab: list[str] | None  # the learned text encoder's
    frozen_text: object | None  # the frozen text encoder, every caption embedded


def training_inputs(cfg: DictConfig) -> Inputs:
    """The shared VAE (trained once if needed), the train and val latent caches, and the text side: the learned
    encoder's vocabulary, or the frozen encoder with every caption embedded once (kept on disk beside the latents)."""
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
    if is_frozen(cfg.text_encoder.name):
        frozen_text = frozen_text_encoder(**to_container(cfg.text_encoder))
        frozen_text.precompute([*train_cache["captions"], *val_cache["captions"]], cache_dir=cfg.cache_dir)
    return Inputs(vae_ckpt, vae, train_cache, val_cache, vocab, frozen_text)


def train(cfg: DictConfig, parent_run_id=None, callbacks=(), tags=None, trial=None, guard=None) -> dict:
    """Train the DiT of `cfg` on cached latents, then evaluate it; returns {run_id, ckpt, metrics}. `tags` go on
    the MLflow run; the strategy tag is train's own unless the caller gives one. `guard` (a sweep trial's
    `CellLease`) is checked before the final evaluation and result.json, and guards the MLflow logger."""
    validate_train_config(cfg)
    run_dir = Path(cfg.run_dir)
    if finished_result(run_dir):
        console.print(f"{run_dir} already finished; reusing its result")
        return finished_result(run_dir)
    pin_precision(cfg)  # printed, logged as a param and tagged; the shared VAE and evaluator resolve their own
    L.seed_everything(cfg.seed, workers=True)
    inputs = training_inputs(cfg)
    if evaluating(cfg) and cfg.metrics.get("evaluator_min_accuracy") is not None:
        ensure_evaluator(cfg)  # the instrument's floor is checked before the DiT trains, not at its first evaluation
    L.seed_everything(cfg.seed, workers=True)  # model init independent of how much the caching consumed
    module = build_dit_module(cfg, inputs.train_cache["mean"].shape[1:], inputs.vocab, inputs.vae_ckpt)
    if cfg.budget == "flops":  # equal training FLOPs: max_steps scaled by forward GFLOPs at real caption lengths
        with open_dict(cfg):
            cfg.trainer.max_steps = flops_budget_steps(module, inputs.train_cache["captions"], budget_reference(cfg),
                                                       int(cfg.trainer.max_steps))
    from sorabench.models.conditioning import strategy_label

    label = strategy_label(cfg.conditioning.name, cfg.conditioning.get("timestep"))
    logger = make_logger(cfg, tags={"sorabench.strategy": label, **(tags or {})}, parent_run_id=parent_run_id)
    if guard is not None:
        logger = guard.wrap_logger(logger)
    callbacks = [EmbedVAE(inputs.vae_ckpt, inputs.vae), *training_callbacks(cfg, inputs.val_cache, inputs.vae),
                 *callbacks]
    trainer = build_trainer(cfg, logger, callbacks, monitor="val/loss")
    t0 = time.time()
    fit(trainer, module, LatentDataModule(inputs.train_cache, inputs.val_cache, cfg.data.batch_size,
                                          text_encoder=inputs.frozen_text), run_dir)
    train_seconds = time.time() - t0
    if trial is not None and trial.should_prune():
        import optuna

        raise optuna.TrialPruned(f"pruned at step {trainer.global_step} (val/loss)")
    if not trainer.is_global_zero:  # DDP: the other processes only helped train
        return {"run_id": None, "ckpt": str(last_checkpoint(run_dir)), "metrics": {}}
    metrics = {"time/train_seconds": train_seconds}
    if guard is not None:
        guard.check(force=True)
    if cfg.evaluate.enabled:
        metrics.update(evaluate(cfg, inputs.vae, module, logger, trainer.global_step))
    for k, v in trainer.callback_metrics.items():
        metrics.setdefault(k, float(v))
    if logger is not None:
        logger.log_metrics({"time/train_seconds": train_seconds}, step=trainer.global_step)
    result = {"run_id": getattr(logger, "run_id", None), "ckpt": str(last_checkpoint(run_dir)), "metrics": metrics,
              "world_size": trainer.world_size}
    if guard is not None:
        guard.check(force=True)
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
    from sorabench.metrics.evaluate import uses_evaluator

    if evaluating(cfg) and uses_evaluator(cfg):
        ensure_evaluator(cfg)
    if evaluating(cfg) and cfg.metrics.features == "evaluator" and cfg.metrics.get("feature_evaluator"):
        ensure_evaluator(cfg, "feature_evaluator")
