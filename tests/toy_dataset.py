"""A toy dataset defined outside the package: this one module plus one YAML (`name: toy` and its options) make
`data=toy` work (tests/test_data.py::test_a_dataset_registered_outside_the_package).

Each clip is a flat colour (red or green) getting brighter or darker; its caption says which.
"""

from dataclasses import dataclass

import torch

from sorabench.data.dataset import VideoDataset, register

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0)}
TRENDS = ["brighter", "darker"]


@dataclass
class ToyConfig:
    num_frames: int = 4
    height: int = 16
    width: int = 16
    size: int = 8  # clips per split


@register("toy")
class ToyDataset(VideoDataset):
    config = ToyConfig
    attributes = {"colour": len(COLOURS), "trend": len(TRENDS)}

    def __init__(self, cfg: ToyConfig, split: str, train: bool | None = None):
        self.cfg = cfg
        g = torch.Generator().manual_seed(sum(map(ord, split)))  # a seed per split, the same in every process
        self.labels = torch.stack([torch.randint(n, (cfg.size,), generator=g) for n in self.attributes.values()], 1)

    def __len__(self) -> int:
        return self.cfg.size

    def __getitem__(self, i: int) -> dict:
        colour, trend = self.labels[i].tolist()
        ramp = torch.linspace(0.2, 1.0, self.cfg.num_frames)
        ramp = ramp if trend == 0 else ramp.flip(0)
        rgb = torch.tensor(list(COLOURS.values())[colour])
        video = (rgb[:, None, None, None] * ramp[None, :, None, None]).expand(3, -1, self.cfg.height, self.cfg.width)
        return {
            "video": video.clone(),
            "caption": f"a {list(COLOURS)[colour]} screen getting {TRENDS[trend]}",
            "labels": self.labels[i],
            "unseen": torch.tensor(False),
        }
