"""`folder`: a user's own captioned videos, decoded with PyAV.

Layout: a directory of video files (mp4, webm, mkv, avi, mov, gif; any depth) and one captions file:
- `captions.jsonl`: one `{"video": "relative/path.mp4", "caption": "..."}` per line, or
- a CSV with a header `path,caption` (WebVid's `videoid,name` is accepted too: `videoid` names `<videoid>.mp4`).

Clip sampling: `num_frames` frames every `frame_stride` source frames (or a stride derived from a target `fps`),
from a random offset in training (drawn from the worker's seeded torch RNG) and the centre in evaluation; the short
side is resized to the target size (antialiased) and centre-cropped to H x W; output float (C, T, H, W) in [-1, 1].

Bad input never becomes silent zeros: a missing, unreadable or truncated file, a clip shorter than needed or a
caption entry without its fields raises an error naming the file and the reason (`on_error: raise`), or the
sample is skipped and counted (`on_error: skip`; see `collate_skipping` and the epoch-end report).
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sorabench.config import ConfigError
from sorabench.data.dataset import VideoDataset, register
from sorabench.data.video_io import VideoReadError, probe, read_frames

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"}


class DataError(ValueError):
    """Bad data input (folder, captions file, video); the message names the culprit."""


@dataclass
class FolderConfig:
    root: str
    captions: str | None = None  # file name inside root; default: captions.jsonl, else the only *.csv
    num_frames: int = 8
    frame_stride: int = 1
    fps: float | None = None  # if set, overrides frame_stride: stride = round(source_fps / fps)
    height: int = 32
    width: int = 32
    on_error: str = "raise"  # raise | skip
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={self.on_error!r} must be 'raise' or 'skip'")
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ConfigError(f"data.num_frames={self.num_frames} and data.frame_stride={self.frame_stride} must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"data.fps={self.fps} must be > 0")


def find_captions_file(root: Path, name: str | None) -> Path:
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} is not a directory")
    if name:
        path = root / name
        if not path.is_file():
            raise DataError(f"captions file {path} does not exist")
        return path
    if (root / "captions.jsonl").is_file():
        return root / "captions.jsonl"
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    if not any(p.suffix.lower() in VIDEO_EXTENSIONS for p in root.rglob("*")):
        raise DataError(f"data.root={str(root)!r} holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    raise DataError(
        f"{root}: no captions file: expected captions.jsonl ({{'video': path, 'caption': text}} per line) "
        f"or one CSV with columns path,caption (or videoid,name); found {len(csvs)} CSV files"
    )


def read_captions(path: Path) -> list[tuple[str, str, str]]:
    """(relative video path, caption, where) entries; `where` is 'file:line' for error messages."""
    entries = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from e
            for key in ("video", "caption"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: missing field {key!r} (need {{'video': path, 'caption': text}})")
            entries.append((row["video"], row["caption"], where))
        return entries
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if {"path", "caption"} <= fields:
            video_key, caption_key, suffix = "path", "caption", ""
        elif {"videoid", "name"} <= fields:  # WebVid
            video_key, caption_key, suffix = "videoid", "name", ".mp4"
        else:
            raise DataError(f"{path}: CSV header {sorted(fields)} needs columns path,caption (or WebVid's videoid,name)")
        for lineno, row in enumerate(reader, 2):
            where = f"{path}:{lineno}"
            for key in (video_key, caption_key):
                if not (row.get(key) or "").strip():
                    raise DataError(f"{where}: missing field {key!r}")
            video = row[video_key] + (suffix if not Path(row[video_key]).suffix else "")
            entries.append((video, row[caption_key], where))
    return entries


def content_fingerprint(root: str | Path) -> str:
    """What a folder holds, without reading the videos: a SHA-256 over the relative path, size and modification time
    (ns) of every video and captions file under `root`, in sorted order. Replacing, adding, removing or rewriting a
    file changes it, so the caches keyed by it (latents, real statistics) are never reused for other content."""
    root = Path(root)
    digest = hashlib.sha256()
    kinds = VIDEO_EXTENSIONS | {".jsonl", ".csv"}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in kinds and p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def split_draw(relpath: str, cfg: FolderConfig) -> float:
    """A file's position in [0, 1) from a hash of its path: [0, val_fraction) is val, then test, then train."""
    return int(hashlib.sha256(f"{cfg.seed}:{relpath}".encode()).hexdigest()[:8], 16) / 2**32


def empty_split_message(source, relpaths: list[str], cfg: FolderConfig, split: str) -> str:
    """Why a split is empty and the smallest change of its fraction that gives it a video."""
    draws = [split_draw(rel, cfg) for rel in relpaths]
    if split == "val" and draws:
        fix = f"set data.val_fraction above {min(draws):.3f}"
    elif split == "test" and [d for d in draws if d >= cfg.val_fraction]:
        fix = f"set data.test_fraction above {min(d for d in draws if d >= cfg.val_fraction) - cfg.val_fraction:.3f}"
    else:
        fix = "lower data.val_fraction + data.test_fraction"
    return (f"{source}: no entries in split {split!r} ({len(relpaths)} captioned videos, data.val_fraction="
            f"{cfg.val_fraction}, data.test_fraction={cfg.test_fraction}; each video's split comes from a hash of its "
            f"path): {fix}, or add videos")


