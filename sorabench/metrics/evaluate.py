"""`sorabench evaluate` and `sorabench train-evaluator`: FVD, FID, KID and text–video alignment with a pinned protocol.

- `evaluate_module(dit_module, cfg, logger, step)` samples clips for prompts of the eval split (seen and unseen
  compositions), computes FVD (clips), FID and KID (frames) against real clips of that split, and the alignment of
  each sample with its prompt as read by the evaluator; every number is logged with its protocol beside it.
  `EvaluateCallback` runs it every N training steps (FVD vs step).
- `sorabench evaluate ckpt=<dit checkpoint>` does the same for a checkpoint and logs into that run's MLflow entry;
  `sorabench evaluate real_root=<dir> fake_root=<dir>` compares two folders of videos.
- The evaluator (the embedded default feature network) is trained once per data config and cached.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from sorabench.config import ConfigError, compose_config, config_key, require, to_container
from sorabench.data.module import build_dataset, clip_fields
from sorabench.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTES
from sorabench.metrics.alignment import attribute_accuracy
from sorabench.metrics.features import build_feature_networks
from sorabench.metrics.fvd import (
    FrechetVideoDistance,
    clips_to_frames,
    frame_fid,
    frame_kid,
    load_real_statistics,
    save_real_statistics,
)
from sorabench.training.trainer import build_trainer, fit, last_checkpoint

console = Console(soft_wrap=True)
EVALUATOR_TRAINING_KEYS = ("max_steps", "batch_size")


# ---- the evaluator ---------------------------------------------------------------------------------------------


def evaluator_module_kwargs(cfg: DictConfig) -> dict:
    ev = to_container(cfg.metrics.evaluator)
    return {k: v for k, v in ev.items() if k not in EVALUATOR_TRAINING_KEYS}


def run_evaluator_training(cfg: DictConfig) -> Path:
    """Train the attribute classifier on `cfg.data` (train split) and report held-out accuracy per attribute."""
    from sorabench.data.module import VideoDataModule
    from sorabench.tracking import make_logger
    from sorabench.training.commands import TagCheckpointKind, finished_result, write_result
    from sorabench.training.evaluator_module import EvaluatorModule

    run_dir = Path(cfg.run_dir)
    if finished_result(run_dir):
        return Path(finished_result(run_dir)["ckpt"])
    require(cfg.data.name == "shapes", "data", cfg.data.name, "the evaluator trains on attribute labels: data=shapes")
    L.seed_everything(cfg.seed, workers=True)
    attributes = {name: len(values) for name, values in ATTRIBUTES.items()}
    module = EvaluatorModule(attributes=attributes, **evaluator_module_kwargs(cfg))
    data = {**to_container(cfg.data), "batch_size": cfg.metrics.evaluator.batch_size}
    logger = make_logger(cfg)
    trainer = build_trainer(cfg, logger, [TagCheckpointKind("evaluator")], monitor="val/acc/all", mode="max")
    t0 = time.time()
    # The evaluator is the measuring instrument, not the model under test: it also trains on the held-out
    # compositions, so it reads unseen prompts' clips as well as seen ones.
    fit(trainer, module, VideoDataModule(data, train_splits=("train", "unseen")), run_dir)
    accuracy = {split: held_out_accuracy(module, data, split) for split in ("test",)}
    table = Table("attribute", "held-out test clips (seen + unseen compositions)", title="evaluator accuracy")
    for name in [*ATTRIBUTE_NAMES, "all"]:
        table.add_row(name, f"{accuracy['test'][name]:.3f}")
    console.print(table)
    if logger is not None:
        logger.log_metrics({f"heldout/{split}/acc_{k}": v for split, acc in accuracy.items() for k, v in acc.items()})
    ckpt = last_checkpoint(run_dir)
    write_result(run_dir, {"ckpt": str(ckpt), "accuracy": accuracy, "train_seconds": time.time() - t0})
    return ckpt


@torch.no_grad()
def held_out_accuracy(module, data_cfg: dict, split: str) -> dict[str, float]:
    dataset = build_dataset(data_cfg, split, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    module.eval()
    correct = []
    for batch in loader:
        logits = module(batch["video"].to(module.device))
        correct.append(torch.stack([logits[n].argmax(1).cpu() == batch["labels"][:, i]
                                    for i, n in enumerate(ATTRIBUTE_NAMES)], dim=1))
    c = torch.cat(correct)
    return {**{n: float(c[:, i].float().mean()) for i, n in enumerate(ATTRIBUTE_NAMES)}, "all": float(c.all(1).float().mean())}


def ensure_evaluator(cfg: DictConfig) -> Path:
    """The evaluator checkpoint: `metrics.evaluator_checkpoint`, or one trained once for this data config."""
    from sorabench.training.commands import shared_asset_config, train_shared_asset

    if cfg.metrics.get("evaluator_checkpoint"):
        path = Path(cfg.metrics.evaluator_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"metrics.evaluator_checkpoint={str(path)!r} does not exist")
        return path
    # metrics=torchscript has no `evaluator` block: alignment on `shapes` still uses the default evaluator.
    evaluator = cfg.metrics.get("evaluator") or compose_config("train_evaluator", []).metrics.evaluator
    sub = shared_asset_config(cfg, "train_evaluator", (clip_fields(to_container(cfg.data)), to_container(evaluator)),
                              {"metrics.evaluator": evaluator, "trainer.max_steps": evaluator.max_steps})
    return train_shared_asset(sub, run_evaluator_training, "evaluator")


def load_evaluator(path: str | Path):
    from sorabench.training.commands import load_checkpoint_module
    from sorabench.training.evaluator_module import EvaluatorModule

    return load_checkpoint_module(EvaluatorModule, path, "evaluator").eval()


# ---- metrics ---------------------------------------------------------------------------------------------------


def protocol_fields(m: DictConfig, video_net, data_cfg: dict, seed: int) -> dict:
    return {
        "feature_net": video_net.id,
        "feature_sha256": video_net.sha256,
        "n_real": int(m.n_real),
        "n_generated": int(m.n_samples),
        "num_frames": int(m.num_frames),
        "frame_stride": int(m.frame_stride),
        "resolution": int(m.resolution),
        "real_split": f"{data_cfg['name']}:{config_key(clip_fields(data_cfg))}/{m.real_split}",
        "seed": int(seed),
    }


def take_clips(videos: torch.Tensor, m: DictConfig) -> torch.Tensor:
    """The protocol's frames of each clip: `num_frames` frames from frame 0 at `frame_stride`."""
    span = (m.num_frames - 1) * m.frame_stride + 1
    if videos.shape[2] < span:
        raise ConfigError(f"metrics.num_frames={m.num_frames} at stride {m.frame_stride} needs {span} frames; "
                          f"clips have {videos.shape[2]}")
    return videos[:, :, :span : m.frame_stride]


