"""sorabench as an installed package: a wheel built from this checkout, installed into a fresh venv, finds its configs
and trains, run from a directory that is not the checkout."""

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info litter.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("sorabench", "conf", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() and not (ROOT / name).is_symlink() else shutil.copy2
        copy(ROOT / name, src / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    shutil.rmtree(src / "sorabench" / "__pycache__", ignore_errors=True)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("sorabench-*.whl"))

    # A fresh venv that sees this interpreter's packages (torch etc.) through a .pth file, behind its own
    # site-packages, so the wheel's sorabench wins over any sorabench installed here.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own_site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (own_site / "shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([py, "-c", "import sorabench, sorabench.config as c; print(sorabench.__file__, c.CONF_DIR)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where, where

    cli = env_dir / "bin" / "sorabench"
    out = subprocess.run([cli, "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "train-vae" in out.stdout, out.stderr
    out = subprocess.run([cli, "train", "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert "conditioning: " in out.stdout and "adaln_zero" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([cli, "train", f"outputs={work / 'outputs'}", *TINY, "evaluate.enabled=false",
                          "mlflow.enabled=false"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (work / "outputs" / "train" / "default" / "result.json").is_file()