def split_of(relpath: str, cfg: FolderConfig) -> str:
    """Deterministic split from a hash of the path, so adding files never moves existing ones between splits."""
    u = split_draw(relpath, cfg)
    if u < cfg.val_fraction:
        return "val"
    if u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


def frames_needed(cfg: FolderConfig, source_fps: float | None) -> tuple[int, int]:
    """(stride, number of source frames a clip spans)."""
    stride = cfg.frame_stride
    if cfg.fps is not None and source_fps:
        stride = max(1, round(source_fps / cfg.fps))
    return stride, (cfg.num_frames - 1) * stride + 1


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, height, width) in [-1, 1]: short side resized, then centre crop."""
    x = frames.permute(0, 3, 1, 2).float()  # T, C, H, W
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    new_h, new_w = max(height, round(h * s)), max(width, round(w * s))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])  # before the server starts


@register("folder")
class FolderDataset(VideoDataset):
    config = FolderConfig
    attributes: dict[str, int] = {}  # the label schema: captions only, no attribute labels
    # The parent has opened files with PyAV (probe, decode): a DataLoader worker forked from it can deadlock in
    # FFmpeg (measured: data.num_workers=2, the default, hung every run of three). Workers fork from a server process
    # that has imported this module (torch, PyAV) but never decoded: clean, and cheaper to start than spawned ones.
    worker_start = "forkserver"

    def __init__(self, cfg: FolderConfig, split: str, train: bool | None = None):
        self.cfg, self.split = cfg, split
        self.train = (split == "train") if train is None else train
        self.root = Path(cfg.root)
        self.captions_file = find_captions_file(self.root, cfg.captions)
        self.skipped: list[str] = []  # reasons for entries dropped at setup (on_error: skip)
        entries = []
        listed = read_captions(self.captions_file)
        for rel, caption, where in listed:
            if split_of(rel, cfg) != split:
                continue
            if not (self.root / rel).is_file():
                self._bad(f"{where}: video {rel!r} not found under {self.root}")
                continue
            try:  # the container header, not the frames: cheap, and catches unreadable files before training
                probe(self.root / rel)
            except VideoReadError as e:
                self._bad(str(e))
                continue
            entries.append((rel, caption))
        if not entries and not self.skipped:
            raise DataError(empty_split_message(self.captions_file, [rel for rel, _, _ in listed], cfg, split))
        self.entries = entries

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return collate_skipping(items)

    @classmethod
    def fingerprint(cls, data_cfg: dict) -> str | None:
        # A file replaced in place gets new latents, real statistics, VAE and evaluator.
        root = data_cfg.get("root")
        return content_fingerprint(root) if root and Path(root).is_dir() else None

    @classmethod
    def check(cls, cfg: FolderConfig):
        for split in ("train", "val"):  # index and probe the user's files now (cheap), not once training has started
            cls(cfg, split)

    def _bad(self, reason: str):
        if self.cfg.on_error == "raise":
            raise DataError(reason)
        self.skipped.append(reason)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, rel: str, train: bool) -> torch.Tensor:
        """Decode one clip; raises VideoReadError naming the file and reason."""
        path = self.root / rel
        meta = probe(path)
        stride, span = frames_needed(self.cfg, meta["fps"])
        total = meta["frames"] or span  # unknown length: decode and see
        if meta["frames"] and total < span:
            raise VideoReadError(f"{path}: {total} frames, need {span} ({self.cfg.num_frames} frames at stride {stride})")
        if train:
            offset = int(torch.randint(total - span + 1, (1,)))
        else:
            offset = (total - span) // 2
        frames, _ = read_frames(path, max_frames=offset + span)
        if len(frames) < offset + span:
            raise VideoReadError(f"{path}: decoded {len(frames)} frames, need {offset + span} (truncated or too short)")
        clip = frames[offset : offset + span : stride]
        return resize_and_crop(clip, self.cfg.height, self.cfg.width)

    def __getitem__(self, i: int) -> dict | None:
        rel, caption = self.entries[i]
        try:
            video = self.load(rel, self.train)
        except VideoReadError as e:
            if self.cfg.on_error == "raise":
                raise
            return {"skipped": str(e)}
        return {
            "video": video,
            "caption": caption,
            "labels": torch.zeros(0, dtype=torch.long),  # one column per attribute of the schema: none
            "unseen": torch.tensor(False),
        }


def collate_skipping(items: list[dict]) -> dict:
    """Default collation that drops skipped samples and reports how many (batch['skipped'])."""
    kept = [it for it in items if "skipped" not in it]
    skipped = [it["skipped"] for it in items if "skipped" in it]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = skipped
    return batch
