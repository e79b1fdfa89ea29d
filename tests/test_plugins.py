"""A researcher's own strategy in their own package, outside sorabench, through the real CLI: `plugins=[...]`
imports it before the config is checked, its conf/ folder joins the config search path, sweeps pass it on."""

import os
import subprocess
import sys
import textwrap

import pytest

from sorabench.config import ConfigError, compose_config, plugin_names
from tests.conftest import TINY


def make_plugin(root):
    pkg = root / "mylab"
    (pkg / "conf" / "conditioning").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "strategies.py").write_text(textwrap.dedent('''
        from sorabench.models.conditioning import STRATEGIES, register


        @register("my_adaln_zero")
        class MyAdaLNZero(STRATEGIES["adaln_zero"]):
            """adaLN-Zero under a name of the lab's own."""
    '''))
    (pkg / "conf" / "conditioning" / "my_adaln_zero.yaml").write_text("name: my_adaln_zero\ntimestep: adaln_zero\n")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "sorabench.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_plugin_names_and_errors():
    assert plugin_names(["data=shapes"]) == []
    assert plugin_names(["plugins=[a.b,c]"]) == ["a.b", "c"] and plugin_names(["plugins=a.b"]) == ["a.b"]
    with pytest.raises(ConfigError, match="'a-b' is not a Python module name"):
        plugin_names(["plugins=[a-b]"])
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_lab.x'"):
        compose_config("train", ["plugins=[no_such_lab.x]"], command="train")


def test_unknown_strategy_without_the_plugin_is_one_line(tmp_path):
    env = make_plugin(tmp_path)
    out = cli(["train", "conditioning=my_adaln_zero", "--cfg", "job"], env, tmp_path)
    assert out.returncode == 2 and "my_adaln_zero" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_strategy_from_the_users_own_package_trains_from_the_cli(tmp_path):
    env = make_plugin(tmp_path)
    args = ["train", "plugins=[mylab.strategies]", "conditioning=my_adaln_zero", f"outputs={tmp_path / 'out'}",
            "mlflow.enabled=false", "evaluate.enabled=false", "name=mine", *TINY]
    out = cli(args, env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import torch

    ckpt = torch.load(tmp_path / "out" / "train" / "mine" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["hyper_parameters"]["conditioning"]["name"] == "my_adaln_zero"
