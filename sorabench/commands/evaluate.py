"""`sorabench evaluate ckpt=<dit checkpoint>`: score a checkpoint with the protocol of `metrics`, logged as a child
of the checkpoint's own MLflow run; `sorabench evaluate real_root=<dir> fake_root=<dir>`: compare two folders of
videos. The scoring itself is `sorabench.metrics.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from sorabench.config import ConfigError, require, to_container
from sorabench.metrics.evaluate import (
    check_guidance_axis,
    check_metrics_config,
    clip_offset,
    evaluate_module,
    evaluate_videos,
    feature_evaluator,
    protocol_fields,
)
from sorabench.metrics.features import build_feature_networks
from sorabench.tracking import make_logger, read_run_id
from sorabench.training.evaluator_module import ensure_evaluator, load_evaluator
from sorabench.training.runs import load_pipeline

console = Console(soft_wrap=True)


def main(cfg: DictConfig) -> int:
    m = cfg.metrics
    require(m.cfg >= 0, "metrics.cfg", m.cfg, "the guidance scale must be >= 0")
    check_guidance_axis(m)
    if cfg.real_root or cfg.fake_root:
        return evaluate_folders(cfg)
    return evaluate_checkpoint(cfg)


def print_metrics(metrics: dict[str, float], title: str):
    table = Table("metric", "value", title=title)
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4g}")
    console.print(table)


# ---- a checkpoint ------------------------------------------------------------------------------------------------


def evaluate_checkpoint(cfg: DictConfig) -> int:
    require(bool(cfg.ckpt), "ckpt", cfg.ckpt, "give a DiT checkpoint (or real_root= and fake_root=)")
    check_metrics_config(cfg)  # before the evaluator is trained or a clip sampled
    pipeline = load_pipeline(cfg.ckpt)
    logger = evaluation_logger(cfg, Path(cfg.ckpt).resolve().parent.parent)
    step = int(torch.load(cfg.ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
    metrics = evaluate_module(pipeline, cfg, logger, step=step)
    m = cfg.metrics
    print_metrics(metrics, f"{cfg.ckpt} ({m.features} features, {m.n_samples} samples x {m.num_seeds} seeds)")
    return 0


def evaluation_logger(cfg: DictConfig, run_dir: Path):
    """The MLflow run of `evaluate ckpt=`: a child of the checkpoint's own run (found through the run directory's
    `tracking.RUN_ID_FILE`), named `evaluate-<name>` and tagged `sorabench.role=evaluation`. Never the checkpoint's run
    itself: this evaluation's protocol (samples, guidance, evaluator budget) may differ from the one the run was
    trained and scored under, and its numbers must not replace the run's; a study's report reads only trial runs.
    Rerunning with the same `name=` continues the same evaluation run. None without MLflow or a run."""
    run_info = read_run_id(run_dir) if cfg.mlflow.enabled else None
    if run_info is None:
        return None
    with open_dict(cfg):
        cfg.run_dir = str(run_dir / "evaluate" / str(cfg.name))
        cfg.mlflow.experiment, cfg.mlflow.run_name = run_info["experiment"], f"evaluate-{cfg.name}"
    return make_logger(cfg, tags={"sorabench.role": "evaluation", "sorabench.evaluated_run": run_info["run_id"]},
                       parent_run_id=run_info["run_id"])


# ---- two folders of videos ---------------------------------------------------------------------------------------


def evaluate_folders(cfg: DictConfig) -> int:
    m = cfg.metrics
    require(bool(cfg.real_root and cfg.fake_root), "real_root/fake_root", (cfg.real_root, cfg.fake_root),
            "give both folders")
    for key in ("real_root", "fake_root"):  # every path first: before an evaluator is trained or a clip read
        require(Path(cfg[key]).is_dir(), key, cfg[key], "no such directory")
    check_metrics_config(cfg, data_clips=False)  # metrics=evaluator only with metrics.evaluator_on_other_data
    real_files, fake_files = video_files(cfg.real_root), video_files(cfg.fake_root)
    check_lengths(real_files + fake_files, m)
    evaluator = load_evaluator(ensure_evaluator(cfg)).net if m.features == "evaluator" else None
    nets = build_feature_networks(to_container(m), feature_evaluator(cfg, evaluator))
    size = int(m.resolution)
    with open_dict(m):
        m.n_real, m.n_samples = len(real_files), len(fake_files)
    fields = protocol_fields(m, nets[0], {"name": "folder", "root": str(Path(cfg.real_root).resolve())}, 0)
    # Real clips start at metrics.clip_start (StyleGAN-V: random), generated ones at frame 0.
    real = folder_batches(real_files, m, size, m.get("clip_start", "first"), int(m.seed))
    fake = folder_batches(fake_files, m, size, "first", int(m.seed))
    metrics, _ = evaluate_videos(fake, real, m, nets, None, fields, None, None)
    print_metrics(metrics, f"{cfg.fake_root} vs {cfg.real_root} ({(nets[0] or nets[1]).id})")
    return 0


def video_files(root: str) -> list[Path]:
    from sorabench.data.folder import VIDEO_EXTENSIONS

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ConfigError(f"{root}: no video files")
    return files


def check_lengths(files: list[Path], m: DictConfig) -> None:
    """Every file long enough for the protocol, checked from the container headers before any decoding."""
    from sorabench.data.video_io import probe

    span = (m.num_frames - 1) * m.frame_stride + 1
    for path in files:
        frames = probe(path)["frames"]
        if frames and frames < span:
            raise ConfigError(f"{path}: {frames} frames, metrics.num_frames={m.num_frames} at stride "
                              f"{m.frame_stride} needs {span}")


def folder_batches(files: list[Path], m: DictConfig, size: int, start: str, seed: int):
    """Batches of clips from video files (no captions needed): each file decoded, cut to the protocol's span at
    `start` (first | center | random), short side resized to `size` and centre-cropped; one batch in memory."""
    from sorabench.data.folder import resize_and_crop
    from sorabench.data.video_io import read_frames

    span = (m.num_frames - 1) * m.frame_stride + 1
    generator = torch.Generator().manual_seed(seed)
    bs = int(m.batch_size)
    for i in range(0, len(files), bs):
        clips = []
        for path in files[i : i + bs]:
            frames, _ = read_frames(path, max_frames=span if start == "first" else None)  # uint8 (T, H, W, 3)
            if len(frames) < span:
                raise ConfigError(f"{path}: {len(frames)} frames, the protocol needs {span}")
            o = clip_offset(len(frames), span, start, generator)
            # Cut before resizing: only the protocol's frames are ever resized and kept.
            clips.append(resize_and_crop(frames[o : o + span : m.frame_stride], size, size))
        yield torch.stack(clips)
