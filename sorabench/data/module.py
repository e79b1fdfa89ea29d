"""One LightningDataModule for every dataset (`data=<name>`, a registered `VideoDataset`: see `data/dataset.py`), with
seeded, worker-safe loading.

Batches are dicts: `video` (B, 3, T, H, W) in [-1, 1], `caption` list[str], `labels` (B, A) attribute labels, one
column per attribute of the dataset's label schema (`attribute_schema`; A = 0 for `folder`), `unseen` (B,) held-out
composition flags, and, for `folder`, `skipped` (reasons of samples dropped under `on_error: skip`, reported by
`sorabench.training.callbacks.SkippedSamplesReport`).
"""

from __future__ import annotations

import dataclasses

import lightning as L
import torch

from sorabench.config import require
from sorabench.data.dataset import dataset_class

LOADER_FIELDS = ("name", "batch_size", "num_workers")


def clip_fields(data_cfg: dict) -> dict:
    """The data config without how it is batched: what defines the clips, for cache keys. Where the clips depend on
    more than the config (a folder's files: `FolderDataset.fingerprint`), that content is part of it."""
    fields = {k: v for k, v in data_cfg.items() if k not in ("batch_size", "num_workers")}
    content = dataset_class(data_cfg.get("name")).fingerprint(data_cfg)
    if content is not None:
        fields["content"] = content
    return fields


def dataset_config(data_cfg: dict):
    """The dataset's own config from the `data` config group (loader fields removed); validates field names."""
    fields = {k: v for k, v in data_cfg.items() if k not in LOADER_FIELDS}
    cls = dataset_class(data_cfg.get("name")).config
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in fields.items():
        require(key in defaults, f"data.{key}", value, f"not a field of the {data_cfg['name']} dataset")
        if isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool):
            number_type = type(defaults[key])
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            require(ok and (number_type is float or float(value).is_integer()), f"data.{key}", value,
                    f"must be {'an integer' if number_type is int else 'a number'}")
            fields[key] = number_type(value)
    for key in ("batch_size", "num_workers"):
        value = data_cfg.get(key, 1)
        require(isinstance(value, int) and value >= (1 if key == "batch_size" else 0), f"data.{key}", value,
                "must be a non-negative integer (batch_size >= 1)")
    return cls(**fields)


def attribute_schema(data_cfg: dict) -> dict[str, int]:
    """The dataset's label schema, {attribute: number of values} in `labels` column order; {} when it has no labels.
    The evaluator trains on it and the alignment metric scores it."""
    return dict(dataset_class(data_cfg.get("name")).attributes)


def check_dataset(data_cfg: dict):
    """The dataset's own cheap checks before training (a folder indexes and probes its files)."""
    dataset_class(data_cfg.get("name")).check(dataset_config(data_cfg))


def build_dataset(data_cfg: dict, split: str, train: bool | None = None) -> torch.utils.data.Dataset:
    return dataset_class(data_cfg.get("name"))(dataset_config(data_cfg), split, train=train)


class VideoDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: dict, train_splits: tuple[str, ...] = ("train",), build=None):
        """`build(data_cfg, split)` makes a split's dataset (default `build_dataset`; the evaluator's wraps it)."""
        super().__init__()
        self.data_cfg = dict(data_cfg)
        self.train_splits = tuple(train_splits)
        self.build = build or build_dataset
        self.batch_size = int(data_cfg.get("batch_size", 32))
        self.num_workers = int(data_cfg.get("num_workers", 0))
        self.datasets: dict[str, torch.utils.data.Dataset] = {}

    def dataset(self, split: str) -> torch.utils.data.Dataset:
        if split not in self.datasets:
            self.datasets[split] = self.build(self.data_cfg, split)
        return self.datasets[split]

    def training_set(self) -> torch.utils.data.Dataset:
        sets = [self.dataset(s) for s in self.train_splits]
        return sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)

    def loader(self, dataset, shuffle: bool, drop_last: bool = False) -> torch.utils.data.DataLoader:
        # The generator is seeded from the global RNG, which `seed_everything(seed, workers=True)` sets, so the
        # shuffle order and each worker's augmentation stream are reproducible.
        seed = int(torch.randint(2**31 - 1, (1,)))
        cls = dataset_class(self.data_cfg.get("name"))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=cls.worker_start if self.num_workers > 0 else None,
            collate_fn=cls.collate,
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self):
        train = self.training_set()
        return self.loader(train, shuffle=True, drop_last=len(train) > self.batch_size)

    def val_dataloader(self):
        return self.loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self):
        return self.loader(self.dataset("test"), shuffle=False)
