"""The linters the project keeps clean (their settings: pyproject.toml): ruff over the
Python, cython-lint over the kernels."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent


def _tool(name):
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed: jobs/install.sh installs it with the "
                        "`test` extra")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


@pytest.mark.parametrize("name,args", [
    ("ruff", ["check", "dbmpi", "tests", "jobs", "data", "setup.py"]),
    ("cython-lint", ["kernels/_kernels.pyx"])])
def test_linter_finds_nothing(name, args):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([_tool(name), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
