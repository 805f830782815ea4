"""Preemption signals and the dead-rank sentinel.

Preemption: SIGTERM and SIGUSR1 (what ``mpiexec``/Hydra and Slurm's ``--signal`` deliver to
every rank) set a flag; the trainers check it between steps, checkpoint, stop every rank
cleanly and exit with :data:`EXIT_PREEMPTED`.

Dead ranks: MPI cannot outlive a dead rank, and Hydra ends the other ranks with SIGKILL,
so no rank can report the death itself.  Each rank therefore starts, before MPI is
initialised, a tiny sentinel process in its own session that holds the read end of a pipe
from the rank.  When the rank exits cleanly it first writes a byte; when it dies (SIGKILL,
segfault, OOM) the pipe closes without one.  The sentinel records the time of death in the
run directory, waits a moment for the others, and the sentinel of the rank that died first
prints one line naming the rank, its role, pid and host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["EXIT_PREEMPTED", "install_preemption", "preempted", "Sentinel"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed because of a signal; resume with --resume

_flag = {"signal": None}


def _handler(signum, frame):
    _flag["signal"] = signum


def install_preemption() -> None:
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _handler)


def preempted() -> bool:
    return _flag["signal"] is not None


_SENTINEL = r"""
import os, sys, time, json, socket
fd, rank, role, pid, dirpath = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
data = b""
while True:
    try:
        chunk = os.read(fd, 64)
    except OSError:
        chunk = b""
    if not chunk:
        break
    data += chunk
if b"ok" in data or b"err" in data:
    sys.exit(0)                      # clean exit, or an error the rank reported itself
t = time.time()
os.makedirs(dirpath, exist_ok=True)
with open(os.path.join(dirpath, f"{rank}.died"), "w") as f:
    f.write(repr(t))
time.sleep(1.5)                      # let the other ranks' sentinels record their times
deaths = []
for name in os.listdir(dirpath):
    if name.endswith(".died"):
        try:
            deaths.append((float(open(os.path.join(dirpath, name)).read()), int(name[:-5])))
        except (OSError, ValueError):
            pass
if deaths and min(deaths) == (t, rank):
    sys.stderr.write(f"dbmpi: error: rank {rank} ({role}, pid {pid}, host {socket.gethostname()}) "
                     "died (killed or crashed); MPI ended the whole job. Resume from the last "
                     "checkpoint with `python -m dbmpi train --resume RUN_DIR`.\n")
    sys.stderr.flush()
"""


class Sentinel:
    """Start the sentinel for this rank; call :meth:`clean_exit` or :meth:`error` before exiting."""

    def __init__(self, rank: int, role: str, run_dir):
        r, w = os.pipe()
        d = Path(run_dir) / ".ranks"
        self.w = w
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SENTINEL, str(r), str(rank), role, str(os.getpid()), str(d)],
            pass_fds=(r,), start_new_session=True, stdin=subprocess.DEVNULL)
        os.close(r)

    def _say(self, what: bytes) -> None:
        if self.w is not None:
            try:
                os.write(self.w, what)
                os.close(self.w)
            except OSError:
                pass
            self.w = None

    def clean_exit(self) -> None:
        self._say(b"ok")

    def error(self) -> None:
        self._say(b"err")
