"""Composing a command's config with Hydra's compose API, and turning bad input into one-line errors.

Every command has one YAML under `conf/` (`train.yaml`, `sweep.yaml`, ...) composed from config groups that mirror
the code (`data/`, `vae/`, `dit/`, `conditioning/`, `text_encoder/`, `diffusion/`, `trainer/`, `metrics/`, `sweep/`).
The same `compose_config` builds each Optuna trial's config in `sweep/space.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

# Inside the package, so an installed wheel finds its configs (in a checkout, sorabench/conf links to conf/).
CONF_DIR = Path(__file__).resolve().parent / "conf"

OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(p), replace=True)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it. The CLI prints it on one line and exits with 2."""


# `train.yaml` and `evaluate.yaml` pick `optional metrics: default_for_${data}`: a dataset may bring its own metrics
# default (conf/metrics/default_for_folder.yaml: standard FVD with the I3D). One that brings none (a new dataset is
# one module + one YAML) is scored by the embedded evaluator trained on its own labels; an unlabelled one is then told
# to use metrics=i3d (`sorabench.metrics.evaluate.check_evaluator_data`).
FALLBACK_METRICS = "evaluator"


def compose_config(config_name: str, overrides: list[str], command: str | None = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides; struct mode, so an unknown key is an error, and the
    typed schema (`check_types`), so a value of the wrong type is an error naming its key. The user's plugins
    (`plugins=[...]`, the `sorabench.plugins` entry points) are imported first and their configs searched."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no config {config_name}.yaml in {CONF_DIR}")
    overrides = with_plugin_configs(overrides, load_plugins(overrides))
    head = [f"command={command or config_name}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=[*head, *overrides], return_hydra_config=True)
        if "metrics" in cfg.hydra.runtime.choices and "metrics" not in cfg:  # the dataset brings no metrics default
            overrides = [*overrides, f"metrics={FALLBACK_METRICS}"]
            cfg = compose(config_name=config_name, overrides=[*head, *overrides], return_hydra_config=True)
        choices = set(cfg.hydra.runtime.choices)  # the config groups this config really selects from
        with open_dict(cfg):
            del cfg["hydra"]
        # The schema: the same config group options with no value overrides, i.e. the YAML defaults the user chose
        # (found on the same search path: `hydra.searchpath=[file://<dir>]` adds config group options from <dir>).
        searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
        schema = compose(config_name=config_name, overrides=[*head, *searchpath, *group_choices(overrides, choices)])
    check_types(cfg, schema)
    return cfg


# ---- plugins: a user's strategies, metrics and datasets in their own package -------------------------------------
# `sorabench train plugins=[mylab.strategies] conditioning=my_strategy`: each module is imported before the config is
# composed, so its `@register(...)` classes are known to every check; a `conf/` folder beside the module (or the path
# in its `SORABENCH_CONF`) joins Hydra's search path, so its YAMLs are config group options (`conf/conditioning/
# my_strategy.yaml`). Installed packages can declare modules in the entry-point group `sorabench.plugins` instead;
# those load in every command. A sweep passes `plugins` to every trial and worker.
ENTRY_POINT_GROUP = "sorabench.plugins"


def plugin_names(overrides: list[str]) -> list[str]:
    """The module names of a `plugins=` override (a name or a list), [] without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "plugins"]
    if not found:
        return []
    value = OverridesParser.create().parse_overrides([found[-1].lstrip("+~")])[0].value()
    names = value if isinstance(value, list) else [] if value in (None, "") else [value]
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"plugins={value!r}: {name!r} is not a Python module name (e.g. mylab.strategies)")
    return names


def load_plugins(overrides: list[str]) -> list[Path]:
    """Import the plugin modules (once per process); return the config folders they bring."""
    import importlib
    from importlib.metadata import entry_points

    modules = [(ep.value.split(":")[0], f"entry point {ep.name!r}") for ep in entry_points(group=ENTRY_POINT_GROUP)]
    modules += [(name, "plugins") for name in plugin_names(overrides)]
    folders = []
    for name, origin in modules:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing module or an error inside it: one line naming it
            raise ConfigError(f"{origin}: cannot import {name!r} ({type(e).__name__}: {e})") from e
        conf = getattr(module, "SORABENCH_CONF", None) or (
            Path(module.__file__).parent / "conf" if getattr(module, "__file__", None) else None)
        if conf is not None and Path(conf).is_dir() and Path(conf).resolve() not in folders:
            folders.append(Path(conf).resolve())
    return folders


def with_plugin_configs(overrides: list[str], folders: list[Path]) -> list[str]:
    """`overrides` with the plugins' config folders added to `hydra.searchpath` (beside any the user gave)."""
    if not folders:
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    paths, rest = [], []
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            paths += list(OverridesParser.create().parse_overrides([o])[0].value() or [])
        else:
            rest.append(o)
    paths += [f"file://{f}" for f in folders if f"file://{f}" not in paths]
    quoted = ",".join("'" + p.replace("\\", "\\\\").replace("'", "\\'") + "'" for p in paths)
    return [*rest, f"hydra.searchpath=[{quoted}]"]


# ---- the typed schema -------------------------------------------------------------------------------------------
# Every key's type is its default's type in the YAML (bool, int, float: an int is accepted for a float), checked once
# after composition, for every command and every sweep trial. The defaults cannot show two things, listed here:
# keys whose default is null, and keys that take more than their default's type.
TYPES = {
    "evaluate.every_n_steps": ("int", "null"),
    "trainer.val_check_interval": ("number", "null"),  # int: steps; float: a fraction of an epoch (Lightning)
    "trainer.limit_val_batches": ("number", "null"),
    "trainer.gradient_clip_val": ("number", "null"),
    "trainer.max_epochs": ("int", "null"),
    "trainer.fast_dev_run": ("bool", "int"),
    "data.fps": ("number", "null"),
    "n_trials": ("int", "null"),
    "threads": ("int", "null"),
}
TYPE_NAMES = {"bool": "true or false", "int": "an integer", "number": "a number", "null": "null"}


def group_choices(overrides: list[str], groups: set[str]) -> list[str]:
    """The overrides that pick an option of one of `groups` (`dit=S`, `+metrics=torchscript`), not values (`encode`'s
    `vae=<checkpoint>` is a value: encode has no vae group)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split("@")[0] in groups]


def kind_of(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    return None


def conforms(value, kinds: tuple[str, ...]) -> bool:
    found = "null" if value is None else kind_of(value)
    return found in kinds or (found == "int" and "number" in kinds)


def check_types(cfg: DictConfig, schema: DictConfig):
    """Raise a ConfigError naming the first key whose value does not have its schema type (lists: per element)."""
    values = flatten(OmegaConf.to_container(cfg, resolve=True))
    for key, default in flatten(OmegaConf.to_container(schema, resolve=True)).items():
        if key not in values:
            continue
        value = values[key]
        if isinstance(default, list):
            kinds = {kind_of(d) for d in default}
            if not default or None in kinds or len(kinds) > 1 or "bool" in kinds:
                continue  # an empty, mixed or non-numeric list has no element type to check
            (kind,) = kinds
            if not isinstance(value, list) or not all(conforms(v, (kind,)) for v in value):
                raise ConfigError(f"{key}={value!r}: must be a list of {TYPE_NAMES[kind].split(' ', 1)[-1]}s")
            continue
        kinds = TYPES.get(key) or ((kind_of(default),) if kind_of(default) else None)
        if kinds and not conforms(value, kinds):
            expected = " or ".join(TYPE_NAMES[k] for k in kinds)
            raise ConfigError(f"{key}={value!r}: must be {expected} (default: {default!r})")


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