def real_clips(data_cfg: dict, m: DictConfig) -> dict:
    """The first n_real clips of the real split (in evaluation mode), with captions, labels and unseen flags."""
    dataset = build_dataset(data_cfg, m.real_split, train=False)
    require(len(dataset) >= max(m.n_real, m.n_samples), "metrics.n_real/n_samples", (m.n_real, m.n_samples),
            f"the {m.real_split} split has only {len(dataset)} clips")
    n = max(m.n_real, m.n_samples)
    items = [dataset[i] for i in range(n)]
    return {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "labels": torch.stack([it["labels"] for it in items]),
        "unseen": torch.stack([torch.as_tensor(it["unseen"]) for it in items]),
    }


@torch.no_grad()
def one_process() -> bool:
    """torchmetrics' `distributed_available_fn` for metrics that one process computes alone."""
    return False


def evaluate_videos(fake: torch.Tensor, real: dict, m: DictConfig, nets, evaluator, fields: dict,
                    prompt_labels: torch.Tensor | None, prompt_unseen: torch.Tensor | None) -> dict[str, float]:
    """FVD, FID, KID (and alignment when an evaluator and prompt labels are given) of `fake` clips vs `real`."""
    video_net, frame_net = nets
    n_real = int(m.n_real)
    real_video = take_clips(real["video"][:n_real], m)
    fake = take_clips(fake, m)
    bs = int(m.batch_size)

    # One process evaluates (rank 0 after a DDP fit, while the other ranks wait): no sync across processes.
    fvd = FrechetVideoDistance(video_net, distributed_available_fn=one_process)
    cached = load_real_statistics(m.stats_cache_dir, fields)
    if cached is None:
        for i in range(0, n_real, bs):
            fvd.update(real_video[i : i + bs], real=True)
        save_real_statistics(m.stats_cache_dir, fields, fvd.real_statistics())
    else:
        fvd.set_real_statistics(**cached)
    for i in range(0, len(fake), bs):
        fvd.update(fake[i : i + bs], real=False)
    out = {"eval/fvd": float(fvd.compute())}

    frames_per_clip = real_video.shape[2]
    fid = frame_fid(frame_net)
    kid = frame_kid(frame_net, n_real * frames_per_clip, len(fake) * frames_per_clip, subsets=int(m.kid_subsets))
    fid.distributed_available_fn = kid.distributed_available_fn = one_process
    for metric in (fid, kid):
        for i in range(0, n_real, bs):
            metric.update(clips_to_frames(real_video[i : i + bs]), real=True)
        for i in range(0, len(fake), bs):
            metric.update(clips_to_frames(fake[i : i + bs]), real=False)
    out["eval/fid"] = float(fid.compute())
    kid_mean, kid_std = kid.compute()
    out["eval/kid"], out["eval/kid_std"] = float(kid_mean), float(kid_std)

    if evaluator is not None and prompt_labels is not None and (prompt_labels >= 0).all():
        out.update(alignment_metrics(evaluator, fake, prompt_labels, prompt_unseen, bs))
    return out


