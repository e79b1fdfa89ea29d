"""The evaluator: a small (2+1)D video classifier reading a clip's attributes (colour, shape, size, direction, speed).

It is sorabench's embedded default feature network: its penultimate layer gives FVD features (whole clips) and FID
features (single frames), and its heads score text–video alignment. It must be cheap enough to train in a minute or
two on a CPU, and it must see time, since direction and speed exist only across frames.

Architecture, for a clip (B, 3, T, H, W) in [-1, 1]:

    3 stages, each (2+1)D: spatial conv 1×3×3 with stride 1×2×2, then temporal conv 3×1×1   → (B, 4w, T, H/8, W/8)
    pool: global over space, adaptive to `time_bins` bins over time                        → (B, 4w, time_bins)
    hidden: Linear(4w · time_bins → feature_dim)  = the features (pre-activation)          → (B, feature_dim)
    heads: one Linear(feature_dim → K) per attribute, on ReLU(features)

Motion is detected by the temporal convolutions while the maps still have spatial extent (16×16, 8×8, 4×4 at 32×32
input). Pooling time into ordered bins, rather than averaging it away, keeps *when* a motion happens: `shapes`
objects bounce off the walls, so a clip labelled "left" may end moving right, and only the order of the two motions
tells it from a "right" clip that bounced (8 bins read direction better than 4: benchmarks/RESULTS.md). Adaptive
bins make the network indifferent to the clip length (8 or 16 frames, or a single frame for FID features).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    padding = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)
    )


class VideoAttributeClassifier(nn.Module):
    """Classify each attribute of a clip; `attributes` maps attribute name -> number of classes, in label order."""

    def __init__(self, attributes: dict[str, int], width: int = 32, feature_dim: int = 128, time_bins: int = 8):
        super().__init__()
        self.attributes = dict(attributes)
        self.feature_dim = feature_dim
        self.time_bins = time_bins
        channels = [3, width, 2 * width, 4 * width]
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages.append(_conv_bn_relu(c_in, c_out, (1, 3, 3), (1, 2, 2)))  # spatial, halves H and W
            stages.append(_conv_bn_relu(c_out, c_out, (3, 1, 1), (1, 1, 1)))  # temporal, sees t-1, t, t+1
        self.backbone = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d((time_bins, 1, 1))
        self.hidden = nn.Linear(channels[-1] * time_bins, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in self.attributes.items()})

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of clips (B, 3, T, H, W) in [-1, 1]."""
        return self.hidden(self.pool(self.backbone(video)).flatten(1))

    def frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """Per-frame features (B·T, feature_dim): every frame is read as a one-frame clip.

        With T = 1 the temporal kernels see only their centre tap (the others fall on zero padding), so these
        features describe appearance alone, which is what FID on frames should compare.
        """
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, 1, h, w)
        return self.features(frames)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: {name: (B, K)}."""
        hidden = torch.relu(self.features(video))
        return {name: head(hidden) for name, head in self.heads.items()}
