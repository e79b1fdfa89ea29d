"""Imports flow one way: every module imports in a fresh interpreter, no module imports a higher layer, no cycles
(`python -m sorabench.devtools.imports` prints the same graph)."""

import os
import subprocess
import sys
from pathlib import Path

from sorabench.devtools.imports import PACKAGE_DIR, cycles, import_graph, layer, modules, upward_edges

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    # PYTHONPATH: this checkout's modules, whatever an editable install points at
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count): " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    up = upward_edges(import_graph())
    assert not up, "upward imports: " + ", ".join(f"{a} [{layer(a)}] -> {b} [{layer(b)}]" for a, b in up)


def test_the_checks_find_a_cycle_and_read_function_level_imports(tmp_path):
    pkg = tmp_path / "sorabench"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "dit_run.py").write_text("from sorabench.metrics import evaluate\n")
    (pkg / "metrics").mkdir()
    (pkg / "metrics" / "__init__.py").write_text("")
    (pkg / "metrics" / "evaluate.py").write_text("def f():\n    from sorabench.training.dit_run import g\n")
    (pkg / "files.py").write_text("def h():\n    import sorabench.training.dit_run\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["sorabench.metrics.evaluate", "sorabench.training.dit_run",
                              "sorabench.metrics.evaluate"]]
    assert upward_edges(graph) == [("sorabench.files", "sorabench.training.dit_run")]
    assert PACKAGE_DIR.name == "sorabench"
