"""A small cluster on one Linux host: network namespaces on a bridge, MPI launched into them.

Every node is a network namespace with its own address, host name and ``/etc/hosts``,
joined to the others by a veth pair on a bridge in the host's own namespace, where
``mpiexec`` (the head node) runs. Traffic between nodes goes through the kernel's TCP stack
over the veths, whose byte counters show it (:meth:`Cluster.link_bytes`); ``tc``'s token
bucket caps each node's link at a rate (:meth:`Cluster.limit`) to stand for a slower
inter-node network. Ranks of one node share memory as on a real host. Addresses are private
(``10.213.<k>.0/24``, one ``k`` per cluster) and no namespace has a route out.

::

    with Cluster(nodes=2, ranks_per_node=2) as cluster:
        argv = cluster.mpiexec([sys.executable, "-m", "mc2sim", "info"])
        subprocess.run(argv, env={**os.environ, **cluster.env()}, check=True)

``mpiexec`` (MPICH's hydra) reaches the nodes through its ssh launcher pointed at a script
that runs the rest of its arguments in the node's namespace, under the node's host name
(``-launcher ssh -launcher-exec``); ``-iface`` names the bridge, so the nodes' proxies call
back to the head's address on it. :meth:`Cluster.env` makes MPICH carry inter-node messages
over TCP (its default UCX netmod would use shared memory between namespaces of one host)
and names the interface gloo binds.

Everything a cluster creates (namespaces, links, ``/etc/netns/<node>/``, its folder under
``/run/mc2sim-cluster``) is named ``mc2sim-...`` and removed by :meth:`Cluster.down`, also
after a failure; :func:`cleanup_stale` removes what a crashed run left behind (its owner
process is gone). Needs root, ``ip`` and ``tc`` (iproute2) and ``unshare`` (util-linux);
:func:`unavailable` says why a cluster cannot be built here. ``python -m mc2sim.cluster``
runs one command on a fresh cluster (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "IFACE",
    "PREFIX",
    "Cluster",
    "ClusterError",
    "LinkBytes",
    "Node",
    "cleanup_stale",
    "main",
    "tcp_payload_rate",
    "token_bucket_bytes",
    "unavailable",
]

PREFIX = "mc2sim-"
"""The start of the name of everything a cluster creates."""

IFACE = "eth0"
"""A node's end of its veth pair, inside its namespace: the interface MPI and gloo use."""

STATE = Path("/run/mc2sim-cluster")
"""Where each cluster keeps its owner, launcher script and host file (``STATE / str(k)``);
removed when no cluster is left."""

NETNS_ETC = Path("/etc/netns")
"""``ip netns exec`` mounts ``/etc/netns/<ns>/<file>`` over ``/etc/<file>`` in namespace ns."""

_SUBNET = "10.213.{k}.0/24"
_MAX_CLUSTERS = 250
_MTU = 1500
_GSO_MAX = 65536
"""The largest packet a veth hands its qdisc (its ``gso_max_size``, ``ip -d link``)."""


class ClusterError(RuntimeError):
    """A cluster could not be built, used or torn down; the message says which command."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    """One node of a cluster."""

    name: str
    """Its network namespace, which is also its host name, e.g. ``mc2sim-3-n1``."""
    address: str
    """Its address on the bridge, e.g. ``10.213.3.11``."""
    veth: str
    """The host's end of its veth pair, e.g. ``mc2sim-3v1`` (its counters are the link's)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkBytes:
    """Bytes a node's link carried, from the node's side, since the link was made."""

    sent: int
    """Bytes that left the node (Ethernet frames: headers included)."""
    received: int
    """Bytes that reached the node."""


def tcp_payload_rate(rate_bits: float, mtu: int = _MTU) -> float:
    """Payload bytes per second a TCP stream gets through a token bucket of ``rate_bits``.

    The bucket counts whole Ethernet frames (``mtu`` + 14 bytes of Ethernet header) while a
    frame carries ``mtu`` - 52 bytes of payload (IPv4 20, TCP 20, TCP timestamps 12).

    Args:
        rate_bits: the bucket's rate, in bits per second.
        mtu: the link's MTU.

    Returns:
        Bytes of payload per second.
    """
    return rate_bits / 8 * (mtu - 52) / (mtu + 14)


