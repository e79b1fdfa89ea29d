"""`sorabench data preview` (write clips to look at) and `sorabench data check` (validate a video folder)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from sorabench.config import require, to_container
from sorabench.data.folder import (
    VIDEO_EXTENSIONS,
    empty_split_message,
    find_captions_file,
    frames_needed,
    read_captions,
    split_of,
)
from sorabench.data.module import build_dataset, dataset_config
from sorabench.data.video_io import VideoReadError, probe, read_frames, write_gif, write_video


def main(cfg: DictConfig, subcommand: str) -> int:
    return {"preview": preview, "check": check}[subcommand](cfg)


def preview(cfg: DictConfig) -> int:
    """Write `n` clips of a split as .mp4 and .gif, their captions, and a contact sheet PNG of all frames."""
    require(isinstance(cfg.n, int) and cfg.n >= 1, "n", cfg.n, "must be a positive integer")
    dataset = build_dataset(to_container(cfg.data), cfg.split, train=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(cfg.n, len(dataset))
    items = [dataset[i] for i in range(n)]
    lines = []
    for i, item in enumerate(items):
        stem = f"clip_{i:02d}"
        write_video(out / f"{stem}.mp4", item["video"], fps=cfg.fps, scale=cfg.scale)
        write_gif(out / f"{stem}.gif", item["video"], fps=cfg.fps, scale=cfg.scale)
        lines.append(f"{stem}\t{item['caption']}")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    contact_sheet(out / "preview.png", [it["video"] for it in items], [it["caption"] for it in items])
    Console().print(f"wrote {n} clips (.mp4, .gif), captions.txt and preview.png to {out}")
    for line in lines:
        print("  " + line)
    return 0


def contact_sheet(path: Path, videos: list, captions: list[str]):
    """One row per clip, one column per frame, the caption above each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    t, width = videos[0].shape[1], videos[0].shape[3]
    fig, axes = plt.subplots(len(videos), 1, figsize=(t * 1.0, len(videos) * 1.25), squeeze=False)
    for ax, video, caption in zip(axes[:, 0], videos, captions):
        frames = ((video.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # T, H, W, C
        gap = torch.ones(frames.shape[1], max(1, width // 16), 3)  # white gutter between frames
        row = torch.cat([torch.cat([f, gap], dim=1) for f in frames], dim=1)
        ax.imshow(row.numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(caption, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check(cfg: DictConfig) -> int:
    """Validate every file of a `folder` dataset; exit 1 if any is bad. Prints per-file reasons and statistics."""
    data = to_container(cfg.data)
    require(data.get("name") == "folder", "data", data.get("name"), "data check validates folders: use data=folder")
    fcfg = dataset_config(data)
    root = Path(fcfg.root)
    captions_file = find_captions_file(root, fcfg.captions)
    entries = read_captions(captions_file)
    captioned = {rel for rel, _, _ in entries}
    problems: list[tuple[str, str]] = []
    stats: list[dict] = []
    for rel, _, where in entries:
        path = root / rel
        if not path.is_file():
            problems.append((rel, f"listed at {where} but not found"))
            continue
        try:
            meta = probe(path)
            _, span = frames_needed(fcfg, meta["fps"])
            frames, _ = read_frames(path)  # decode it all: truncation shows up only here
            if len(frames) < span:
                raise VideoReadError(f"{len(frames)} frames, need {span} ({fcfg.num_frames} at the configured stride)")
            stats.append({**meta, "frames": len(frames)})
        except VideoReadError as e:
            problems.append((rel, str(e).removeprefix(f"{path}: ")))
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in VIDEO_EXTENSIONS and rel not in captioned:
            problems.append((rel, f"no caption in {captions_file.name}"))

    console = Console(soft_wrap=True)
    console.print(f"{root}: {len(stats)} readable clips, {len(problems)} problems ({captions_file.name})")
    if stats:
        table = Table("statistic", "min", "median", "max")
        for key in ("width", "height", "fps", "frames"):
            values = [s[key] for s in stats if s[key] is not None]
            if values:
                table.add_row(key, f"{min(values):g}", f"{statistics.median(values):g}", f"{max(values):g}")
        console.print(table)
    if problems:
        table = Table("file", "problem", title="bad files")
        for rel, reason in problems:
            table.add_row(rel, reason)
        console.print(table)
    readable = [rel for rel, _, _ in entries if rel not in {p for p, _ in problems}]
    counts = Counter(split_of(rel, fcfg) for rel in readable)
    console.print("clips per split: " + ", ".join(f"{s}={counts.get(s, 0)}" for s in ("train", "val", "test")))
    for split in ("val", "test"):  # training needs a val split; say now what to change, not at `train` time
        if not counts.get(split) and readable:
            console.print(f"[yellow]warning: {empty_split_message(captions_file, readable, fcfg, split)}")
    if not counts.get("train"):
        problems.append(("train", "no readable clips in the train split"))
        console.print("[red]the train split is empty")
    return 1 if problems else 0
