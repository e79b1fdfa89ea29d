"""Names to classes: sorabench's one config -> object idiom, for every config group with alternatives.

A module keeps its table (`STRATEGIES = {}`) and decorates each class with `@register("name")`, where
`register = registrar(STRATEGIES, "conditioning strategy")`; the config names the class (`conditioning=<name>`) and
its other keys are the constructor's arguments: `lookup(STRATEGIES, "conditioning strategy", name)(**options)`.
Tables: conditioning strategies (models/conditioning.py), diffusion objectives (diffusion.py), text encoders
(models/text.py), VAEs (models/vae.py), feature networks (metrics/features.py), datasets (data/dataset.py) and
metrics (metrics/registry.py).

Why names and not Hydra's `_target_: module.Class`: the names are what a sweep varies, what MLflow shows in its
params and what the report groups by (`conditioning=adaln_zero`, not an import path); a checkpoint stores names, so
moving a class to another module never breaks an old checkpoint; and an unknown name fails with the list of the
registered ones, before any compute.
"""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, type], kind: str, check: Callable[[str, type], None] | None = None):
    """A `register(name)` class decorator that adds classes to `table`; `check(name, cls)` may reject one."""

    def register(name: str):
        def add(cls: type) -> type:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered ({table[name].__name__})")
            if check is not None:
                check(name, cls)
            table[name] = cls
            return cls

        return add

    return register


def lookup(table: dict[str, type], kind: str, name: str) -> type:
    """The class registered as `name`, or a one-line error listing the registered names."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]
