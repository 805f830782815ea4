"""Preemption signals and the per-rank guard that names a rank that died.

Preemption: SIGTERM and SIGUSR1 (what ``mpiexec``/Hydra and Slurm's ``--signal`` deliver to
every rank) set a flag; the trainers check it between steps, checkpoint, stop every rank
cleanly and exit with :data:`EXIT_PREEMPTED`.

Dead ranks: MPI cannot outlive a dead rank, and the launcher ends the other ranks with
SIGKILL, so no MPI process can report a death.  Watching from outside does not work either:
a killed rank with large memory mappings finishes dying after the launcher has already
killed the others.  So before MPI starts, each rank forks: the child becomes the MPI
process and the parent, a small *guard*, waits for it.  The guard holds the rank's
launcher connections (PMI socket, stdout/stderr) open, so the launcher notices nothing
until the guard exits, and ``waitpid`` tells the guard exactly how its rank ended.  A rank
that ends without saying "ok" or "error" first (killed, crashed) gets one line from its
guard naming the rank, its role, pid, host and the signal; then the guard exits and the
launcher ends the job.  The guard forwards signals (SIGTERM, SIGUSR1, SIGUSR2, SIGINT) to
its rank, and the rank dies with its guard (PR_SET_PDEATHSIG), so the launcher's cleanup
reaches it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

__all__ = ["EXIT_PREEMPTED", "install_preemption", "preempted", "Guard"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed because of a signal; resume with --resume

_flag = {"signal": None}


def _handler(signum, frame):
    _flag["signal"] = signum


def install_preemption() -> None:
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _handler)


def preempted() -> bool:
    return _flag["signal"] is not None


_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15


def _prctl(option, arg) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: no death signal, no process name


class Guard:
    """Fork this rank into a guard (the parent, which never returns) and the MPI process.

    Call in every rank before MPI is initialised; only the child returns, with a Guard on
    which it calls :meth:`clean_exit` or :meth:`error` before it exits.
    """

    def __init__(self, rank: int, role: str):
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized():
            raise RuntimeError("MPI was initialised before dbmpi's rank guard forked (a fork "
                               "after MPI_Init is undefined behaviour): start the job as "
                               "`mpiexec ... python -m mpi4py -m dbmpi train ...`, and import "
                               "nothing that imports mpi4py.MPI before it")
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            self.w = w
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:   # the guard is already gone
                os._exit(1)
            _prctl(_PR_SET_NAME, ctypes.c_char_p(f"dbmpi-r{rank}".encode()[:15]))
            return
        os.close(w)
        self._watch(pid, r, rank, role)

    @staticmethod
    def _watch(pid, r, rank, role):
        def forward(signum, frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass                     # my rank has ended; its code decides mine
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            signal.signal(s, forward)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                status = 1 << 8
                break
            except InterruptedError:
                continue
        said = b""
        try:
            while chunk := os.read(r, 64):
                said += chunk
        except OSError:
            pass
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            code = 128 + sig
            if not said:
                print(f"dbmpi: error: rank {rank} ({role}, pid {pid}, host "
                      f"{socket.gethostname()}) was killed by {signal.Signals(sig).name}; MPI "
                      "ends the whole job. Resume from the last checkpoint with `python -m "
                      "dbmpi train --resume RUN_DIR`.", file=sys.stderr, flush=True)
        else:
            code = os.WEXITSTATUS(status)
            if code and not said:
                print(f"dbmpi: error: rank {rank} ({role}, pid {pid}, host "
                      f"{socket.gethostname()}) exited with code {code} without a message",
                      file=sys.stderr, flush=True)
        os._exit(code)

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
