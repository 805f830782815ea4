"""A one-node Slurm on this machine, for the tests of the batch scripts and for trying a job
by hand: munged, slurmctld and slurmd started as root from a configuration generated in a
folder of their own (nothing under /etc is touched), stopped afterwards.

The node claims more CPUs than the machine has (``SlurmdParameters=config_overrides``), so
jobs of 5-7 ranks fit on 2 cores.  Debian's packages: ``slurm-wlm``, ``munge`` and
``libpmix-dev`` (Slurm's PMIx plugin loads ``libpmix.so``; Open MPI's ranks need it).

    with cluster() as slurm:
        subprocess.run(["sbatch", ...], env=slurm.env())

Usage as a script: ``python tests/slurm_cluster.py DIR`` starts one in DIR, prints the
``export SLURM_CONF=...`` line to use it from another shell, and stops it on Enter;
``python tests/slurm_cluster.py --install`` installs the packages where missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PACKAGES", "install", "unavailable", "cluster", "Slurm", "job_pids"]

PACKAGES = ["slurm-wlm", "munge", "libpmix-dev"]
CPUS = 8
_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")


def _missing() -> list[str]:
    miss = [t for t in _TOOLS if not shutil.which(t)]
    if not any(Path(d, "libpmix.so").exists() for d in
               ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")):
        miss.append("libpmix.so")
    return miss


def install() -> str | None:
    """Install the packages where a tool is missing (root and apt-get); why not, or None."""
    if not _missing():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"Slurm is not installed ({', '.join(_missing())} missing) and this is not " \
               f"root with apt-get: install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        r = subprocess.run(f"apt-get update -q && apt-get install -y -q {' '.join(PACKAGES)}",
                           shell=True, env=env, capture_output=True, text=True)
    if r.returncode or _missing():
        return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-500:]}"
    return None


def unavailable() -> str | None:
    """Why a Slurm cannot start here (after installing it where possible), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the test Slurm runs its daemons as root"
    return install()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slurm:
    folder: Path
    node: str
    procs: list = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, **extra) -> dict:
        """The environment for Slurm's commands (sbatch, srun, squeue ...) to reach it."""
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def run(self, *cmd, check=True, timeout=60) -> str:
        r = subprocess.run([str(c) for c in cmd], env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: {r.stderr.strip()}")
        return r.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "--oneliner")
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED",
                 "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """Wait until the job reaches one of ``states``; its record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"Slurm job {job_id} still {info.get('JobState')} after "
                                     f"{timeout} s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail=30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.folder / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-tail:]))
        return "\n".join(out)

    def clear(self, timeout: float = 60) -> None:
        """Cancel every job and wait until the queue is empty."""
        self.run("scancel", "--full", "--quiet", "--user=root", check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", check=False).strip():
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.clear(timeout=30)
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        # step daemons (and anything they left) outlive slurmd: they hold its log open
        for pid in _holders(self.folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _holders(folder: Path) -> list[int]:
    """The processes with a file under ``folder`` open."""
    out, prefix = [], str(folder) + "/"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(f).startswith(prefix) for f in fd_dir.iterdir()):
                out.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return [p for p in out if p != os.getpid()]


def job_pids(job_id: str, name: str) -> list[int]:
    """The pids of processes called ``name`` (their comm) that belong to Slurm job
    ``job_id`` (by SLURM_JOB_ID in their environment)."""
    out = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != name:
                continue
            env = (comm.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env:
            out.append(int(comm.parent.name))
    return out


_CONF = """\
# generated by tests/slurm_cluster.py: one node on this machine
ClusterName=dbmpi
# job ids unique across test clusters: MPICH names its shared memory after the job and step,
# and a killed job's segments would meet the next cluster's job of the same id
FirstJobId={first_job}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _start(args, folder: Path, name: str) -> subprocess.Popen:
    log = open(folder / f"{name}.out", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, SLURM_CONF=str(folder / "slurm.conf")))


@contextlib.contextmanager
def cluster(folder: str | os.PathLike | None = None, cpus: int = CPUS):
    """Start a one-node Slurm (in ``folder``, else a new temporary one); stop it on exit."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    own = folder is None
    d = Path(folder or tempfile.mkdtemp(prefix="dbmpi-slurm-"))
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)                            # munged refuses keys in open folders
    for sub in ("state", "spool"):
        (d / sub).mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]    # Open MPI's ranks look themselves up by it
    (d / "slurm.conf").write_text(_CONF.format(node=node, ctld_port=_free_port(),
                                               d_port=_free_port(), dir=d, cpus=cpus,
                                               first_job=int.from_bytes(os.urandom(3), 'little') * 3 + 1000))
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    s = Slurm(d, node)
    try:
        s.procs.append(_start(["munged", "--foreground", "--force", f"--socket={d}/munge.sock",
                               f"--key-file={key}", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                              d, "munged"))
        _wait_for(lambda: (d / "munge.sock").exists(), 30, "munged's socket", d / "munged.out")
        s.procs.append(_start(["slurmctld", "-D", "-c", "-f", str(d / "slurm.conf")], d,
                              "slurmctld"))
        s.procs.append(_start(["slurmd", "-D", "-f", str(d / "slurm.conf")], d,
                              "slurmd"))
        _wait_for(lambda: _node_state(s) == "idle", 60, "the node to be idle", d / "slurmd.out",
                  s)
        yield s
    finally:
        s.stop()
        if own:
            shutil.rmtree(d, ignore_errors=True)


def _node_state(s: Slurm) -> str:
    try:
        return s.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).strip()
    except subprocess.TimeoutExpired:
        return ""


def _wait_for(ready, timeout, what, log, s=None):
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            text = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"test Slurm: no {what} after {timeout} s\n{text}\n"
                               f"{s.logs() if s else ''}")
        time.sleep(0.2)


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:        # what CI runs first
        why = install()
        sys.exit(f"slurm_cluster: {why}" if why else 0)
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR | --install")
    with cluster(sys.argv[1]) as s:
        print(f"export SLURM_CONF={s.conf}")
        print(s.run("sinfo").strip())
        input("Slurm runs; press Enter to stop it\n")
