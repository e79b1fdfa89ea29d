"""Does a model move the object the way its caption says? Measured without the evaluator: the centroid of the
object's pixels (black background) in the first and the last frame of each clip.

    .venv/bin/python experiments/conditioning_ablation/motion.py CKPT [N] [shapes field=value ...] [--sheet PNG]
    e.g. ... outputs/train/<study>/adaln_zero-seed0/checkpoints/last.ckpt 256 position_range=1.0

--sheet PNG also writes a contact sheet: the first 8 prompts, each a real clip over its sample, frames left to right.

Samples the first N (default 256) `val` prompts of `shapes` (with the given ShapesConfig fields: the data the model
was trained on) as the ablation does (20 Euler steps, guidance 2, seed 0) and prints, for the real clips and the
samples: how far the object moves (pixels, slow and fast prompts), how far of that is along the caption's direction,
and the direction (and the axis, horizontal or vertical) read from the displacement. The fourth-round table of the
README was measured with it."""

import sys

import torch
import yaml

from sorabench.data.module import dataset_config
from sorabench.data.shapes import DIRECTION_VECTORS, make_split
from sorabench.training.runs import load_pipeline


def displacement(videos: torch.Tensor) -> torch.Tensor:
    """(n, 3, T, H, W) in [0, 1] -> (n, 2): the object's centroid in the last frame minus the first, (x, y) px."""
    w = (videos.amax(1) - 0.2).clamp(min=0)  # (n, T, H, W): the object's pixels, weighted by brightness
    ys, xs = torch.meshgrid(torch.arange(w.shape[-2]) + 0.5, torch.arange(w.shape[-1]) + 0.5, indexing="ij")
    mass = w.sum((-1, -2)).clamp(min=1e-6)
    cx, cy = (w * xs).sum((-1, -2)) / mass, (w * ys).sum((-1, -2)) / mass
    return torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], -1)


def report(name: str, videos: torch.Tensor, labels: torch.Tensor) -> None:
    d = displacement(videos)
    direction, fast = labels[:, 3], labels[:, 4] == 1
    read = (d @ DIRECTION_VECTORS.T).argmax(-1)  # the direction the displacement points to most
    along = (d * DIRECTION_VECTORS[direction]).sum(-1)  # px moved along the caption's direction
    moved = d.norm(dim=-1)
    print(f"{name:9s} moved slow {moved[~fast].mean():5.2f} fast {moved[fast].mean():5.2f} px | along the caption "
          f"slow {along[~fast].mean():5.2f} fast {along[fast].mean():5.2f} px | direction "
          f"{(read == direction).float().mean():.3f} axis {((read // 2) == (direction // 2)).float().mean():.3f}")


def contact_sheet(path: str, captions: list[str], real: torch.Tensor, fake: torch.Tensor, k: int = 8) -> None:
    """Rows: a real clip, then the sample for its caption; columns: frames. Videos (n, 3, T, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v[i] for i in range(min(k, len(captions))) for v in (real, fake)]  # (3, T, H, W) each
    strip = torch.stack([torch.cat(list(r.permute(1, 2, 3, 0)), dim=1) for r in rows])  # (2k, H, T*W, 3)
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(real[0, 0]) * 0.9, len(rows) * 0.95))
    for i, (ax, img) in enumerate(zip(axes, strip)):
        ax.imshow(img.clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(("real: " if i % 2 == 0 else "sample: ") + captions[i // 2], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    sheet = args.pop(args.index("--sheet") + 1) if "--sheet" in args else None
    args = [a for a in args if a != "--sheet"]
    ckpt, n = args[0], int(args[1]) if len(args) > 1 else 256
    # field=value as in a `data.` override, parsed and checked by the data config's own validation
    fields = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[2:])}
    val = make_split(dataset_config({"name": "shapes", **fields}), "val")
    labels = val.labels[:n, 0]
    report("real", val.videos[:n].float() / 255, labels)
    videos = (load_pipeline(ckpt).sample_videos(val.captions[:n], steps=20, guidance_scale=2.0, seed=0) + 1) / 2
    report("generated", videos, labels)
    if sheet:
        contact_sheet(sheet, val.captions, val.videos[:n].float() / 255, videos)
