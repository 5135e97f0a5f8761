"""A multi-host Slurm cluster on one machine: hosts are network namespaces on a bridge, one slurmd each.

Each host has its own network namespace (a veth named ``IFNAME`` into a private bridge), and per daemon
a UTS and a mount namespace (jobs inherit both) for its own hostname and a Debian-style ``/etc/hosts``
(``127.0.1.1 <itself>``, its peers by bridge address) bind-mounted over the real one. Not ``ip netns
exec``: it remounts /sys, which hides the cgroup mounts slurmd needs. The file system
is shared, like a cluster's storage. The root namespace sits on the bridge too (the "login node": the
test, sbatch, Prometheus) and resolves the hosts through marked lines in the real ``/etc/hosts``.
Everything is torn down on exit, also after a failure; names carry the owner's pid, so what a killed
test session left behind is swept by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from servers import SLURM_BINARIES, SLURM_CONF, Slurm, _binary, _start_munge, _stop, _wait, require

PREFIX = "atmh"  # every bridge, veth, netns, hostname and hosts line of this fixture starts with it
NAME_RE = re.compile(rf"{PREFIX}([0-9a-f]{{6}})[0-9a-f]{{2}}")  # PREFIX, owner pid, 2 random hex digits
IFNAME = "atnet0"  # the host's interface on the bridge: the same name on every host, like a cluster's
HOSTS_FILE = Path("/etc/hosts")
CTLD_PORT, SLURMD_PORT = 6817, 6818  # inside our own namespaces: nobody else's ports


@dataclass
class Host:
    """One cluster host: a network namespace with its own hostname."""

    name: str  # hostname and Slurm NodeName
    netns: str
    addr: str  # on the bridge
    hosts_file: Path  # this host's /etc/hosts

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run on this host: its network namespace, its /etc/hosts, its hostname."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"', self.name,
                str(self.hosts_file), *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (daemons, job steps, ranks)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True,
                             timeout=10).stdout
        return [int(p) for p in out.split()]


@dataclass
class Cluster(Slurm):
    """A running multi-host cluster; ``hosts[0]`` runs slurmctld too."""

    hosts: list[Host] = field(default_factory=list)
    ifname: str = IFNAME
    login_addr: str = ""  # the root namespace's address on the bridge


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Popen preexec: the daemon gets SIGTERM if the test process dies without cleaning up."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _kill_netns(netns: str) -> None:
    """SIGKILL what still runs in the namespace (all of it ours), then delete it."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10).stdout
    for pid in map(int, out.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", netns, check=False)


def _hosts_lines_remove(pred) -> None:  # type: ignore[no-untyped-def]
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not pred(line)]
    if kept != lines:
        HOSTS_FILE.write_text("".join(kept))  # in place: /etc/hosts may be a bind mount


def _marker(tag: str) -> str:
    return f"# attent-multihost {tag}"


