"""Training the evaluator (`VideoAttributeClassifier`) on attribute labels: its LightningModule, the run that trains
it once per data config (`sorabench train-evaluator`, and the shared evaluator the metrics use), and loading it.

Batches are dicts with `video` (B, 3, T, H, W) in [-1, 1] and `labels` LongTensor (B, A), one column per attribute
in the order of `attributes`. The loss is the sum of one cross-entropy per attribute head.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sorabench.config import ConfigError, compose_config, require, to_container
from sorabench.data.module import VideoDataModule, attribute_schema, build_dataset, clip_fields
from sorabench.models.evaluator import VideoAttributeClassifier
from sorabench.tracking import make_logger
from sorabench.training.callbacks import TagCheckpointKind
from sorabench.training.runs import (
    finished_result,
    load_checkpoint_module,
    shared_asset_config,
    train_shared_asset,
    write_result,
)
from sorabench.training.trainer import build_trainer, fit, last_checkpoint, lr_schedule, pin_precision

console = Console(soft_wrap=True)
# Keys of a `metrics.evaluator` block that set up its training run, not the module: budget, batch, the data it trains
# on (`data`: overrides of the run's data, e.g. {position_range: 1.0} for wider starts than the DiT sees) and `seed`.
EVALUATOR_TRAINING_KEYS = ("max_steps", "batch_size", "data", "seed")


class EvaluatorModule(L.LightningModule):
    def __init__(
        self,
        attributes: dict[str, int],
        width: int = 32,
        feature_dim: int = 128,
        time_bins: int = 8,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 20,
        max_noise_std: float = 0.3,
    ):
        """`max_noise_std`: training clips get Gaussian noise with a per-clip std drawn from U(0, max_noise_std)
        ([-1, 1] units), so the evaluator still reads the attributes of noisy generated clips."""
        super().__init__()
        self.save_hyperparameters()
        self.net = VideoAttributeClassifier(attributes, width, feature_dim, time_bins)
        self.attribute_names = list(attributes)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(video)

    def _loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(self.attribute_names))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        noise_std = self.hparams.max_noise_std * torch.rand(video.shape[0], 1, 1, 1, 1, device=video.device)
        video = video + noise_std * torch.randn_like(video)
        loss = self._loss(self(video), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=video.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video, labels = batch["video"], batch["labels"]
        logits = self(video)
        correct = torch.stack(
            [logits[name].argmax(1) == labels[:, i] for i, name in enumerate(self.attribute_names)], dim=1
        )  # (B, A)
        n = video.shape[0]
        self.log("val/loss", self._loss(logits, labels), batch_size=n)
        for i, name in enumerate(self.attribute_names):
            self.log(f"val/acc/{name}", correct[:, i].float().mean(), batch_size=n)
        self.log("val/acc/all", correct.all(1).float().mean(), prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, self.trainer.estimated_stepping_batches)
        # Cosine decay to zero over the whole run (a short run needs its whole budget used well), from step 0: the
        # warm-up scales it rather than delaying it.
        lr_factor = lr_schedule(self.hparams.warmup_steps, total, decay_during_warmup=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---- the run that trains it --------------------------------------------------------------------------------


def evaluator_module_kwargs(cfg: DictConfig) -> dict:
    ev = to_container(cfg.metrics.evaluator)
    return {k: v for k, v in ev.items() if k not in EVALUATOR_TRAINING_KEYS}


def run_evaluator_training(cfg: DictConfig) -> Path:
    """Train the attribute classifier on `cfg.data` (train split) and report held-out accuracy per attribute."""
    run_dir = Path(cfg.run_dir)
    if finished_result(run_dir):
        return Path(finished_result(run_dir)["ckpt"])
    target = to_container(cfg.data)
    data = {**training_data(target, cfg.metrics.evaluator), "batch_size": cfg.metrics.evaluator.batch_size}
    attributes = attribute_schema(data)  # one head per attribute of the dataset's label schema
    require(bool(attributes), "data", cfg.data.name, "the evaluator trains on attribute labels: data=shapes")
    L.seed_everything(cfg.seed, workers=True)
    module = EvaluatorModule(attributes=attributes, **evaluator_module_kwargs(cfg))
    pin_precision(cfg)
    logger = make_logger(cfg)
    trainer = build_trainer(cfg, logger, [TagCheckpointKind("evaluator")], monitor="val/acc/all", mode="max")
    t0 = time.time()
    # The evaluator is the measuring instrument, not the model under test: it also trains on the held-out
    # compositions, so it reads unseen prompts' clips as well as seen ones.
    fit(trainer, module, VideoDataModule(data, train_splits=("train", "unseen"), build=evaluator_dataset), run_dir)
    accuracy = {"test": held_out_accuracy(module, data, "test")}
    columns = ["held-out test clips (seen + unseen compositions)"]
    if clip_fields(data) != clip_fields(target):  # trained on other (wider) data: also read the run's own data
        accuracy["target"] = held_out_accuracy(module, target, "test")
        columns = ["test clips of the data it trained on", "test clips of the run's data (what it will read)"]
    table = Table("attribute", *columns, title="evaluator accuracy")
    for name in [*module.attribute_names, "all"]:
        table.add_row(name, *(f"{acc[name]:.3f}" for acc in accuracy.values()))
    console.print(table)
    if logger is not None:
        logger.log_metrics({f"heldout/{split}/acc_{k}": v for split, acc in accuracy.items() for k, v in acc.items()})
    ckpt = last_checkpoint(run_dir)
    write_result(run_dir, {"ckpt": str(ckpt), "accuracy": accuracy, "train_seconds": time.time() - t0})
    return ckpt


def training_data(data_cfg: dict, evaluator) -> dict:
    """The data an evaluator trains on: the run's, with the block's `data` overrides on top (keys of `data`).
    A typo'd key is an error here: it would otherwise train on the run's own data without a word."""
    overrides = evaluator.get("data") or {}
    overrides = to_container(overrides) if OmegaConf.is_config(overrides) else dict(overrides)
    unknown = sorted(set(overrides) - set(data_cfg))
    require(not unknown, "metrics.evaluator.data", overrides, f"{unknown} are not keys of data={data_cfg.get('name')}")
    return {**data_cfg, **overrides}


def evaluator_dataset(data_cfg: dict, split: str) -> torch.utils.data.Dataset:
    """The evaluator's clips: the data's own, or with several objects per clip (the binding task) every object's
    colour layer with its own labels (`sorabench.metrics.binding.ObjectLayers`), which is what the binding metric
    gives the evaluator to read."""
    dataset = build_dataset(data_cfg, split, train=False)
    if int(data_cfg.get("num_objects", 1)) > 1:
        from sorabench.metrics.binding import ObjectLayers

        dataset = ObjectLayers(dataset)
    return dataset


@torch.no_grad()
def held_out_accuracy(module, data_cfg: dict, split: str) -> dict[str, float]:
    dataset = evaluator_dataset(data_cfg, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    module.eval()
    names, correct = module.attribute_names, []
    for batch in loader:
        logits = module(batch["video"].to(module.device))
        correct.append(torch.stack([logits[n].argmax(1).cpu() == batch["labels"][:, i]
                                    for i, n in enumerate(names)], dim=1))
    c = torch.cat(correct)
    return {**{n: float(c[:, i].float().mean()) for i, n in enumerate(names)}, "all": float(c.all(1).float().mean())}


def evaluator_settings(cfg: DictConfig, block: str = "evaluator") -> dict:
    """The settings of `block`: `evaluator` (the accuracy instrument), or `feature_evaluator` (the network behind
    FVD/FID/KID when it must be independent of the instrument: the evaluator's settings with the block's on top,
    e.g. {seed: 1, data: {position_range: 1.0}})."""
    # metrics=torchscript has no `evaluator` block: alignment on `shapes` still uses the default evaluator.
    evaluator = to_container(cfg.metrics.get("evaluator") or compose_config("train_evaluator", []).metrics.evaluator)
    if block == "evaluator":
        return evaluator
    extra = cfg.metrics.get(block)
    require(extra is not None and OmegaConf.is_dict(extra), f"metrics.{block}", extra,
            "must be a block of evaluator settings, e.g. {seed: 1, data: {position_range: 1.0}}")
    unknown = sorted(set(extra) - set(evaluator) - {"data", "seed"})
    require(not unknown, f"metrics.{block}", to_container(extra), f"{unknown} are not evaluator settings")
    return {**evaluator, **to_container(extra)}


def ensure_evaluator(cfg: DictConfig, block: str = "evaluator") -> Path:
    """The checkpoint of `block` (`evaluator_settings`): `metrics.evaluator_checkpoint` for the instrument, or one
    trained once per data config and settings (and cached under a key of both)."""
    if block == "evaluator" and cfg.metrics.get("evaluator_checkpoint"):
        path = Path(cfg.metrics.evaluator_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"metrics.evaluator_checkpoint={str(path)!r} does not exist")
        return path
    evaluator = evaluator_settings(cfg, block)
    data = to_container(cfg.data)
    training_data(data, evaluator)  # a bad `data` override fails now, in one line
    settings = {"metrics.evaluator": evaluator, "trainer.max_steps": evaluator["max_steps"]}
    if evaluator.get("seed") is not None:
        settings["seed"] = int(evaluator["seed"])
    # With several objects per clip (the binding task) the evaluator trains on every object's colour layer of the
    # task's own clips (`evaluator_dataset`): one evaluator per data config, as for one object. The key leaves out
    # empty `data` and unset `seed`, so the instrument's cache stays where it was before they existed.
    key = {k: v for k, v in evaluator.items() if not (k == "data" and not v) and not (k == "seed" and v is None)}
    sub = shared_asset_config(cfg, "train_evaluator", (clip_fields(data), key), settings)
    what = "evaluator" if block == "evaluator" else f"{block} (FVD/FID/KID features)"
    ckpt = train_shared_asset(sub, run_evaluator_training, what)
    if block == "evaluator":
        check_instrument(finished_result(sub.run_dir), cfg.metrics.get("evaluator_min_accuracy"), sub.run_dir)
    return ckpt


def check_instrument(result: dict | None, floor: float | None, run_dir) -> None:
    """`metrics.evaluator_min_accuracy`: every attribute of the evaluator must read the held-out test clips at least
    this well, or nothing it measures is used - a run that would score generated clips with a weak instrument fails
    with one line instead. Checked each time the evaluator is used (trained now or found cached)."""
    if floor is None or result is None:
        return
    # what it reads of the run's own data (`target`) when it trained on other data, else its held-out test clips
    accuracy = result["accuracy"].get("target", result["accuracy"]["test"])
    weak = {k: v for k, v in accuracy.items() if k != "all" and v < float(floor)}
    if weak:
        worst = ", ".join(f"{k} {v:.3f}" for k, v in sorted(weak.items(), key=lambda kv: kv[1]))
        raise ConfigError(f"metrics.evaluator_min_accuracy={floor}: the evaluator in {run_dir} reads held-out test "
                           f"clips at {worst}; train it longer (metrics.evaluator.max_steps) or lower the floor")


def load_evaluator(path: str | Path):
    return load_checkpoint_module(EvaluatorModule, path, "evaluator").eval()