@torch.no_grad()
def evaluator_logits(evaluator, videos: torch.Tensor, bs: int) -> dict[str, torch.Tensor]:
    chunks = [evaluator(videos[i : i + bs]) for i in range(0, len(videos), bs)]
    return {name: torch.cat([c[name] for c in chunks]) for name in ATTRIBUTE_NAMES}


def alignment_metrics(evaluator, videos, labels, unseen, bs: int, prefix: str = "eval") -> dict[str, float]:
    """Per-attribute and all-correct accuracy of clips vs their prompts' labels (overall, seen, unseen), chance
    levels, and the entropy of the evaluator's predictions (near 0 = it calls everything one class: degenerate)."""
    report = attribute_accuracy(evaluator_logits(evaluator, videos, bs), labels, unseen, ATTRIBUTE_NAMES)
    out = {}
    for attr in [*ATTRIBUTE_NAMES, "all"]:
        out[f"{prefix}/acc_{attr}"] = report["overall"]["acc"][attr]
        out[f"{prefix}/acc_{attr}_seen"] = report["seen"]["acc"][attr]
        out[f"{prefix}/acc_{attr}_unseen"] = report["unseen"]["acc"][attr]
        out[f"{prefix}/chance_{attr}"] = report["chance_uniform"][attr]
    for attr in ATTRIBUTE_NAMES:
        out[f"{prefix}/pred_entropy_{attr}"] = report["predictions"][attr]["entropy"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def evaluate_module(module, cfg: DictConfig, logger=None, step: int = 0) -> dict[str, float]:
    """Sample `metrics.n_samples` clips per seed with `module` and score them; logs eval/* and the protocol."""
    m = cfg.metrics
    data_cfg = to_container(cfg.data)
    evaluator = load_evaluator(ensure_evaluator(cfg)).net if data_cfg["name"] == "shapes" else None
    if m.features == "evaluator" and evaluator is None:
        raise ConfigError("metrics=evaluator needs data=shapes (attribute labels); use metrics=torchscript")
    nets = build_feature_networks(to_container(m), evaluator)
    real = real_clips(data_cfg, m)
    n = int(m.n_samples)
    prompts, labels, unseen = real["caption"][:n], real["labels"][:n], real["unseen"][:n]
    per_seed = []
    was_training = module.training
    module.eval()
    t0 = time.time()
    for s in range(int(m.num_seeds)):
        seed = int(m.seed) + s
        fake = module.sample_videos(prompts, steps=int(m.sample_steps), guidance_scale=float(m.cfg), seed=seed,
                                    batch_size=int(m.batch_size)).cpu()
        fields = protocol_fields(m, nets[0], data_cfg, seed)
        per_seed.append(evaluate_videos(fake, real, m, nets, evaluator, fields, labels, unseen))
    module.train(was_training)
    metrics = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]}
    if len(per_seed) > 1:
        metrics["eval/fvd_seed_std"] = float(torch.tensor([r["eval/fvd"] for r in per_seed]).std())
    if evaluator is not None:
        # Reference points that tell "at chance" from "broken": the evaluator on real clips and on pure noise.
        metrics["eval/real_acc_all"] = alignment_metrics(evaluator, take_clips(real["video"][:n], m), labels, unseen,
                                                         int(m.batch_size), "r")["r/acc_all"]
        noise = torch.randn(real["video"][:n].shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
        metrics["eval/noise_acc_all"] = alignment_metrics(evaluator, take_clips(noise, m), labels, unseen,
                                                          int(m.batch_size), "r")["r/acc_all"]
    metrics["time/eval_seconds"] = time.time() - t0
    if logger is not None:
        logger.log_metrics(metrics, step=step)
        fields = protocol_fields(m, nets[0], data_cfg, int(m.seed))
        protocol = {f"eval.protocol.{k}": str(v) for k, v in fields.items()}
        protocol.update({"eval.protocol.num_seeds": str(m.num_seeds), "eval.protocol.cfg": str(m.cfg),
                         "eval.protocol.sample_steps": str(m.sample_steps), "eval.protocol.fid_net": nets[1].id})
        for k, v in protocol.items():
            logger.experiment.set_tag(logger.run_id, k, v)
    return metrics


class EvaluateCallback(L.Callback):
    """Evaluate every `every_n_steps` training steps, with the weights the validation uses (EMA when on).

    List it before the EMA callback, `trainer.EMA` (callbacks run in list order; the EMA swap is undone at validation
    end)."""

    def __init__(self, cfg: DictConfig, every_n_steps: int):
        self.cfg, self.every = cfg, int(every_n_steps)
        self.last = -1

    def on_validation_epoch_end(self, trainer, pl_module):
        step = trainer.global_step
        if trainer.sanity_checking or step == self.last or step == 0 or step % self.every and step < trainer.max_steps:
            return
        self.last = step
        metrics = evaluate_module(pl_module, self.cfg, trainer.logger, step=step)
        console.print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in HEADLINE))