def sweep_stale() -> None:
    """Remove what a test session that no longer runs left behind (names carry the owner's pid)."""
    def dead(name: str) -> bool:
        m = NAME_RE.match(name)
        return bool(m) and not _alive(int(m.group(1), 16))

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if dead(name):
            _kill_netns(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if dead(name):
            _ip("link", "del", name, check=False)
    _hosts_lines_remove(lambda line: "# attent-multihost " in line and dead(line.rsplit(" ", 1)[-1].strip()))
    for d in Path(tempfile.gettempdir()).glob(f"attent-{PREFIX}*"):
        if dead(d.name.removeprefix("attent-")):
            shutil.rmtree(d, ignore_errors=True)


def _free_subnet() -> str:
    """A 10.213.X.0/24 that no interface or route here uses."""
    used = _ip("-4", "addr", check=False).stdout + _ip("-4", "route", check=False).stdout
    for _ in range(100):
        net = f"10.213.{random.randint(1, 254)}"
        if f"{net}." not in used:
            return net
    raise RuntimeError("no free 10.213.X.0/24 subnet")


def _hosts_file(me: Host, hosts: list[Host], login: tuple[str, str]) -> str:
    lines = ["127.0.0.1 localhost", f"127.0.1.1 {me.name}"]  # Debian's installer writes the 127.0.1.1 line
    lines += [f"{h.addr} {h.name}" for h in hosts if h is not me]
    lines.append(f"{login[1]} {login[0]}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def multihost_cluster(n_hosts: int = 2, partition: str = "mh") -> Iterator[Cluster]:
    """Bring up ``n_hosts`` namespace hosts, munge, slurmctld on the first and a slurmd on each."""
    require(SLURM_BINARIES, "slurm-wlm and munge")
    require(("ip", "unshare", "nsenter", "hostname"), "iproute2, util-linux and hostname")
    if os.geteuid() != 0:
        pytest.fail("the multi-host test cluster needs root (network namespaces, slurmd)", pytrace=False)
    sweep_stale()
    tag = f"{PREFIX}{os.getpid():06x}{random.randrange(256):02x}"
    net = _free_subnet()
    login = (f"{tag}login", f"{net}.1")
    with contextlib.ExitStack() as undo:
        tmp = Path(tempfile.mkdtemp(prefix=f"attent-{tag}-"))
        undo.callback(shutil.rmtree, tmp, ignore_errors=True)
        hosts = [Host(name=f"{tag}n{i + 1}", netns=f"{tag}-n{i + 1}", addr=f"{net}.{11 + i}",
                      hosts_file=tmp / f"hosts-n{i + 1}") for i in range(n_hosts)]
        bridge = f"{tag}br"
        _ip("link", "add", bridge, "type", "bridge")
        undo.callback(_ip, "link", "del", bridge, check=False)
        _ip("addr", "add", f"{login[1]}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, h in enumerate(hosts):
            _ip("netns", "add", h.netns)
            undo.callback(_kill_netns, h.netns)
            h.hosts_file.write_text(_hosts_file(h, hosts, login))
            outer = f"{tag}v{i + 1}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", f"{tag}p{i + 1}")
            undo.callback(_ip, "link", "del", outer, check=False)  # a netns can outlive `ip netns del`
            _ip("link", "set", f"{tag}p{i + 1}", "netns", h.netns)
            for args in (("link", "set", f"{tag}p{i + 1}", "name", IFNAME),
                         ("addr", "add", f"{h.addr}/24", "dev", IFNAME),
                         ("link", "set", IFNAME, "up"), ("link", "set", "lo", "up")):
                _ip("-n", h.netns, *args)
            _ip("link", "set", outer, "master", bridge, "up")
        marker = _marker(tag)
        undo.callback(_hosts_lines_remove, lambda line: line.rstrip().endswith(marker))
        with HOSTS_FILE.open("a") as f:
            f.writelines(f"{a} {n} {marker}\n" for n, a in [(h.name, h.addr) for h in hosts] + [login])

        for d in ["state"] + [f"spool-{h.name}" for h in hosts]:
            (tmp / d).mkdir()
        conf = tmp / "slurm.conf"
        cpus = os.cpu_count() or 1
        conf.write_text(SLURM_CONF.format(
            ctld_host=f"{hosts[0].name}({hosts[0].addr})", ctld_port=CTLD_PORT, slurmd_port=SLURMD_PORT,
            dir=tmp, partition=partition, node_names=",".join(h.name for h in hosts),
            nodes="\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs={cpus} State=UNKNOWN" for h in hosts),
        ).replace("ClusterName=attenttest", f"ClusterName={tag}"))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        procs: list[subprocess.Popen] = []
        cluster = Cluster(dir=tmp, conf=conf, node=hosts[0].name, partition=partition, env=env, procs=procs,
                          hosts=hosts, login_addr=login[1])

        def stop_all() -> None:
            subprocess.run(["scancel", "--full", "--quiet", f"--partition={partition}"], env=env,
                           capture_output=True, timeout=30, check=False)
            for proc in reversed(procs):
                _stop(proc)

        undo.callback(stop_all)  # before the namespaces go (callbacks run last-in first-out)
        _start_munge(procs, tmp / "munged.log")  # a unix socket on the shared file system serves every host

        def daemon(host: Host, name: str, *args: str) -> None:
            procs.append(subprocess.Popen(host.cmd(_binary(name), *args), env=env,
                                          stdout=(tmp / f"{name}-{host.name}.out").open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent))

        daemon(hosts[0], "slurmctld", "-D", "-i", "-f", str(conf))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 60,
              "slurmctld", tmp / "slurmctld.log")
        for h in hosts:
            daemon(h, "slurmd", "-D", "-N", h.name, "-f", str(conf))

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return len(states) == n_hosts and all(s.rstrip("*") == "idle" for s in states.values())

        _wait(idle, 60, f"{n_hosts} idle nodes in sinfo", tmp / f"slurmd-{hosts[-1].name}.log")
        yield cluster
