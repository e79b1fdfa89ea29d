"""The latent cache: a dataset split encoded once by a trained VAE, reused by every DiT run that needs it.

A cache file holds the posterior means and log-variances (unscaled), the VAE's latent scale factor, captions,
labels and unseen flags. Its name is a key: the SHA-256 of the VAE checkpoint's bytes, the data config and the
split. A DiT run computes the key it needs and loads only that file, so a retrained VAE or a changed data config can
never silently reuse stale latents; the key is stored inside the file too and checked on load.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from sorabench.config import config_key
from sorabench.data.folder import collate_skipping
from sorabench.data.module import build_dataset, clip_fields
from sorabench.files import atomic_save, file_sha256


def cache_key(vae_ckpt: str | Path, data_cfg: dict, split: str) -> str:
    return config_key(file_sha256(vae_ckpt), clip_fields(data_cfg), split)


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "latents" / f"{key}.pt"


@torch.no_grad()
def encode_split(vae_module, data_cfg: dict, split: str, batch_size: int = 64) -> dict:
    """Encode every clip of a split (in evaluation mode: centre crops, no augmentation)."""
    dataset = build_dataset(data_cfg, split, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping)
    vae_module.eval()
    means, logvars, captions, labels, unseen = [], [], [], [], []
    device = next(vae_module.parameters(), torch.zeros(())).device
    for batch in loader:
        if "video" not in batch:  # every clip of this batch was skipped (folder data, on_error: skip)
            continue
        mean, logvar = vae_module.vae.encode(batch["video"].to(device))
        means.append(mean.cpu())
        logvars.append(logvar.float().clamp(min=-30).cpu())  # the identity VAE's logvar is -inf-like
        captions += list(batch["caption"])
        labels.append(batch["labels"])
        unseen.append(batch["unseen"])
    return {
        "mean": torch.cat(means),
        "logvar": torch.cat(logvars),
        "captions": captions,
        "labels": torch.cat(labels),
        "unseen": torch.cat(unseen),
        "scale_factor": float(vae_module.scale_factor),
    }


def load_or_encode(vae_module, vae_ckpt: str | Path, data_cfg: dict, split: str, cache_dir: str | Path) -> dict:
    """The cached latents of a split, encoding (and writing the cache) only if no file exists for this key."""
    key = cache_key(vae_ckpt, data_cfg, split)
    path = cache_path(cache_dir, key)
    if path.is_file():
        cache = torch.load(path, weights_only=True)
        if cache.get("key") != key:
            raise ValueError(f"latent cache {path} holds key {cache.get('key')!r}, expected {key!r}: delete it")
        return cache
    cache = {**encode_split(vae_module, data_cfg, split), "key": key, "vae_ckpt": str(vae_ckpt), "split": split}
    # Atomic, under a temporary name of this writer's own: a crash mid-write leaves no half cache under the real
    # key, and two sweep workers encoding the same split at once both succeed.
    atomic_save(cache, path)
    return cache


class LatentDataset(torch.utils.data.Dataset):
    """Scaled latents drawn from the cached posterior: z = (mean + std * eps) * scale_factor."""

    def __init__(self, cache: dict, sample_posterior: bool = True):
        self.cache, self.sample_posterior = cache, sample_posterior
        self.scale = cache["scale_factor"]

    def __len__(self) -> int:
        return len(self.cache["captions"])

    def __getitem__(self, i: int) -> dict:
        mean = self.cache["mean"][i]
        z = mean
        if self.sample_posterior:
            z = mean + torch.exp(0.5 * self.cache["logvar"][i]) * torch.randn_like(mean)
        return {
            "latent": z * self.scale,
            "caption": self.cache["captions"][i],
            "labels": self.cache["labels"][i],
            "unseen": self.cache["unseen"][i],
        }


class LatentDataModule(L.LightningDataModule):
    """Train/val batches of cached latents (posterior samples in training, means in validation).

    With a frozen `text_encoder`, each batch also carries `text`, its captions' embeddings (a `TextEmbedding`): the
    encoder embeds every caption once (`precompute`, kept on disk beside the latents under `cache_dir/text`), so a
    batch costs a lookup, and the DiT's LightningModule never holds the encoder."""

    def __init__(self, train_cache: dict, val_cache: dict, batch_size: int, num_workers: int = 0,
                 text_encoder=None):
        super().__init__()
        self.train_set = LatentDataset(train_cache, sample_posterior=True)
        self.val_set = LatentDataset(val_cache, sample_posterior=False)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.text_encoder = text_encoder

    def collate(self, items: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(items)
        if self.text_encoder is not None:
            batch["text"] = self.text_encoder.encode(list(batch["caption"]))
        return batch

    def train_dataloader(self):
        seed = int(torch.randint(2**31 - 1, (1,)))  # from the global RNG that seed_everything sets
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) > self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=self.collate,
        )

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                           collate_fn=self.collate)
