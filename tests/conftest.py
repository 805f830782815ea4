import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbmpi.mpienv import launcher_env

ROOT = Path(__file__).resolve().parents[1]
# one BLAS thread a rank, what Open MPI needs, and DBMPI_TRANSPORT (tcp: every message of
# every multi-rank test over TCP); every process the tests start inherits it
os.environ.update(launcher_env())


def ppid(pid: int) -> int:
    """The parent of process ``pid`` (0 if it is gone)."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def running(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until_gone(pids, timeout: float, after: str) -> None:
    """Wait for the event: none of ``pids`` runs any more; fail after ``timeout`` s."""
    import time
    t_end = time.monotonic() + timeout
    while left := [p for p in pids if running(p)]:
        assert time.monotonic() < t_end, f"{left} still running {timeout} s after {after}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory):
    from dbmpi.data import make_digits
    p = tmp_path_factory.mktemp("data") / "digits.h5"
    make_digits(p)
    return p


def job_config(tmp_path, digits_path, name, extra=""):
    """jobs/configs/NAME with its data path pointed at the test's dataset (plus ``extra``
    text); the network it includes stays where it is."""
    text = (ROOT / "jobs" / "configs" / name).read_text().replace(
        'path = "data/digits.h5"', f'path = "{digits_path}"').replace(
        'file = "../networks/', f'file = "{ROOT / "jobs" / "networks"}/')
    p = tmp_path / name
    p.write_text(text + extra)
    return p


def run_cli(*args, timeout=120, env=None, cwd=ROOT):
    """Run ``python -m dbmpi ARGS`` and return the CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dbmpi", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def _launcher() -> str:
    try:
        v = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "openmpi" if ("Open MPI" in v or "prterun" in v or "PRRTE" in v) else "mpich"


LAUNCHER = _launcher()
# what a scheduler sends the launcher to preempt a job: Hydra (MPICH) forwards SIGTERM to
# every rank; Open MPI's prterun ends the job on SIGTERM and forwards SIGUSR1
PREEMPT_SIGNAL = "SIGUSR1" if LAUNCHER == "openmpi" else "SIGTERM"


def run_mpi(n, *args, timeout=120, module=True):
    """``mpiexec -n N python -m mpi4py [-m dbmpi] ARGS`` under a timeout; the whole process
    group is killed if it runs over, so a hang fails the test instead of the suite."""
    import signal
    e = dict(os.environ)
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py"]
    cmd += (["-m", "dbmpi"] if module else []) + [str(a) for a in args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"mpiexec -n {n} {' '.join(map(str, args))} hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
