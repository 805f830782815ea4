"""Hosts on this machine for tests of what crosses a network: network namespaces joined by
a bridge, each with its own address and hostname, so MPI sees separate nodes and their
traffic crosses a real (virtual) Ethernet link.  Hydra, MPICH's mpiexec, starts its
proxies in them through a launcher script in place of ssh; each host finds the others by
name (a hosts file of its own under /etc/netns, which `ip netns exec` mounts).  Needs root
and iproute2.

    with hosts(2) as h:
        subprocess.run([MPIEXEC, *h.hydra_args([3, 2]), "-n", "5", ...])

Usage as a script (to try a job by hand): python tests/netns_hosts.py N  (makes N hosts,
prints the mpiexec arguments, waits for Enter, removes them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["unavailable", "hosts", "Hosts"]

_LAUNCHER = """#!/bin/bash
# Hydra's remote shell: drop ssh's options, find the host's namespace, run the command there
# under its own hostname (a UTS namespace), so MPI counts it as a node of its own.
while [[ "$1" == -* ]]; do
  case "$1" in -o|-p|-l|-i|-F|-E) shift 2 ;; *) shift ;; esac
done
host=$1; shift
case "$host" in
{cases}
  *) echo "netns launcher: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts bash -c "hostname $ns; exec $*"
"""


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"needs {tool} (iproute2, util-linux)"
    probe = f"dbprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Hosts:
    addresses: list[str]
    namespaces: list[str]
    bridge: str
    launcher: Path

    @property
    def gateway(self) -> str:
        """This machine's address on the hosts' bridge (where they reach its daemons)."""
        return self.addresses[0].rsplit(".", 1)[0] + ".1"

    def hydra_args(self, slots: list[int]) -> list[str]:
        """mpiexec (Hydra) arguments placing ``slots[i]`` ranks on host i, in rank order."""
        spec = ",".join(f"{a}:{n}" for a, n in zip(self.addresses, slots))
        return ["-iface", self.bridge, "-hosts", spec, "-launcher", "ssh",
                "-launcher-exec", str(self.launcher)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def hosts(n: int = 2):
    """``n`` hosts on a bridge of their own, removed on exit (names and subnet taken from
    this process's pid, so concurrent runs do not collide)."""
    tag = os.getpid() % 100000
    net = f"10.{200 + tag % 50}.{tag % 250}"
    bridge = f"dbbr{tag}"
    names = [f"dbh{tag}{chr(97 + i)}" for i in range(n)]
    addresses = [f"{net}.{11 + i}" for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="dbmpi-hosts-"))
    made = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{net}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, (ns, addr) in enumerate(zip(names, addresses)):
            _ip("netns", "add", ns)
            made.append(ns)
            veth = f"dbv{tag}{chr(97 + i)}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: every host can
            # look up every other by its hostname (the namespace's name), as Slurm needs
            etc = Path("/etc/netns", ns)
            etc.mkdir(parents=True, exist_ok=True)
            etc.joinpath("hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{a} {n}\n" for a, n in zip(addresses, names)))
        cases = "\n".join(f"  {a}) ns={ns} ;;" for a, ns in zip(addresses, names))
        launcher = tmp / "launcher.sh"
        launcher.write_text(_LAUNCHER.format(cases=cases))
        launcher.chmod(0o755)
        yield Hosts(addresses, names, bridge, launcher)
    finally:
        for ns in made:                 # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys
    why = unavailable()
    if why:
        raise SystemExit(f"cannot make hosts here: {why}")
    with hosts(int(sys.argv[1]) if len(sys.argv) > 1 else 2) as h:
        print("mpiexec", " ".join(h.hydra_args([1] * len(h.addresses))))
        input("hosts are up; Enter removes them ")
