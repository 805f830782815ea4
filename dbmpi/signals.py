"""Preemption signals and the per-rank guard that names a rank that died.

Preemption: SIGTERM and SIGUSR1 (what ``mpiexec``/Hydra and Slurm's ``--signal`` deliver to
every rank) set a flag; the trainers check it between steps, checkpoint, stop every rank
cleanly and exit with :data:`dbmpi.exitcodes.PREEMPTED`.

Dead ranks: MPI cannot outlive a dead rank, and the launcher ends the other ranks with
SIGKILL, so no MPI process can report a death.  Watching from outside does not work either:
a killed rank with large memory mappings finishes dying after the launcher has already
killed the others.  So before MPI starts, each rank forks: the child becomes the MPI
process and the parent, a small *guard*, waits for it.  The guard holds the rank's
launcher connections (PMI socket, stdout/stderr) open, so the launcher notices nothing
until the guard exits, and ``waitpid`` tells the guard exactly how its rank ended.  A rank
that ends without saying "ok" or "error" first (killed, crashed) gets one line from its
guard naming the rank, its role, pid, host and the signal; then the guard exits and the
launcher ends the job.  Failures that a dead peer causes in other ranks (their MPI library
crashes or raises) are held back (:meth:`Guard.report`), so the line names the first.  The
guard forwards signals (SIGTERM, SIGUSR1, SIGUSR2, SIGINT) to its rank, and the rank dies
with its guard (PR_SET_PDEATHSIG), so the launcher's cleanup reaches it.  A guard whose
launcher process is killed (Hydra's proxy, slurmstepd) kills its rank, which no launcher
would otherwise end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time

from . import exitcodes

__all__ = ["install_preemption", "preempted", "Guard"]

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


CRASH_GRACE_S = 2.0
LAUNCHER_CHECK_S = 1.0    # how often a guard checks that its launcher's process lives


def _marker_path() -> str:
    """A file name that the ranks of one job on one node share: the launcher's per-node
    process (Hydra's proxy, Open MPI's daemon, slurmstepd) is every guard's parent; its pid
    and start time name it uniquely."""
    import tempfile
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return os.path.join(tempfile.gettempdir(), f"dbmpi-failed-{ppid}-{started}")


def _sweep(mine: str) -> None:
    """Remove the markers of jobs whose launcher process has ended."""
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(mine), "dbmpi-failed-*")):
        try:
            if path != mine:
                os.kill(int(path.rsplit("-", 2)[1]), 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except (OSError, ValueError):
            pass


class Guard:
    """Fork this rank into a guard (the parent, which never returns) and the MPI process.

    Call in every rank before MPI is initialised (``ranks``: the job's size); only the child
    returns, with a Guard on which it calls :meth:`clean_exit` or :meth:`error` before it
    exits.
    """

    def __init__(self, rank: int, role: str, ranks: int = 2):
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized():
            raise RuntimeError("MPI was initialised before dbmpi's rank guard forked (a fork "
                               "after MPI_Init is undefined behaviour): start the job as "
                               "`mpiexec ... python -m mpi4py -m dbmpi train ...`, and import "
                               "nothing that imports mpi4py.MPI before it")
        self.marker = _marker_path() if ranks > 1 else None
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            self.w = w
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:   # the guard is already gone
                os._exit(exitcodes.FAILED)
            _prctl(_PR_SET_NAME, ctypes.c_char_p(f"dbmpi-r{rank}".encode()[:15]))
            return
        os.close(w)
        self._watch(pid, r, rank, role)

    def report(self, line: str, consequence: int = 1) -> None:
        """Print a failure line to stderr, unless it is likely a consequence of another.

        When one rank dies, the ranks that talk to it may crash in their MPI library (MPICH
        over UCX asserts on a failed RMA completion) or get an MPI error.  A report of such a
        failure first waits ``consequence`` times :data:`CRASH_GRACE_S` (0: SIGKILL, which only
        comes from outside; 1: a crash; 2: an MPI error or abort, the likeliest consequence),
        during which the launcher kills this rank if an earlier death is already ending the
        job; and on one node only
        the first report is printed (a marker file that the job's ranks there share).  So the
        line a user sees names the failure that came first; a crash of its own still gets
        its line, this much later.
        """
        time.sleep(consequence * CRASH_GRACE_S)
        if self.marker is not None:      # a job of one rank has no peer to defer to
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return                   # another rank on this node failed first
            except OSError:
                pass                     # no writable temporary directory: print anyway
            else:
                _sweep(self.marker)
        print(line, file=sys.stderr, flush=True)

    def _watch(self, pid, r, rank, role):
        def forward(signum, frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass                     # my rank has ended; its code decides mine
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            signal.signal(s, forward)
        who = f"dbmpi: error: rank {rank} ({role}, pid {pid}, host {socket.gethostname()})"
        status = self._wait(pid, who)
        said = b""
        try:
            while chunk := os.read(r, 64):
                said += chunk
        except OSError:
            pass
        if said.startswith(b"ok ") and os.WIFSIGNALED(status):
            # every rank had finished and agreed on the job's exit code; a signal while it
            # exits is the launcher ending the step because another rank exited first with
            # that (non-zero) code, as srun --kill-on-bad-exit does: keep the agreed code
            code = int(said[3:])
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            code = 128 + sig
            if not said:
                # SIGKILL comes from outside (a user, the OOM killer), never from a dead peer
                self.report(f"{who} was killed by {signal.Signals(sig).name}; MPI ends the "
                            "whole job. Resume from the last checkpoint with `python -m "
                            "dbmpi train --resume RUN_DIR`.",
                            consequence=int(sig != signal.SIGKILL))
        else:
            code = os.WEXITSTATUS(status)
            if code and not said:
                self.report(f"{who} exited with code {code} without a message", consequence=2)
        os._exit(code)

    def _wait(self, pid: int, who: str) -> int:
        """My rank's wait status.  In a job of several ranks, also watch the launcher's
        process that started me (Hydra's proxy, slurmstepd, Open MPI's daemon): if it
        ends without ending my rank (killed), MPI cannot go on, so my rank is killed rather
        than left running as an orphan."""
        launcher = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # wakes sigtimedwait
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return exitcodes.FAILED << 8
            if done:
                return status
            if self.marker is not None and os.getppid() != launcher:
                self.report(f"{who}: its launcher's process (pid {launcher}) ended while it "
                            "ran; killing it (MPI cannot go on without its launcher).",
                            consequence=0)
                os.kill(pid, signal.SIGKILL)
                launcher = os.getppid()      # report once; the next loop reaps my rank
            signal.sigtimedwait({signal.SIGCHLD}, LAUNCHER_CHECK_S)

    def _say(self, what: bytes) -> None:
        if self.w is not None:
            try:
                os.write(self.w, what)
                os.close(self.w)
            except OSError:
                pass
            self.w = None

    def clean_exit(self, code: int = 0) -> None:
        """Every rank agreed to end with ``code``; say so before MPI_Finalize."""
        self._say(b"ok %d" % code)

    def error(self) -> None:
        self._say(b"err")
