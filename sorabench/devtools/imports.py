"""The import graph of sorabench, read from the source with `ast` (nothing is imported), and the layers it must keep.

    python -m sorabench.devtools.imports [package dir]    # edges by layer, cycles, upward edges; exit 1 on either

Every `import sorabench...` / `from sorabench... import ...` counts, at module level and inside functions: a
function-level import hides a cycle from Python's import order, not from the design. `tests/test_imports.py` runs
the same checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# A module may import its own layer or lower ones, never a higher one (the first matching prefix wins). Commands
# sit on the libraries they wire together; within a layer imports may go sideways, as long as they make no cycle.
LAYERS = [
    ("sorabench.cli", 5), ("sorabench.devtools", 5),
    ("sorabench.commands", 4),
    ("sorabench.sweep", 4),
    ("sorabench.metrics.evaluate", 3),  # scoring trains or loads the evaluator (training.evaluator_module)
    ("sorabench.training", 3), ("sorabench.precision", 3),
    ("sorabench.report", 3),  # the report library: reads runs through tracking, writes files
    ("sorabench.metrics", 2),
    ("sorabench.models", 1), ("sorabench.data", 1), ("sorabench.latents", 1), ("sorabench.diffusion", 1),
    ("sorabench.tracking", 1), ("sorabench.pipeline", 1),
    ("sorabench.config", 0), ("sorabench.files", 0), ("sorabench", 0),
]
LAYER_NAMES = {5: "entry points", 4: "commands", 3: "training", 2: "metrics", 1: "models, data, diffusion, tracking",
               0: "config, files"}


def layer(module: str) -> int:
    return next(n for prefix, n in LAYERS if module == prefix or module.startswith(prefix + "."))


def modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the sorabench modules it imports anywhere in its source."""
    known = modules(package_dir)
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from sorabench.metrics import evaluate` imports the submodule, not just the package
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a → ... → a) through each strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [shortest_cycle(graph, group) for group in groups]


def shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:  # breadth first within the group, back to `start`
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & group):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    return [start]


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]).resolve() if argv else PACKAGE_DIR
    graph = import_graph(package_dir)
    for n in sorted(LAYER_NAMES, reverse=True):
        print(f"layer {n} ({LAYER_NAMES[n]}):")
        for a in sorted(m for m in graph if layer(m) == n):
            if graph[a]:
                print(f"  {a} -> {', '.join(f'{b} [{layer(b)}]' for b in sorted(graph[a]))}")
    found, up = cycles(graph), upward_edges(graph)
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} edges")
    print(f"cycles: {len(found)}")
    for c in found:
        print("  " + " -> ".join(c))
    print(f"upward edges (a lower layer importing a higher one): {len(up)}")
    for a, b in up:
        print(f"  {a} [{layer(a)}] -> {b} [{layer(b)}]")
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
