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
from sorabench.data.video_io import VideoReadError, probe, read_frames, write_clips


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
    stems, captions = [f"clip_{i:02d}" for i in range(n)], [it["caption"] for it in items]
    write_clips(out, [it["video"] for it in items], stems, captions, fps=cfg.fps, scale=cfg.scale, sheet="preview.png")
    lines = [f"{stem}\t{caption}" for stem, caption in zip(stems, captions)]
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    Console().print(f"wrote {n} clips (.mp4, .gif), captions.txt and preview.png to {out}")
    for line in lines:
        print("  " + line)
    return 0


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
