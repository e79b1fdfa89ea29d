"""Run directories and checkpoints: what every command reads and writes around a training run.

A run lives in `outputs/<command>/<name>`: `checkpoints/last.ckpt` (resumed from when the command is run again) and,
once finished, `result.json` (returned instead of training again). Shared assets (the VAE of `vae_ckpt: auto`, the
evaluator) are runs too, named by a hash of their config and trained once under a lock. Checkpoints carry a
`sorabench_kind` tag, and a DiT checkpoint carries the VAE that decodes its latents (both written by callbacks,
`sorabench.training.callbacks`), so loading checks both.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from sorabench.config import ConfigError, compose_config, config_key
from sorabench.files import atomic_write_text, file_lock, state_dict_sha256
from sorabench.pipeline import TextToVideo
from sorabench.training.dit_module import DiTModule
from sorabench.training.vae_module import VAEModule

console = Console()
RESULT_FILE = "result.json"


def run_lock(run_dir: Path):
    """An exclusive lock on a run directory, so two sweep workers (on one machine or several sharing `outputs=`)
    never train the same shared asset at once."""
    return file_lock(Path(run_dir) / ".lock")


def finished_result(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(run_dir: str | Path, result: dict):
    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(result, indent=2, default=str))  # a reader never sees half a result


def shared_asset_config(cfg: DictConfig, config_name: str, key_parts: tuple, settings: dict) -> DictConfig:
    """The config of a run that every trial shares (the VAE, the evaluator): `conf/<config_name>.yaml` under
    `cfg.outputs`, named `auto-<hash of key_parts>` so that no other config reuses it, with the caller's data,
    tracking and progress-bar settings and `settings` (dotted keys) on top."""
    sub = compose_config(config_name, [f"outputs={cfg.outputs}", f"name=auto-{config_key(*key_parts)}"],
                         command=config_name)
    with open_dict(sub):
        sub.data = cfg.data
        sub.mlflow.enabled, sub.mlflow.tracking_uri = cfg.mlflow.enabled, cfg.mlflow.tracking_uri
        sub.trainer.progress_bar = cfg.trainer.progress_bar
        for key, value in settings.items():
            OmegaConf.update(sub, key, value, merge=False)
    return sub


def train_shared_asset(sub: DictConfig, train_fn, what: str) -> Path:
    """Train a shared asset once: concurrent sweep workers wait on a lock, later ones find its result."""
    with run_lock(Path(sub.run_dir)):
        if not finished_result(sub.run_dir):
            console.print(f"training the shared {what} ({sub.trainer.max_steps} steps) in {sub.run_dir}")
        return train_fn(sub)


# ---- checkpoints -----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """A sorabench checkpoint's contents (tensors and plain values only), or a one-line error naming the file: missing,
    truncated or corrupt, holding objects beyond tensors, or of another kind than expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind or 'the'} checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused to load, it holds objects beyond tensors and plain values "
                          f"(weights_only=True): {str(e).splitlines()[0]}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a cut-off zip archive, a file that is no checkpoint
        raise ConfigError(f"{path}: not a readable checkpoint, truncated or corrupt "
                          f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: not a sorabench checkpoint (holds a {type(ckpt).__name__})")
    found = ckpt.get("sorabench_kind")
    if kind is not None and found != kind:
        raise ConfigError(f"{path} is a {found or 'non-sorabench'} checkpoint, expected a {kind} checkpoint")
    return ckpt


def load_checkpoint_module(cls, path: str | Path, kind: str):
    """Load a LightningModule checkpoint of the expected kind, with a clear error for a missing or wrong file."""
    read_checkpoint(path, kind)
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def load_vae(path: str | Path):
    return load_checkpoint_module(VAEModule, path, "vae").eval()


def embedded_vae(embedded: dict, path: str | Path):
    """The VAE a DiT checkpoint carries (`EmbedVAE`), after checking its weights against their SHA-256."""
    vae = VAEModule(**embedded["hyper_parameters"])
    vae.load_state_dict(embedded["state_dict"])
    found = state_dict_sha256(vae)
    if found != embedded["weights_sha256"]:
        raise ConfigError(f"{path}: the embedded VAE's weights have SHA-256 {found[:12]}..., the checkpoint records "
                          f"{embedded['weights_sha256'][:12]}...: the file is corrupt or was edited")
    return vae.eval()


def load_dit(path: str | Path) -> DiTModule:
    """The DiTModule of a DiT checkpoint (its weights, the EMA average when training used one)."""
    read_checkpoint(path, "dit")
    return DiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


def load_pipeline(path: str | Path) -> TextToVideo:
    """A DiT checkpoint as a captions -> videos pipeline, with its VAE: the embedded one, or (checkpoints from before
    embedding) the VAE checkpoint its hyperparameters name."""
    ckpt = read_checkpoint(path, "dit")
    module = DiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    if "sorabench_vae" in ckpt:
        return module.pipeline(embedded_vae(ckpt["sorabench_vae"], path))
    vae_ckpt = Path(module.hparams.vae_ckpt)
    if not vae_ckpt.is_file():
        raise FileNotFoundError(f"{path} names its VAE checkpoint {vae_ckpt}, which does not exist from "
                                f"{Path.cwd()} (checkpoints written since the VAE is embedded need no such file)")
    return module.pipeline(load_vae(vae_ckpt))
