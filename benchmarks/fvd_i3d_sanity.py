"""Sanity table for standard FVD (the Kinetics-400 I3D, metrics=i3d): does it behave, and what does a clip cost?

    .venv/bin/python benchmarks/fvd_i3d_sanity.py [--n 64] [--folder DIR] [--frames 16] [--batch 8]

Rows, each an FVD against the same real set A (N clips):
  real B (N other clips of the same data)   ~ the small-sample floor: not 0, FVD is biased upwards at small N
  B + Gaussian noise of growing std          should grow monotonically
  B with its frames shuffled in time         temporal sensitivity (FVD is known to be content-biased: small)
  B's first frame repeated (a still video)   no motion at all
Sources: `shapes` 16-frame clips of the test split, and (with --folder) the mp4/webm/... files of a folder, read
like `sorabench evaluate real_root=` (centre `frames`-frame clip, short side 224 + centre crop). Features are
extracted in batches; the cost per clip is the feature-extraction wall time over the clips (this machine, its load).
"""

from __future__ import annotations

import argparse
import time

import torch

from sorabench.data.module import build_dataset
from sorabench.metrics.features import I3DFeatures
from sorabench.metrics.fvd import FrechetVideoDistance


class Timed(torch.nn.Module):
    """Wraps the feature network to count clips and seconds."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_features, self.per_frame = net, net.num_features, False
        self.clips, self.seconds = 0, 0.0

    def forward(self, video):
        t0 = time.perf_counter()
        out = self.net(video)
        self.seconds += time.perf_counter() - t0
        self.clips += len(video)
        return out


def batches(clips: torch.Tensor, bs: int):
    for i in range(0, len(clips), bs):
        yield clips[i : i + bs]


def table(name: str, a: torch.Tensor, b: torch.Tensor, net: Timed, bs: int) -> list[tuple[str, float]]:
    metric = FrechetVideoDistance(net, reset_real_features=False)  # A's statistics once, reused by every row
    for x in batches(a, bs):
        metric.update(x, real=True)
    g = torch.Generator().manual_seed(0)
    variants = [("real B (other clips)", lambda x: x)]
    for std in (0.05, 0.1, 0.2, 0.4):
        variants.append((f"B + N(0, {std}²) noise", lambda x, s=std: (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)))
    variants.append(("B, frames shuffled in time", lambda x: x[:, :, torch.randperm(x.shape[2], generator=g)]))
    variants.append(("B, first frame repeated (still)", lambda x: x[:, :, :1].expand_as(x).contiguous()))
    rows = []
    for label, f in variants:
        metric.reset()
        for x in batches(b, bs):
            metric.update(f(x), real=False)
        rows.append((f"{name}: A vs {label}", float(metric.compute())))
    return rows


def folder_clips(root: str, n: int, frames: int) -> torch.Tensor:
    from omegaconf import OmegaConf

    from sorabench.commands.evaluate import folder_batches, video_files

    files = video_files(root)[:n]
    m = OmegaConf.create({"num_frames": frames, "frame_stride": 1, "batch_size": 8})
    return torch.cat(list(folder_batches(files, m, 224, "center", 0)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64, help="clips per side (A and B)")
    p.add_argument("--folder", default=None, help="a folder of real videos (2n files are used)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    net = Timed(I3DFeatures())
    n = args.n
    data = {"name": "shapes", "num_frames": args.frames, "height": 32, "width": 32,
            "split_sizes": {"train": 8, "val": 8, "test": 2 * n, "unseen": 8}}
    test = build_dataset(data, "test", train=False)
    clips = torch.stack([test[i]["video"] for i in range(2 * n)])
    rows = table(f"shapes 32² ({args.frames} frames)", clips[:n], clips[n:], net, args.batch)
    if args.folder:
        clips = folder_clips(args.folder, 2 * n, args.frames)
        half = len(clips) // 2
        rows += table(f"folder ({half} vs {half} files)", clips[:half], clips[half : 2 * half], net, args.batch)
    print(f"FVD with {net.net.id}, sha256 {net.net.sha256[:12]}; N = {n} clips per side, {args.frames} frames, "
          f"threads {torch.get_num_threads()}\n")
    print("| comparison | FVD |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    print(f"\nI3D feature extraction: {net.clips} clips in {net.seconds:.1f} s = {net.seconds / net.clips:.2f} s per "
          f"clip (batch {args.batch}, {args.frames}x224x224)")


if __name__ == "__main__":
    main()
