"""Composing a command's config with Hydra's compose API, and turning bad input into one-line errors.

Every command has one YAML under `conf/` (`train.yaml`, `sweep.yaml`, ...) composed from config groups that mirror
the code (`data/`, `vae/`, `dit/`, `conditioning/`, `text_encoder/`, `diffusion/`, `trainer/`, `metrics/`, `sweep/`).
The same `compose_config` builds each Optuna trial's config in `sweep.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

# Inside the package, so an installed wheel finds its configs (in a checkout, sorabench/conf links to conf/).
CONF_DIR = Path(__file__).resolve().parent / "conf"

OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(p), replace=True)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it. The CLI prints it on one line and exits with 2."""


def compose_config(config_name: str, overrides: list[str], command: str | None = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides; struct mode, so an unknown key is an error."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no config {config_name}.yaml in {CONF_DIR}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=[f"command={command or config_name}", *overrides])
    return cfg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def require(condition: bool, key: str, value, reason: str):
    """Raise a ConfigError naming `key=value` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {reason}")


def config_key(*parts) -> str:
    """A short stable hash of config parts: the name of every cached thing (shared runs, latents, statistics)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the config as MLflow params and as Optuna search-space keys."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
