"""The wheel is complete: built from the repository, installed elsewhere, it finds its configs.

`pip wheel --no-deps .` on a copy of the source (an in-tree build would leave build/ in the
checkout), installed into a bare target directory and run from a directory that is not the
source tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "sidpipe", "conf")


@pytest.mark.multiprocess
def test_wheel_contains_the_configs_and_trains_outside_the_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("sidpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"sidpipe/conf/{y}" for y in yamls} <= names  # every config ships
    modules = {str(p.relative_to(REPO)) for p in (REPO / "sidpipe").rglob("*.py")}
    assert modules <= names, f"not in the wheel: {sorted(modules - names)}"  # every module
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = "import sidpipe.config as c; print(c.__file__); print(c.CONF_DIR)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=elsewhere, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    module_file, conf_dir = r.stdout.split()
    assert module_file.startswith(str(site)) and conf_dir == str(site / "sidpipe" / "conf")
    r = subprocess.run(
        [sys.executable, "-m", "sidpipe.cli", "train", "--cfg", "job", "model=resnet18",
         "data=cifar10"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "name: resnet18" in r.stdout and "name: cifar10" in r.stdout
    assert not (REPO / "build").exists()
