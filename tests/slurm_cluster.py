"""A Slurm on this machine, for the tests of the batch scripts and for trying a job by hand:
munged, slurmctld and slurmd started as root from a configuration generated in a folder
of their own, stopped afterwards.  One node (this machine), or several: each a network
namespace of tests/netns_hosts.py with its own address and hostname (which writes their
hosts files under /etc/netns and removes them afterwards; nothing else under /etc is
touched).

A node claims more CPUs than the machine has (``SlurmdParameters=config_overrides``), so
jobs of 5-7 ranks fit on 2 cores.  Debian's packages: ``slurm-wlm``, ``munge`` and
``libpmix-dev`` (Slurm's PMIx plugin loads ``libpmix.so``; Open MPI's ranks need it).

    with cluster() as slurm:
        subprocess.run(["sbatch", ...], env=slurm.env())

Usage as a script: ``python tests/slurm_cluster.py DIR [NODES]`` starts one in DIR (of
NODES nodes), prints the ``export SLURM_CONF=...`` line to use it from another shell, and
stops it on Enter; ``python tests/slurm_cluster.py --install`` installs the packages where
missing.
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
    node: str                   # the first node (a job's batch script runs there)
    names: list = field(default_factory=list)     # every node
    procs: list = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, **extra) -> dict:
        """The environment for Slurm's commands (sbatch, srun, squeue ...) to reach it."""
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def run(self, *cmd, check=True, timeout=60, env=None) -> str:
        """A Slurm command's output (``env``: variables to add to its environment)."""
        r = subprocess.run([str(c) for c in cmd], env=self.env(**(env or {})),
                           capture_output=True, text=True, timeout=timeout)
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

    def slurmd_log(self, node: str | None = None) -> Path:
        """The log of ``node``'s slurmd (default: the first node's)."""
        return self.folder / f"slurmd-{node or self.node}.log"

    def logs(self, tail=30) -> str:
        out = []
        for p in [self.folder / "slurmctld.log", *sorted(self.folder.glob("slurmd-*.log"))]:
            if p.exists():
                out.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-tail:]))
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
# generated by tests/slurm_cluster.py: {what}
ClusterName=dbmpi
# job ids unique across test clusters: MPICH names its shared memory after the job and step,
# and a killed job's segments would meet the next cluster's job of the same id
FirstJobId={first_job}
SlurmctldHost={host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
# each node's own temporary folder (Slurm's PMIx plugin names its folders in it after the
# job step only, so nodes sharing /tmp would collide)
TmpFS={dir}/tmp-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
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
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _start(args, folder: Path, name: str) -> subprocess.Popen:
    log = open(folder / f"{name}.out", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, SLURM_CONF=str(folder / "slurm.conf")))


@contextlib.contextmanager
def cluster(folder: str | os.PathLike | None = None, cpus: int = CPUS, nodes: int = 1):
    """Start a Slurm (in ``folder``, else a new temporary one); stop it on exit.

    One node: this machine, under its own hostname.  Several: each node is a host of
    tests/netns_hosts.py (a network namespace with its own address and hostname), its slurmd
    inside it, so a job's ranks on different nodes talk over TCP; ``cpus`` each."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    with contextlib.ExitStack() as stack:
        if nodes == 1:
            names, addrs, ctld_addr = [socket.gethostname().split(".")[0]], ["127.0.0.1"], \
                "127.0.0.1"        # Open MPI's ranks look themselves up by that hostname
            launch = [[]]
        else:
            import netns_hosts
            why = netns_hosts.unavailable()
            if why:
                raise RuntimeError(f"a Slurm of {nodes} nodes needs network namespaces: {why}")
            h = stack.enter_context(netns_hosts.hosts(nodes))
            names, addrs, ctld_addr = h.namespaces, h.addresses, h.gateway
            # not `ip netns exec`: it mounts a new /sys, without the cgroup file systems
            # that slurmd needs; the node's own hostname and hosts file instead
            launch = [["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount",
                       "sh", "-c", f"mount --bind /etc/netns/{ns}/hosts /etc/hosts && "
                       f'hostname {ns} && exec "$0" "$@"'] for ns in names]
        yield stack.enter_context(_started(folder, cpus, names, addrs, ctld_addr, launch))


@contextlib.contextmanager
def _started(folder, cpus, names, addrs, ctld_addr, launch):
    own = folder is None
    d = Path(folder or tempfile.mkdtemp(prefix="dbmpi-slurm-"))
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)                            # munged refuses keys in open folders
    (d / "state").mkdir(exist_ok=True)
    for n in names:
        (d / f"spool-{n}").mkdir(exist_ok=True)
        (d / f"tmp-{n}").mkdir(exist_ok=True)
    lines = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN"
                      for n, a in zip(names, addrs))
    (d / "slurm.conf").write_text(_CONF.format(
        what=f"{len(names)} node(s) on this machine", host=socket.gethostname().split(".")[0],
        ctld_addr=ctld_addr, ctld_port=_free_port(), d_port=_free_port(), dir=d, nodes=lines,
        first_job=int.from_bytes(os.urandom(3), "little") * 3 + 1000))
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    s = Slurm(d, names[0], names=names)
    try:
        s.procs.append(_start(["munged", "--foreground", "--force", f"--socket={d}/munge.sock",
                               f"--key-file={key}", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                              d, "munged"))
        _wait_for(lambda: (d / "munge.sock").exists(), 30, "munged's socket", d / "munged.out")
        s.procs.append(_start(["slurmctld", "-D", "-c", "-f", str(d / "slurm.conf")], d,
                              "slurmctld"))
        for n, pre in zip(names, launch):
            s.procs.append(_start([*pre, "slurmd", "-D", "-N", n, "-f", str(d / "slurm.conf")],
                                  d, f"slurmd-{n}"))
        _wait_for(lambda: _node_states(s) == ["idle"] * len(names), 60, "idle nodes",
                  d / f"slurmd-{names[-1]}.out", s)
        yield s
    finally:
        s.stop()
        if own:
            shutil.rmtree(d, ignore_errors=True)


def _node_states(s: Slurm) -> list[str]:
    try:
        return s.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).split()
    except subprocess.TimeoutExpired:
        return []


def _wait_for(ready, timeout, what, log, s=None):
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in (s.procs if s else []) if p.poll() is not None]
        if time.monotonic() > deadline or dead:
            why = f"{', '.join(dead)} exited" if dead else f"not after {timeout} s"
            text = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"test Slurm: no {what} ({why})\n{text}\n"
                               f"{s.logs() if s else ''}")
        time.sleep(0.2)


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:        # what CI runs first
        why = install()
        sys.exit(f"slurm_cluster: {why}" if why else 0)
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/slurm_cluster.py DIR [NODES] | --install")
    with cluster(sys.argv[1], nodes=int(sys.argv[2]) if len(sys.argv) == 3 else 1) as s:
        print(f"export SLURM_CONF={s.conf}", flush=True)
        print(s.run("sinfo").strip(), flush=True)
        input("Slurm runs; press Enter to stop it\n")
