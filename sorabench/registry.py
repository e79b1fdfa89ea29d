"""Names to classes: sorabench's one config -> object idiom (conditioning strategies, datasets, metrics).

A module keeps its table (`STRATEGIES = {}`) and decorates each class with `@register("name")`, where
`register = registrar(STRATEGIES, "conditioning strategy")`; the config names the class (`conditioning=<name>`).
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