def token_bucket_bytes(rate_bits: float, tick_s: float | None = None) -> int:
    """The depth of the token bucket :meth:`Cluster.limit` puts on a link of ``rate_bits``.

    A bucket that is full when the qdisc's wake-up comes late loses the tokens of the delay,
    and the link runs below its rate. A bucket of one 64 KiB packet, at 200 Mbit/s, loses
    all of them: the packet can leave only when the bucket is full. So the bucket holds two
    of the largest packets the veth hands it (one waits while the other is paid for) and
    the tokens of 1 ms plus two timer ticks: the kernel wakes the qdisc no sooner than its
    timers resolve, 1 ns with high-resolution timers and a whole tick (4 ms at HZ=250)
    without. What the bucket holds leaves at once: a transfer of B bytes from an idle link
    takes ``(B - depth) / rate`` at the least.

    Args:
        rate_bits: the bucket's rate, in bits per second.
        tick_s: the timer resolution, in seconds; ``None`` reads this host's.

    Returns:
        The depth in bytes.
    """
    if tick_s is None:
        tick_s = time.clock_getres(time.CLOCK_MONOTONIC)
    return max(int(rate_bits / 8 * (1e-3 + 2 * tick_s)), 2 * _GSO_MAX)


# ----------------------------------------------------------------------------- commands


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; raise :class:`ClusterError` naming it and its stderr if it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable() -> str | None:
    """Say why no cluster can be built on this machine, or ``None`` if one can.

    Checks the platform, root, the tools, and that a network namespace and a bridge can be
    made (a probe of each is created and removed at once).

    Returns:
        The reason, in words, or ``None``.
    """
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to make network namespaces, veth pairs and tc limits (CI runs as root)"
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (iproute2: ip and tc; util-linux: unshare)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    bridge = f"{PREFIX}p{os.getpid() % 100000}"
    made = _run("ip", "link", "add", bridge, "type", "bridge", check=False)
    if made.returncode != 0:
        return f"cannot make a bridge: {made.stderr.strip()}"
    _run("ip", "link", "del", bridge, check=False)
    return None


