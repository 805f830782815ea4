import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory):
    from dbmpi.data import make_digits
    p = tmp_path_factory.mktemp("data") / "digits.h5"
    make_digits(p)
    return p


def run_cli(*args, timeout=120, env=None, cwd=ROOT):
    """Run ``python -m dbmpi ARGS`` and return the CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dbmpi", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)
