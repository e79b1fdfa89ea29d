"""What a dataset declares, and the registry that makes it selectable as `data=<name>`.

A dataset is one `VideoDataset` class, registered by name with `@register("name")` (the idiom of the conditioning
registry, `sorabench/models/conditioning.py`), plus `conf/data/<name>.yaml` with `name: <name>`, its options and the
loader's `batch_size` / `num_workers`. It declares:
- `config`: the dataclass of its options (every YAML key but name, batch_size, num_workers); it must have
  `num_frames`, `height` and `width`, which size the VAE's latents;
- `attributes`: its label schema, {attribute: number of values} in `labels` column order ({} without labels); the
  evaluator's heads, the alignment metric and the report's attribute tables follow it;
- optionally `collate` (the DataLoader's collate_fn), `fingerprint` (what its clips depend on beyond the config,
  for cache keys), `check` (cheap checks `sorabench train` runs before training) and `worker_start` (how its
  DataLoader workers start: "forkserver" or "spawn" where forking the parent is unsafe).
Items are dicts: `video` (3, T, H, W) in [-1, 1], `caption` str, `labels` (A,) long, `unseen` bool.

A built-in dataset lives in `sorabench/data/<name>.py` and is imported the first time `data=<name>` is asked for,
so nothing else lists it; a dataset in any other module (a test, a user package) registers when that module is
imported.
"""

from __future__ import annotations

import importlib

import torch

from sorabench.config import ConfigError
from sorabench.registry import registrar


class VideoDataset(torch.utils.data.Dataset):
    config: type
    attributes: dict[str, int] = {}
    collate = None  # None: torch's default collation
    # How DataLoader workers start (`data.num_workers` > 0): None is the platform's default (fork on Linux). A dataset
    # that decodes files in the parent (PyAV/FFmpeg threads) needs a clean start ("forkserver" or "spawn"): a worker
    # forked from it can deadlock.
    worker_start: str | None = None

    def __init__(self, cfg, split: str, train: bool | None = None):
        """One split; `train` (default: split == "train") turns on training-time augmentation where there is any."""
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, cfg) -> str | None:
        return None  # the config defines the clips

    @classmethod
    def check(cls, cfg):
        pass


DATASETS: dict[str, type[VideoDataset]] = {}


register = registrar(DATASETS, "dataset")  # @register("name"): `data=<name>`


def dataset_class(name: str) -> type[VideoDataset]:
    if name not in DATASETS and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"sorabench.data.{name}")  # a built-in registers itself on import
        except ModuleNotFoundError as e:
            if e.name != f"sorabench.data.{name}":
                raise  # the module exists but imports something missing: say so
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r}: no such dataset (a built-in is sorabench/data/<name>.py; registered "
                          f"so far: {sorted(DATASETS)})")
    return DATASETS[name]
