"""Reading and writing video files with PyAV (it bundles FFmpeg: H.264, VP9, AV1 and GIF all work offline).

Videos in memory are float tensors (C, T, H, W) in [-1, 1]; on disk they are uint8 RGB.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H*scale, W*scale, 3) uint8; `scale` upsamples by pixel repetition for viewing."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video of shape (3, T, H, W), got {tuple(video.shape)}")
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0)  # T, H, W, C
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return frames.numpy()


def view_scale(height: int, width: int, min_px: int = 256) -> int:
    """The pixel-repeat factor that shows a clip at least `min_px` on its short side (a 32x32 clip: 8x, 256x256):
    previews are for eyes, and a browser's video player shows a 32 px clip as a speck. Metrics never see them."""
    return max(1, -(-min_px // max(1, min(height, width))))


def encode_frames(path: str | Path, frames: np.ndarray, codec: str, pix_fmt: str, fps: int, **container_kw) -> Path:
    """Encode uint8 frames (T, H, W, 3) into a file with PyAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", **container_kw) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12"}  # near-lossless: previews should show the model, not the codec
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_video(path: str | Path, video: torch.Tensor, fps: int = 8, scale: int = 1) -> Path:
    """Write an H.264 mp4 (yuv420p) that any player opens."""
    frames = to_uint8_frames(video, scale)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:  # yuv420p needs even sizes; pad with the edge rather than crop content away
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return encode_frames(path, frames, "libx264", "yuv420p", fps)


def write_gif(path: str | Path, video: torch.Tensor, fps: int = 8, scale: int = 1) -> Path:
    """Write a looping GIF (8-bit palette per frame)."""
    return encode_frames(path, to_uint8_frames(video, scale), "gif", "rgb8", fps, format="gif")


def write_clips(out: str | Path, videos, stems: list[str], captions: list[str] | None = None, fps: int = 8,
                scale: int = 1, sheet: str | None = None) -> list[Path]:
    """Each clip as `<stem>.mp4` and `<stem>.gif` in `out`, and with `sheet`, a contact sheet PNG of every frame of
    every clip under its caption; returns the files written (what a caller logs as artifacts)."""
    out = Path(out)
    paths = []
    for video, stem in zip(videos, stems):
        paths.append(write_video(out / f"{stem}.mp4", video, fps, scale))
        paths.append(write_gif(out / f"{stem}.gif", video, fps, scale))
    if sheet:
        paths.append(contact_sheet(out / sheet, list(videos), captions or list(stems)))
    return paths


def contact_sheet(path: str | Path, videos: list, captions: list[str]) -> Path:
    """One row per clip, one column per frame, the caption above each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, width = videos[0].shape[1], videos[0].shape[3]
    fig, axes = plt.subplots(len(videos), 1, figsize=(t * 1.0, len(videos) * 1.25), squeeze=False)
    for ax, video, caption in zip(axes[:, 0], videos, captions):
        frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # T, H, W, C
        gap = torch.ones(frames.shape[1], max(1, width // 16), 3)  # white gutter between frames
        row = torch.cat([torch.cat([f, gap], dim=1) for f in frames], dim=1)
        ax.imshow(row.numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(caption, fontsize=8, loc="left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


class VideoReadError(RuntimeError):
    """A video file could not be decoded as needed; the message names the file and the reason."""


def probe(path: str | Path) -> dict:
    """Metadata of a video file without decoding it all: frames (may be an estimate), fps, width, height."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            frames = stream.frames
            if not frames and stream.duration and stream.time_base and fps:
                frames = int(round(float(stream.duration * stream.time_base) * fps))
            return {"frames": int(frames or 0), "fps": fps, "width": stream.width, "height": stream.height}
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def read_frames(path: str | Path, max_frames: int | None = None) -> tuple[torch.Tensor, float | None]:
    """Decode frames from the start of a file: uint8 (T, H, W, 3) and the stream's fps.

    Decoding stops after `max_frames` frames. A decoding error anywhere in that range raises VideoReadError, so a
    truncated file is an error, not a short clip of zeros.
    """
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: unreadable after {len(frames)} frames ({type(e).__name__}: {e})") from e
    if not frames:
        raise VideoReadError(f"{path}: no decodable frames")
    return torch.from_numpy(np.stack(frames)), fps