# ----------------------------------------------------------------------------- ownership


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of its stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _owner_alive(folder: Path) -> bool:
    """Whether the process that made the cluster of ``folder`` still runs."""
    try:
        pid_text, started = (folder / "owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_text)) == started


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold the lock under which clusters are numbered, removed and found stale.

    The lock is the ``STATE`` folder itself, removed on the way out when no cluster is left
    in it, so nothing stays behind; a waiter that then holds the lock of a removed folder
    starts again on a new one.
    """
    while True:
        STATE.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(STATE, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(STATE).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            STATE.rmdir()  # only when empty
        os.close(fd)


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _run("ip", "-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _kill_inside(namespace: str) -> None:
    """End the processes a cluster's command left in one of its namespaces, by their ids."""
    pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _remove(k: int) -> list[str]:
    """Remove everything of cluster ``k`` that exists; return what was removed."""
    removed = []
    ns_prefix, veth_prefix, bridge = f"{PREFIX}{k}-n", f"{PREFIX}{k}v", f"{PREFIX}b{k}"
    for namespace in _namespaces():
        if namespace.startswith(ns_prefix):
            _kill_inside(namespace)
            _run("ip", "netns", "del", namespace, check=False)
            removed.append(namespace)
    for link in _links():
        if link.startswith(veth_prefix) or link == bridge:
            _run("ip", "link", "del", link, check=False)
            removed.append(link)
    if NETNS_ETC.is_dir():
        for folder in NETNS_ETC.glob(f"{ns_prefix}*"):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty: then it was made for the clusters
    shutil.rmtree(STATE / str(k), ignore_errors=True)
    return removed


def _cluster_numbers() -> set[int]:
    """The number of every cluster something is left of: folders, namespaces, links."""
    found = set()
    names = _namespaces() + _links()
    if NETNS_ETC.is_dir():
        names += [p.name for p in NETNS_ETC.iterdir()]
    for name in names:
        rest = name.removeprefix(PREFIX)
        if rest == name:
            continue
        digits = rest.removeprefix("b").split("-")[0].split("v")[0]
        if digits.isdigit():
            found.add(int(digits))
    if STATE.is_dir():
        found.update(int(p.name) for p in STATE.iterdir() if p.name.isdigit())
    return found


def cleanup_stale() -> list[str]:
    """Remove what clusters of processes that no longer run left behind.

    A cluster whose owner still runs (another test session on this machine) is left alone.

    Returns:
        The names of the namespaces, links and folders removed.
    """
    with _locked():
        return _cleanup_stale_locked()


def _cleanup_stale_locked() -> list[str]:
    removed = []
    for k in sorted(_cluster_numbers()):
        if not _owner_alive(STATE / str(k)):
            removed += _remove(k)
    return removed


# ----------------------------------------------------------------------------- the cluster

_LAUNCHER = """#!/bin/sh
# mpiexec's ssh for mc2sim cluster {k}: called as [options] host command...; runs the
# command in the host's network namespace under the host's name.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1
shift
case "$host" in
  {prefix}{k}-n[0-9]*) ;;
  *) echo "mc2sim cluster {k}: no node named '$host'" >&2; exit 255 ;;
esac
exec ip netns exec "$host" unshare --uts /bin/sh -c 'hostname "$0" && exec /bin/sh -c "$1"' \\
    "$host" "$*"
"""


class Cluster:
    """``nodes`` namespaces of ``ranks_per_node`` ranks each; :meth:`up` builds them.

    Use it as a context manager (``with Cluster(...) as c:``), which calls :meth:`up` and
    always :meth:`down`.
    """

    def __init__(self, *, nodes: int, ranks_per_node: int) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 200:
            raise ClusterError(f"nodes={nodes!r}: must be an integer in [1, 200]")
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int):
            raise ClusterError(f"ranks_per_node={ranks_per_node!r}: must be an integer >= 1")
        if ranks_per_node < 1:
            raise ClusterError(f"ranks_per_node={ranks_per_node!r}: must be an integer >= 1")
        self.ranks_per_node = ranks_per_node
        """Ranks each node runs."""
        self.node_count = nodes
        """How many nodes."""
        self.k: int | None = None
        """The cluster's number (its subnet is ``10.213.<k>.0/24``) while it is up."""
        self.nodes: tuple[Node, ...] = ()
        """The nodes, once up."""

    # -- names ------------------------------------------------------------------------------

    def _number(self) -> int:
        if self.k is None:
            raise ClusterError("the cluster is not up")
        return self.k

    @property
    def world_size(self) -> int:
        """Ranks in all: ``nodes * ranks_per_node``."""
        return self.node_count * self.ranks_per_node

    @property
    def bridge(self) -> str:
        """The bridge joining the nodes (its address is the head node's)."""
        return f"{PREFIX}b{self._number()}"

    @property
    def head(self) -> str:
        """The head node's address: the host's own namespace, on the bridge."""
        return f"10.213.{self._number()}.1"

    @property
    def folder(self) -> Path:
        """The cluster's folder: owner, launcher script, host file."""
        return STATE / str(self._number())

    @property
    def launcher(self) -> Path:
        """The script ``mpiexec -launcher ssh -launcher-exec`` runs."""
        return self.folder / "launch"

    @property
    def hostfile(self) -> Path:
        """A host file for ``mpiexec -f``: ``<node>:<ranks per node>`` a line."""
        return self.folder / "hosts"

    # -- building ---------------------------------------------------------------------------

    def up(self) -> Cluster:
        """Build the bridge, the namespaces and their links, hosts files and launcher.

        Stale clusters of dead owners are removed first. On any failure what was built is
        removed again before the error is raised.

        Returns:
            The cluster.

        Raises:
            ClusterError: no cluster can be built here (:func:`unavailable`), or a command
                failed (named with its error).
        """
        if self.k is not None:
            raise ClusterError(f"cluster {self.k} is already up")
        reason = unavailable()
        if reason is not None:
            raise ClusterError(f"no cluster on this machine: {reason}")
        with _locked():
            _cleanup_stale_locked()
            taken = _cluster_numbers() | _subnets_in_use()
            free = [k for k in range(1, _MAX_CLUSTERS + 1) if k not in taken]
            if not free:
                raise ClusterError(f"all {_MAX_CLUSTERS} cluster numbers are in use")
            self.k = free[0]
            self.folder.mkdir(parents=True)
            started = _start_time(os.getpid())
            (self.folder / "owner").write_text(f"{os.getpid()} {started}\n")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        k = self._number()
        nodes = tuple(
            Node(name=f"{PREFIX}{k}-n{i}", address=f"10.213.{k}.{10 + i}", veth=f"{PREFIX}{k}v{i}")
            for i in range(1, self.node_count + 1)
        )
        self.nodes = nodes
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.head}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        hosts = f"127.0.0.1 localhost\n{self.head} {PREFIX}{k}-head\n"
        hosts += "".join(f"{n.address} {n.name}\n" for n in nodes)
        for node in nodes:
            _run("ip", "netns", "add", node.name)
            _run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", IFACE,
                 "netns", node.name)  # fmt: skip
            _run("ip", "link", "set", node.veth, "master", self.bridge, "up")
            _run("ip", "-n", node.name, "addr", "add", f"{node.address}/24", "dev", IFACE)
            _run("ip", "-n", node.name, "link", "set", IFACE, "up")
            _run("ip", "-n", node.name, "link", "set", "lo", "up")
            etc = NETNS_ETC / node.name
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(hosts)
            # no name server is reachable: fail a lookup at once instead of timing out
            (etc / "resolv.conf").write_text("# mc2sim cluster: no name server\n")
        self.launcher.write_text(_LAUNCHER.format(k=k, prefix=PREFIX))
        self.launcher.chmod(0o755)
        self.hostfile.write_text("".join(f"{n.name}:{self.ranks_per_node}\n" for n in nodes))

    def down(self) -> list[str]:
        """Remove everything the cluster made (processes left in its namespaces are killed).

        Returns:
            The names of what was removed; empty if the cluster was not up.
        """
        if self.k is None:
            return []
        with _locked():
            removed = _remove(self.k)
        self.k = None
        self.nodes = ()
        return removed

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()

    # -- using ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for the ranks: MPICH over TCP between nodes, gloo on the node's link."""
        return {
            "MPIR_CVAR_CH4_NETMOD": "ofi",
            "FI_PROVIDER": "tcp",
            "FI_TCP_IFACE": IFACE,
            "GLOO_SOCKET_IFNAME": IFACE,
        }

    def mpiexec(self, argv: Sequence[str], *, mpiexec: str | None = None) -> list[str]:
        """The ``mpiexec`` command line that runs ``argv`` on every rank of the cluster.

        Ranks are placed by node: ranks ``0 .. K-1`` on the first node, and so on.

        Args:
            argv: the program and its arguments.
            mpiexec: MPICH's (hydra) mpiexec; default: the one beside the Python running.

        Returns:
            The command line; run it with :meth:`env` added to the environment.
        """
        exe = mpiexec or str(Path(sys.executable).parent / "mpiexec")
        hosts = ",".join(f"{n.name}:{self.ranks_per_node}" for n in self.nodes)
        return [
            exe, "-launcher", "ssh", "-launcher-exec", str(self.launcher), "-iface", self.bridge,
            "-hosts", hosts, "-n", str(self.world_size), *argv,
        ]  # fmt: skip

    def on(self, node: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` on one node (its namespace and host name).

        Args:
            node: the node's index, from 0.
            argv: the program and its arguments.
        """
        name = self.nodes[node].name
        script = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", name, "unshare", "--uts", "/bin/sh", "-c", script, name,
                *argv]  # fmt: skip

    def limit(self, rate_bits: float | None) -> None:
        """Cap every node's link at ``rate_bits`` bits per second each way, or lift the cap.

        A token bucket (``tc ... tbf``, :func:`token_bucket_bytes` deep) on both ends of each
        veth: the node's end limits what it sends, the host's end what it receives.

        Args:
            rate_bits: the rate, > 0; ``None`` removes the limits.
        """
        for node in self.nodes:
            for prefix, dev in ((("ip", "netns", "exec", node.name), IFACE), ((), node.veth)):
                if rate_bits is None:
                    _run(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                    continue
                if not rate_bits > 0:
                    raise ClusterError(f"rate_bits={rate_bits!r}: must be > 0")
                _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                     "rate", f"{int(rate_bits)}bit", "burst", str(token_bucket_bytes(rate_bits)),
                     "latency", "200ms")  # fmt: skip

    def link_bytes(self) -> list[LinkBytes]:
        """Every node's link counters (index = node), read from the host's end of its veth."""
        out = []
        for node in self.nodes:
            stats = Path("/sys/class/net") / node.veth / "statistics"
            out.append(
                LinkBytes(
                    sent=int((stats / "rx_bytes").read_text()),
                    received=int((stats / "tx_bytes").read_text()),
                )
            )
        return out


def _subnets_in_use() -> set[int]:
    """The ``k`` of every ``10.213.<k>.0/24`` an address of this namespace falls in."""
    used = set()
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" not in parts:
            continue
        net = ipaddress.ip_interface(parts[parts.index("inet") + 1]).network
        for k in range(1, _MAX_CLUSTERS + 1):
            if net.overlaps(ipaddress.ip_network(_SUBNET.format(k=k))):
                used.add(k)
    return used


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mc2sim.cluster``: run a command on a fresh cluster, or clean up.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The command's exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mc2sim.cluster",
        description="Network namespaces on a bridge as a small cluster on this host (root).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="build a cluster, run a command under its mpiexec, tear it down"
    )
    run.add_argument("--nodes", type=int, default=2)
    run.add_argument("--ranks-per-node", type=int, default=2)
    run.add_argument(
        "--rate-gbit", type=float, default=None, help="cap each node's link (Gbit/s each way)"
    )
    run.add_argument("program", nargs=argparse.REMAINDER, help="the command, after --")
    commands.add_parser("cleanup", help="remove what crashed runs left behind")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
        return 0
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("run: give the command to run after --")
    with Cluster(nodes=args.nodes, ranks_per_node=args.ranks_per_node) as cluster:
        if args.rate_gbit is not None:
            cluster.limit(args.rate_gbit * 1e9)
        command = cluster.mpiexec(program)
        print(" ".join(command), flush=True)
        return subprocess.run(command, env={**os.environ, **cluster.env()}, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