HEADLINE = ("eval/fvd", "eval/fid", "eval/acc_all", "eval/acc_colour", "eval/acc_shape", "eval/acc_direction")


def print_metrics(metrics: dict[str, float], title: str):
    table = Table("metric", "value", title=title)
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4g}")
    console.print(table)


# ---- the command -----------------------------------------------------------------------------------------------


def folder_clips(root: str, m: DictConfig, height: int, width: int) -> torch.Tensor:
    """Every video under `root` (no captions needed), centre clip of the protocol's span, resized and cropped."""
    from sorabench.data.folder import VIDEO_EXTENSIONS, resize_and_crop
    from sorabench.data.video_io import read_frames

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ConfigError(f"{root}: no video files")
    span = (m.num_frames - 1) * m.frame_stride + 1
    clips = []
    for path in files:
        frames, _ = read_frames(path)
        if len(frames) < span:
            raise ConfigError(f"{path}: {len(frames)} frames, the protocol needs {span}")
        start = (len(frames) - span) // 2
        clips.append(resize_and_crop(frames[start : start + span], height, width))
    return torch.stack(clips)


def main(cfg: DictConfig) -> int:
    from sorabench.tracking import make_logger

    m = cfg.metrics
    require(m.cfg >= 0, "metrics.cfg", m.cfg, "the guidance scale must be >= 0")
    if cfg.real_root or cfg.fake_root:
        require(bool(cfg.real_root and cfg.fake_root), "real_root/fake_root", (cfg.real_root, cfg.fake_root),
                "give both folders")
        evaluator = load_evaluator(ensure_evaluator(cfg)).net if m.features == "evaluator" else None
        nets = build_feature_networks(to_container(m), evaluator)
        size = int(m.resolution) if m.features == "evaluator" else int(cfg.data.height)
        real = folder_clips(cfg.real_root, m, size, size)
        fake = folder_clips(cfg.fake_root, m, size, size)
        with open_dict(m):
            m.n_real, m.n_samples = len(real), len(fake)
        fields = protocol_fields(m, nets[0], {"name": "folder", "root": str(Path(cfg.real_root).resolve())}, 0)
        metrics = evaluate_videos(fake, {"video": real}, m, nets, None, fields, None, None)
        print_metrics(metrics, f"{cfg.fake_root} vs {cfg.real_root} ({nets[0].id})")
        return 0
    require(bool(cfg.ckpt), "ckpt", cfg.ckpt, "give a DiT checkpoint (or real_root= and fake_root=)")
    from sorabench.training.commands import load_dit

    module = load_dit(cfg.ckpt)
    # Log into the checkpoint's own run: its run directory holds the MLflow run id.
    run_dir = Path(cfg.ckpt).resolve().parent.parent
    logger = None
    if cfg.mlflow.enabled and (run_dir / "mlflow_run.json").is_file():
        run_info = json.loads((run_dir / "mlflow_run.json").read_text())
        with open_dict(cfg):
            cfg.run_dir, cfg.mlflow.experiment = str(run_dir), run_info["experiment"]
        logger = make_logger(cfg)
    step = int(torch.load(cfg.ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
    metrics = evaluate_module(module, cfg, logger, step=step)
    print_metrics(metrics, f"{cfg.ckpt} ({m.features} features, {m.n_samples} samples x {m.num_seeds} seeds)")
    return 0
